"""Two-Tower (DSSM-style) baseline.

Huang et al., "Learning Deep Structured Semantic Models for Web Search using Clickthrough Data",
CIKM 2013; configured as the IntTower repository's baseline (`model/dssm.py`), which is the
Two-Tower row of the IntTower and FIT tables:

    h_u = MLP_u([e_u1; ...; e_uF; dense_u])        user tower (behaviour sequence: masked mean, one field)
    h_v = MLP_v([e_v1; ...; e_vF; dense_v])        item tower
    logit(u, v) = sim(h_u, h_v) / tau + b          sim = cosine (default) or dot product

Readings we chose (config options):
- `temperature`: the IntTower code uses cosine with gamma = 1 (tau = 1), which confines the
  probability to [sigmoid(b-1), sigmoid(b+1)] and explains that table's poor log loss. Our
  default is a learnable temperature initialised at 0.05; `temperature=1.0,
  learn_temperature=False` reproduces the repository's baseline.
- Towers (300, 300, 128) with BatchNorm and ReLU, as in the repository.

Serving: the normalised item vector is the item state (offline); the user vector is computed once
per request; `score` is one dot product per candidate. Normalisation is hoisted out of `score`.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prerank.data.schema import Schema
from prerank.models.base import PreRankModel, State, config_dataclass, register
from prerank.models.layers import MLP, EmbeddingBank, FieldEncoder


@config_dataclass
class TwoTowerConfig:
    hidden: tuple[int, ...] = (300, 300, 128)
    activation: str = "relu"
    batch_norm: bool = True
    dropout: float = 0.0
    similarity: Literal["cosine", "dot"] = "cosine"
    temperature: float = 0.05
    learn_temperature: bool = True
    embed_init_std: float = 0.01


class TowerPair(nn.Module):
    """The two MLP towers over one shared embedding bank: reused by models built on a two-tower."""

    def __init__(self, schema: Schema, hidden, activation, batch_norm, dropout, embed_init_std, output_activation=False,
                 user_extra_dim: int = 0) -> None:
        super().__init__()
        self.embeddings = EmbeddingBank(schema, init_std=embed_init_std)
        self.user_fields = FieldEncoder(self.embeddings, schema.user_features)
        self.item_fields = FieldEncoder(self.embeddings, schema.item_features)
        mlp = dict(activation=activation, batch_norm=batch_norm, dropout=dropout, output_activation=output_activation)
        # `user_extra_dim`: inputs a model appends to the user fields (e.g. FIT's attention output).
        self.user_tower = MLP(self.user_fields.flat_dim + user_extra_dim, tuple(hidden), **mlp)
        self.item_tower = MLP(self.item_fields.flat_dim, tuple(hidden), **mlp)


@register
class TwoTower(PreRankModel):
    name = "two_tower"
    Config = TwoTowerConfig

    def __init__(self, schema: Schema, config: TwoTowerConfig) -> None:
        super().__init__(schema, config)
        c = config
        # The last tower layer is linear so the vector can take any sign (a ReLU output would
        # confine the cosine to [0, 1]).
        self.towers = TowerPair(schema, c.hidden, c.activation, c.batch_norm, c.dropout, c.embed_init_std)
        self.log_inv_temperature = nn.Parameter(torch.tensor(-math.log(c.temperature)), requires_grad=c.learn_temperature)
        self.bias = nn.Parameter(torch.zeros(()))

    def _vector(self, tower: nn.Module, fields: Tensor) -> Tensor:
        vec = tower(fields)
        return F.normalize(vec, dim=-1) if self.config.similarity == "cosine" else vec

    def encode_items(self, items: dict[str, Tensor]) -> State:
        return {"vector": self._vector(self.towers.item_tower, self.towers.item_fields(items).flat())}

    def encode_user(self, user: dict[str, Tensor]) -> State:
        return {"vector": self._vector(self.towers.user_tower, self.towers.user_fields(user).flat())}

    def score(self, user_state: State, item_state: State, mask: Tensor | None = None) -> Tensor:
        scale = self.log_inv_temperature.clamp(max=math.log(100.0)).exp()
        return torch.einsum("bd,bnd->bn", user_state["vector"], item_state["vector"]) * scale + self.bias
