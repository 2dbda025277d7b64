"""The one contract every model keeps, and the registry that creates models by name.

    encode_items(item_features) -> item_state   offline, once per item: item-side features only
    encode_user(user_features)  -> user_state   online, once per request: user + context features
    score(user_state, item_state) -> [B, N]     online, per candidate: must be light

States are dicts of tensors. A user state has leading dim B; an item state fed to `score` has
leading dims [B, N] (N = 1 for pointwise training, the list length for listwise training, the
candidate count at serving). `forward` is built from the three stages, so the code path that
training exercises is the one serving runs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from prerank.config import ConfigError, config_dataclass  # noqa: F401  (models import it from here)
from prerank.data.schema import Schema

State = dict[str, Tensor]


@dataclass
class ModelOutput:
    logits: Tensor  # [B, N]
    aux_losses: dict[str, Tensor] = field(default_factory=dict)


class PreRankModel(nn.Module):
    """Base class. Subclasses set `name`, `Config` and implement the three stages."""

    name: ClassVar[str] = ""
    Config: ClassVar[type] = object
    # False for models that cannot move work out of `score` (COLD, the ranking teacher).
    decoupled: ClassVar[bool] = True
    # True for models that rank and are not meant to pre-rank (the cascade's teacher).
    is_ranker: ClassVar[bool] = False
    # True where `score` lets candidates of one request interact (N-axis scores are not pointwise).
    listwise: ClassVar[bool] = False

    def __init__(self, schema: Schema, config: Any) -> None:
        super().__init__()
        self.schema = schema
        self.config = config

    # -- the contract ---------------------------------------------------------------------------
    def encode_items(self, items: dict[str, Tensor]) -> State:
        raise NotImplementedError

    def encode_user(self, user: dict[str, Tensor]) -> State:
        raise NotImplementedError

    def score(self, user_state: State, item_state: State) -> Tensor:
        raise NotImplementedError

    def auxiliary_losses(self, batch: dict[str, Tensor], user_state: State, item_state: State, logits: Tensor) -> dict[str, Tensor]:
        """Extra training losses (already weighted). Only called in training mode."""
        return {}

    # -- built from the contract ----------------------------------------------------------------
    def user_inputs(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return {f.name: batch[f.name] for f in self.schema.user_features}

    def item_inputs(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return {f.name: batch[f.name] for f in self.schema.item_features}

    def encode_item_lists(self, items: dict[str, Tensor]) -> State:
        """Item features with leading dims [B, N] (or [B]) -> item state with leading dims [B, N]."""
        ids = items[self.schema.item_id]
        lead = ids.shape if ids.dim() == 2 else (ids.shape[0], 1)
        flat = {k: v.reshape(lead[0] * lead[1], *v.shape[len(ids.shape):]) for k, v in items.items()}
        state = self.encode_items(flat)
        return {k: v.reshape(*lead, *v.shape[1:]) for k, v in state.items()}

    def forward(self, batch: dict[str, Tensor]) -> ModelOutput:
        user_state = self.encode_user(self.user_inputs(batch))
        item_state = self.encode_item_lists(self.item_inputs(batch))
        logits = self.score(user_state, item_state)
        aux = self.auxiliary_losses(batch, user_state, item_state, logits) if self.training else {}
        return ModelOutput(logits, aux)

    @torch.no_grad()
    def encode_catalogue(self, items: dict[str, Tensor], batch_size: int = 8192) -> State:
        """The item-state table: `encode_items` over a whole catalogue (leading dim M), in chunks."""
        n = len(items[self.schema.item_id])
        chunks = [self.encode_items({k: v[i : i + batch_size] for k, v in items.items()}) for i in range(0, n, batch_size)]
        return {k: torch.cat([c[k] for c in chunks]) for k in chunks[0]}

    @torch.no_grad()
    def predict(self, batch: dict[str, Tensor]) -> Tensor:
        """Pointwise probabilities for rows whose item features have leading dim [B]."""
        return torch.sigmoid(self.forward(batch).logits.reshape(-1))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def gather_items(table: State, rows: Tensor) -> State:
    """Item states of catalogue rows `rows` ([B, N] or [B]) from an item-state table (leading dim M)."""
    rows = rows.long()
    return {k: v.index_select(0, rows.reshape(-1)).reshape(*rows.shape, *v.shape[1:]) for k, v in table.items()}


REGISTRY: dict[str, type[PreRankModel]] = {}


def register(cls: type[PreRankModel]) -> type[PreRankModel]:
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    REGISTRY[cls.name] = cls
    return cls


def make_config(name: str, overrides: dict | None = None):
    cls = get_model_class(name)
    try:
        return cls.Config(**(overrides or {}))
    except ConfigError as err:
        raise ConfigError(f"config for model {name!r}", err.problems) from None


def get_model_class(name: str) -> type[PreRankModel]:
    import prerank.models  # noqa: F401  (registers the models)

    if name not in REGISTRY:
        raise ValueError(f"unknown model {name!r}; registered: {sorted(REGISTRY)}")
    return REGISTRY[name]


def create_model(name: str, schema: Schema, overrides: dict | None = None) -> PreRankModel:
    return get_model_class(name)(schema, make_config(name, overrides))


def config_to_dict(config) -> dict:
    return dataclasses.asdict(config)
