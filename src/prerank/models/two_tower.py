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

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prerank.config import PositiveFloat
from prerank.data.schema import Schema
from prerank.models.base import PreRankModel, State, config_dataclass, register
from prerank.models.layers import LearnableTemperature, TowerConfig, TowerPair, batched_dot


@config_dataclass
class TwoTowerConfig(TowerConfig):
    """Tower fields (`TowerConfig`'s defaults) plus the similarity and its temperature."""

    similarity: Literal["cosine", "dot"] = "cosine"
    temperature: PositiveFloat = 0.05
    learn_temperature: bool = True


@register
class TwoTower(PreRankModel):
    name = "two_tower"
    Config = TwoTowerConfig

    def __init__(self, schema: Schema, config: TwoTowerConfig) -> None:
        super().__init__(schema, config)
        self.towers = TowerPair(schema, config)  # the last tower layer is linear
        self.similarity_scale = LearnableTemperature(config.temperature, learnable=config.learn_temperature)
        self.bias = nn.Parameter(torch.zeros(()))

    def _vector(self, tower: nn.Module, fields: Tensor) -> Tensor:
        vec = tower(fields)
        return F.normalize(vec, dim=-1) if self.config.similarity == "cosine" else vec

    def encode_items(self, items: dict[str, Tensor]) -> State:
        """Item features {name: [M] or [M, S]} -> {"vector": h_v [M, D]} (D = hidden[-1]),
        L2-normalised under cosine so that `score` is one dot product."""
        return {"vector": self._vector(self.towers.item_tower, self.towers.item_fields(items).flat())}

    def encode_user(self, user: dict[str, Tensor]) -> State:
        """User features {name: [B] or [B, S]} -> {"vector": h_u [B, D]}, L2-normalised under cosine."""
        return {"vector": self._vector(self.towers.user_tower, self.towers.user_fields(user).flat())}

    def score(self, user_state: State, item_state: State, mask: Tensor | None = None) -> Tensor:
        """User state {"vector": [B, D]} and item state {"vector": [B, N, D]} -> logits [B, N] =
        sim / tau + b. Pointwise: `mask` is not needed."""
        return batched_dot(user_state["vector"], item_state["vector"]) * self.similarity_scale() + self.bias

    def score_shared(self, user_state: State, item_state: State) -> Tensor:
        """{"vector": [B, D]} against one list {"vector": [N, D]} -> logits [B, N] (one matmul)."""
        return user_state["vector"] @ item_state["vector"].T * self.similarity_scale() + self.bias
