"""The one contract every model keeps, and the registry that creates models by name.

    encode_items(item_features) -> item_state   offline, once per item: item-side features only
    encode_user(user_features)  -> user_state   online, once per request: user + context features
    score(user_state, item_state, mask=None) -> [B, N]   online, per candidate: must be light

States are dicts of tensors. A user state has leading dim B; an item state fed to `score` has
leading dims [B, N] (N = 1 for pointwise training, the list length for listwise training, the
candidate count at serving). `mask` [B, N] marks the valid candidates of padded request lists (a
listwise scorer must not let padding into its list context; a pointwise scorer ignores it).

`forward` is built from the three stages in this class and no model overrides it, so the code path
that training exercises is the one serving runs. How a model is trained is said by hooks of this
class, with defaults that cover the plain case (pointwise BCE, or the hybrid list loss on cascade
lists, over all parameters at once):

    auxiliary_losses(batch, user_state, item_state, logits)  extra weighted training losses
    batch_states(batch)            the states of a training batch (default: the serving stages)
    on_training_forward()          per-step bookkeeping before a training forward (schedules, codebooks)
    training_phases()              the plan: one phase, or several that each train some parameters
    enter_phase(name)              what the model's `score`/losses serve in a phase (`phase`)
    training_modes                 "pointwise" and/or "listwise": what the model can be trained on
    list_objective                 "hybrid" (the trainer's list loss) or "own" (its auxiliary losses)
    two_level + coarse_score       a model whose cheap first stage can prune the list before `score`
    score_shared(user_state, items)  optional: every request of a batch against one shared list

Training code reads these and nothing else: it never names a model or probes its attributes.

Embedding dims are model configuration: every model config takes `embed_dim` (added by
`config_dataclass`), one int for every table or a mapping from table (vocabulary) name to int, as
TorchRec's `EmbeddingBagConfig` sets one dim per table; unset, the data schema's dims stand.
`create_model` builds the model on the schema with those dims (`model_schema`), which is the
schema the model keeps, checkpoints and exports.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Iterator, Literal, Optional, Union

import pydantic
import torch
from torch import Tensor, nn

from prerank.config import ConfigError  # noqa: F401  (models import it from here)
from prerank.config import config_dataclass as validated_config
from prerank.data.schema import Kind, Schema
from prerank.models.layers import MLP
from prerank.models.registry import ModelRegistry

State = dict[str, Tensor]
# The batch key of a listwise batch's candidate mask [B, N] (True = a real candidate, not padding).
LIST_MASK = "mask"
# The phase a model is in outside training and in a one-phase plan: every part serves.
ALL_PARTS = "all"


@dataclass
class ModelOutput:
    logits: Tensor  # [B, N]
    aux_losses: dict[str, Tensor] = field(default_factory=dict)


@dataclass(eq=False)
class TrainingPhase:
    """One phase of a model's training plan: `name` is what `enter_phase` receives; `parameters`
    are the ones trained in it (None: all trainable parameters; the others stay frozen)."""

    name: str = ALL_PARTS
    parameters: list[nn.Parameter] | None = None


class PreRankModel(nn.Module):
    """Base class. Subclasses set `name`, `Config` and implement the three stages; they may
    override the training hooks (module docstring) but never `forward`."""

    name: ClassVar[str] = ""
    Config: ClassVar[type] = object
    # False for models that cannot move work out of `score` (COLD, the ranking teacher).
    decoupled: ClassVar[bool] = True
    # True for models that rank and are not meant to pre-rank (the cascade's teacher).
    is_ranker: ClassVar[bool] = False
    # True where `score` lets candidates of one request interact (N-axis scores are not pointwise).
    listwise: ClassVar[bool] = False
    # What the model can be trained on: sample rows (BCE on the label) and/or cascade request lists.
    training_modes: ClassVar[tuple[str, ...]] = ("pointwise", "listwise")
    # On cascade lists: "hybrid" trains on the trainer's hybrid list loss plus `auxiliary_losses`;
    # "own" means the auxiliary losses are the whole list objective (the hybrid loss only on request).
    list_objective: ClassVar[Literal["hybrid", "own"]] = "hybrid"
    # True for a two-level model: `coarse_score` is a cheap pointwise first stage whose top-k the
    # full `score` re-scores (evaluated as a pipeline by `prerank.train.two_stage`).
    two_level: ClassVar[bool] = False

    def __init__(self, schema: Schema, config: Any) -> None:
        super().__init__()
        if model_schema(schema, config) != schema:
            raise ValueError(f"{self.name}: the schema's embedding dims differ from the config's embed_dim; build the "
                             "model with create_model (or on model_schema(schema, config))")
        self.schema = schema
        self.config = config
        self.phase = ALL_PARTS

    # -- the contract ---------------------------------------------------------------------------
    def encode_items(self, items: dict[str, Tensor]) -> State:
        """Item features {name: [M] or [M, S]} (bags and sequences [M, S]) -> item state {key: [M, ...]}:
        item-side features only."""
        raise NotImplementedError

    def encode_user(self, user: dict[str, Tensor]) -> State:
        """User and context features {name: [B] or [B, S]} -> user state {key: [B, ...]}."""
        raise NotImplementedError

    def score(self, user_state: State, item_state: State, mask: Tensor | None = None) -> Tensor:
        """User state {key: [B, ...]} and item state {key: [B, N, ...]} -> logits [B, N]; `mask` [B, N]
        bool marks the real candidates of padded lists (None: all are)."""
        raise NotImplementedError

    def score_shared(self, user_state: State, item_state: State) -> Tensor | None:
        """Every request against the same candidates: user state {key: [B, ...]} and one list's item
        state {key: [N, ...]} (not [B, N, ...]) -> logits [B, N], equal to `score` over B copies of
        the list; or None (the default) where the model has no faster way than `score`. A pointwise
        model whose scorer is a product of user and item factors says so here with one matrix
        product (whole-catalogue evaluation scores every user against the same catalogue chunk)."""
        return None

    # -- training hooks (defaults: the plain case) ----------------------------------------------
    def auxiliary_losses(self, batch: dict[str, Tensor], user_state: State, item_state: State, logits: Tensor) -> dict[str, Tensor]:
        """Extra training losses (already weighted), name -> scalar []. Only called in training mode;
        `batch` holds features [B] (rows, N = 1) or [B, N] (request lists, with "mask" [B, N]), the
        states are `batch_states(batch)` ([B, ...] and [B, N, ...]) and `logits` [B, N] `score`'s on them."""
        return {}

    def batch_states(self, batch: dict[str, Tensor]) -> tuple[State, State]:
        """(user state [B, ...], item state [B, N, ...]) of a batch whose candidates are known. The
        default runs the serving stages. A model may, in training, compute the same states more
        cheaply or together with what its `auxiliary_losses` need; outside training an override
        returns the serving stages (the contract tests check both: `forward` equals the stages'
        scores in either mode)."""
        return self.encode_user(self.user_inputs(batch)), self.encode_item_lists(self.item_inputs(batch))

    def on_training_forward(self) -> None:
        """Called before each training forward with gradients on (step-counted schedules, deferred
        codebook updates). Default: nothing."""

    def training_phases(self) -> list[TrainingPhase]:
        """The training plan: phases run in order, each a full training run (early stopping
        included) of its parameters. Default: one phase over all parameters."""
        return [TrainingPhase()]

    def enter_phase(self, name: str) -> None:
        """Switch what `score` and the losses serve (`self.phase`); `ALL_PARTS` outside training."""
        self.phase = name

    @contextlib.contextmanager
    def training_phase(self, phase: TrainingPhase) -> Iterator[None]:
        """Within the block: only the phase's parameters train and the model is in `phase.name`;
        afterwards trainability and the phase are restored."""
        trainable = {p: p.requires_grad for p in self.parameters()}
        chosen = None if phase.parameters is None else {id(p) for p in phase.parameters}
        try:
            if chosen is not None:
                for p in trainable:
                    p.requires_grad_(trainable[p] and id(p) in chosen)
            self.enter_phase(phase.name)
            yield
        finally:
            self.enter_phase(ALL_PARTS)
            for p, flag in trainable.items():
                p.requires_grad_(flag)

    def coarse_score(self, user_state: State, item_state: State) -> Tensor:
        """Two-level models only: user state {key: [B, ...]} and item state {key: [B, N, ...]} -> the
        cheap first stage's logits [B, N], pointwise along N."""
        raise NotImplementedError(f"{self.name} is not a two-level model")

    # -- built from the contract ----------------------------------------------------------------
    def user_inputs(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The user-side features of a batch, {name: [B] or [B, S]}: what `encode_user` reads."""
        return {f.name: batch[f.name] for f in self.schema.user_features}

    def item_inputs(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The item-side features of a batch, {name: [B, ...]} (rows) or {name: [B, N, ...]} (request
        lists): what `encode_items` / `encode_item_lists` read."""
        return {f.name: batch[f.name] for f in self.schema.item_features}

    def encode_item_lists(self, items: dict[str, Tensor]) -> State:
        """Item features with leading dims [B, N] (or [B]) -> item state with leading dims [B, N]."""
        ids = items[self.schema.item_id]
        lead = ids.shape if ids.dim() == 2 else (ids.shape[0], 1)
        flat = {k: v.reshape(lead[0] * lead[1], *v.shape[len(ids.shape):]) for k, v in items.items()}
        state = self.encode_items(flat)
        return {k: v.reshape(*lead, *v.shape[1:]) for k, v in state.items()}

    def forward(self, batch: dict[str, Tensor]) -> ModelOutput:
        """A batch of rows (item features [B]) or of request lists (item features [B, N] and
        `batch["mask"]` [B, N]) -> logits [B, N] and, in training, the auxiliary losses."""
        if self.training and torch.is_grad_enabled():
            self.on_training_forward()
        user_state, item_state = self.batch_states(batch)
        mask = batch.get(LIST_MASK)
        logits = self.score(user_state, item_state, mask.bool() if mask is not None else None)
        aux = self.auxiliary_losses(batch, user_state, item_state, logits) if self.training else {}
        return ModelOutput(logits, aux)

    def prepare_for_serving(self) -> None:
        """Turn this model into its cheapest inference form, once, on a model that will only serve
        (`load_artifact` calls it on the artifact's model): eval mode, no parameter needs a
        gradient, and every `MLP`'s BatchNorm folded into its linear layer. A model overriding it
        (to precompute user-independent constants of `score`, say) calls `super()` first. Scores
        may change by float rounding only; the model must not be trained afterwards."""
        self.eval()
        self.requires_grad_(False)
        for module in self.modules():
            if isinstance(module, MLP):
                module.fold_batch_norm()

    @torch.no_grad()
    def encode_catalogue(self, items: dict[str, Tensor], batch_size: int = 8192) -> State:
        """The item-state table: item features {name: [M, ...]} of a whole catalogue -> item state
        {key: [M, ...]}, `encode_items` run in chunks of `batch_size` rows (no gradients)."""
        n = len(items[self.schema.item_id])
        chunks = [self.encode_items({k: v[i : i + batch_size] for k, v in items.items()}) for i in range(0, n, batch_size)]
        return {k: torch.cat([c[k] for c in chunks]) for k in chunks[0]}

    @torch.no_grad()
    def predict(self, batch: dict[str, Tensor]) -> Tensor:
        """Pointwise probabilities [B] for rows whose item features have leading dim [B]."""
        return torch.sigmoid(self.forward(batch).logits.reshape(-1))

    def num_parameters(self) -> int:
        """The number of parameter elements (trainable or frozen)."""
        return sum(p.numel() for p in self.parameters())


def gather_items(table: State, rows: Tensor) -> State:
    """Item states of catalogue rows `rows` ([B, N] or [B]) from an item-state table {key: [M, ...]}
    -> {key: [B, N, ...]} (or [B, ...])."""
    rows = rows.long()
    return {k: v.index_select(0, rows.reshape(-1)).reshape(*rows.shape, *v.shape[1:]) for k, v in table.items()}


def padding_inputs(features) -> dict[str, Tensor]:
    """One row of padding values for `features` (schema `Feature`s), shaped as the serving path
    encodes one request or item: {name: [1] ids or dense values, [1, max_len] bags and sequences}."""
    inputs = {}
    for f in features:
        if f.kind is Kind.DENSE:
            inputs[f.name] = torch.zeros(1)
        elif f.is_bag:
            inputs[f.name] = torch.zeros(1, f.max_len, dtype=torch.long)
        else:
            inputs[f.name] = torch.zeros(1, dtype=torch.long)
    return inputs


# Built-in models and those of `prerank.models` entry points (read on first need; see registry.py).
REGISTRY = ModelRegistry(PreRankModel)


def register(cls: type[PreRankModel]) -> type[PreRankModel]:
    """Class decorator of the built-in models: adds `cls` to `REGISTRY` under its `name` (a model
    that defines `forward`, or a name already taken, fails here)."""
    return REGISTRY.add(cls)


# One dim for every table, or table (or feature) name -> dim; None keeps the schema's dims. Strict:
# a string or a bool is a mistake here, not a number.
EmbedDim = Annotated[int, pydantic.Field(strict=True, gt=0)]
EmbedDims = Optional[Union[EmbedDim, dict[str, EmbedDim]]]


def config_dataclass(cls):
    """Model configs: `prerank.config.config_dataclass` (wrong types, out-of-range values and unknown
    keys fail, naming the field).

    Every model config gets the field `embed_dim: EmbedDims = None` (last), so that no model
    file needs to declare it and every model takes it; a config that declares it (a default of its
    own) keeps its declaration."""
    declared = "embed_dim" in cls.__dict__.get("__annotations__", {})
    if not declared and not any("embed_dim" in getattr(base, "__dataclass_fields__", {}) for base in cls.__mro__):
        cls.__annotations__ = {**cls.__dict__.get("__annotations__", {}), "embed_dim": EmbedDims}
        cls.embed_dim = None
    return validated_config(cls)


def model_schema(schema: Schema, config: Any) -> Schema:
    """The schema a model with `config` is built on: the data's, with the config's `embed_dim`."""
    return schema.with_embed_dims(getattr(config, "embed_dim", None))


def make_config(name: str, overrides: dict | None = None):
    """Model `name`'s validated config from `overrides` (None: the defaults); a bad key or value
    raises `ConfigError` naming the model and the field."""
    cls = get_model_class(name)
    try:
        return cls.Config(**(overrides or {}))
    except ConfigError as err:
        raise ConfigError(f"config for model {name!r}", err.problems) from None


def get_model_class(name: str) -> type[PreRankModel]:
    """The model class registered as `name`, built-in or plugin; a ValueError that says why where
    there is none."""
    import prerank.models  # noqa: F401  (registers the models)

    return REGISTRY.lookup(name)


def create_model(name: str, schema: Schema, overrides: dict | None = None) -> PreRankModel:
    """Model `name` on the data `schema`, configured by `overrides` (its `embed_dim` sets the dims)."""
    config = make_config(name, overrides)
    try:
        built_on = model_schema(schema, config)
    except ValueError as err:
        raise ValueError(f"bad config for model {name!r}: {err}") from None
    return get_model_class(name)(built_on, config)


def config_to_dict(config) -> dict:
    """A model config as a plain dict (nested dataclasses too), as checkpoints and artifacts store it."""
    return dataclasses.asdict(config)
