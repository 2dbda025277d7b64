"""RankTower (Yan & Li, "RankTower: A Synergistic Framework for Enhancing Two-Tower Pre-Ranking
Model", arXiv 2407.12385, 2024), as reconstructed in the design notes §6.3 (every equation [I]:
the paper's text beyond its abstract was not available).

(a) Multi-head gated network, per tower (x = the side's flattened field embeddings):
        h = MLP(x) in R^{H*d_h},  g = gate_scale * sigmoid(W_g x + b_g),  Z = reshape(h * g, [H, d_h])
(b) Gated cross-attention, bi-directional, per (user, item) pair, n_a attention heads over d_h:
        A_uv = softmax((Z_u W_Q^u)(Z_v W_K^v)^T / sqrt(d_h / n_a))           [H x H] per head
        C_u  = A_uv (Z_v W_V^v)
        G_u  = sigmoid([Z_u || C_u] W_G^u + b)
        Zh_u = LayerNorm(Z_u + G_u * C_u)        and symmetrically Zh_v with the roles swapped
(c) Maximum similarity, parameter-free:
        s(u, v) = sum_i max_j cos(Zh_u[i], Zh_v[j]),   logit = s / tau + b

Serving decomposition (hoisting, §6.4): everything that depends on one side only is computed in
that side's stage: Z, its query/key/value projections, the self half of the gate
(Z_u W_G^u[:d_h] + b), and the value stream pre-multiplied by the other side's cross half of the
gate (V_v W_G^u[d_h:]), because [Z_u || A V_v] W_G = Z_u W_G,self + A (V_v W_G,cross). What runs per
pair is the H x H attention both ways, two gate sigmoids, two LayerNorms and the sum-max cosine.

Readings chosen where the sources are silent (config options):
- `gate_scale` 2.0 (the 2*sigmoid gate of MaskNet/PEPNet keeps E[g] ~ 1); 0 disables the gate.
- `attention_heads` (n_a) 1; `symmetric_maxsim` False (user -> item direction only).
- `temperature` tau 0.1, fixed; `learn_bias` adds one scalar offset after the parameter-free
  MaxSim so that pointwise probabilities can be calibrated (ranking is unaffected).
- Sizes d_h = 64, H = 4, towers (256,) then the H*d_h linear output, mirroring IntTower's scale.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prerank.config import DropoutRate, LayerSizes, NonNegativeFloat, PositiveFloat, PositiveInt
from prerank.data.schema import Schema
from prerank.models.base import PreRankModel, State, config_dataclass, register
from prerank.models.layers import MLP, Activation, EmbeddingBank, FieldEncoder


@config_dataclass
class RankTowerConfig:
    heads: PositiveInt = 4  # H
    head_dim: PositiveInt = 64  # d_h
    hidden: LayerSizes = (256,)  # () leaves one linear layer to the heads
    activation: Activation = "relu"
    dropout: DropoutRate = 0.1
    gate_scale: NonNegativeFloat = 2.0
    attention_heads: PositiveInt = 1  # n_a
    symmetric_maxsim: bool = False
    temperature: PositiveFloat = 0.1
    learn_bias: bool = True
    embed_init_std: PositiveFloat = 0.01

    def __post_init__(self) -> None:
        if self.head_dim % self.attention_heads:
            raise ValueError(f"head_dim {self.head_dim} must be divisible by attention_heads {self.attention_heads}")


class GatedHeads(nn.Module):
    """The multi-head gated network of one tower, plus every projection of it that one side owns."""

    def __init__(self, in_dim: int, c: RankTowerConfig) -> None:
        super().__init__()
        width = c.heads * c.head_dim
        self.c = c
        self.mlp = nn.Sequential(MLP(in_dim, tuple(c.hidden), activation=c.activation, dropout=c.dropout), nn.Linear(c.hidden[-1] if c.hidden else in_dim, width))
        self.gate = nn.Linear(in_dim, width) if c.gate_scale else None
        self.query, self.key, self.value = (nn.Linear(c.head_dim, c.head_dim, bias=False) for _ in range(3))
        self.gate_self = nn.Linear(c.head_dim, c.head_dim)  # this side's gate, on its own heads
        self.gate_cross = nn.Linear(c.head_dim, c.head_dim, bias=False)  # this side's gate, on what it attends to
        self.norm = nn.LayerNorm(c.head_dim)

    def heads(self, x: Tensor) -> Tensor:
        """The side's flat fields x [..., in_dim] -> gated heads Z [..., H, d_h] (H = `heads`, d_h = `head_dim`)."""
        h = self.mlp(x)
        if self.gate is not None:
            h = h * self.c.gate_scale * torch.sigmoid(self.gate(x))
        return h.reshape(*x.shape[:-1], self.c.heads, self.c.head_dim)

    def state(self, x: Tensor, other: GatedHeads) -> State:
        """One side's hoisted state; `other` is the opposite tower (its cross gate reads our values).
        x [..., in_dim] -> {"heads" Z, "query", "key", "value", "gate_self", "value_gate"}, each
        [..., H, d_h]."""
        z = self.heads(x)
        value = self.value(z)
        return {"heads": z, "query": self.query(z), "key": self.key(z), "value": value,
                "gate_self": self.gate_self(z), "value_gate": other.gate_cross(value)}


@register
class RankTower(PreRankModel):
    """RankTower: multi-head gated towers, bi-directional gated cross-attention, max-similarity."""

    name = "ranktower"
    Config = RankTowerConfig

    def __init__(self, schema: Schema, config: RankTowerConfig) -> None:
        super().__init__(schema, config)
        self.embeddings = EmbeddingBank(schema, init_std=config.embed_init_std)
        self.user_fields = FieldEncoder(self.embeddings, schema.user_features)
        self.item_fields = FieldEncoder(self.embeddings, schema.item_features)
        self.user_tower = GatedHeads(self.user_fields.flat_dim, config)
        self.item_tower = GatedHeads(self.item_fields.flat_dim, config)
        self.bias = nn.Parameter(torch.zeros(()), requires_grad=config.learn_bias)

    def encode_items(self, items: dict[str, Tensor]) -> State:
        """Item features {name: [M] or [M, S]} -> the item tower's `GatedHeads.state`, six keys each [M, H, d_h]."""
        return self.item_tower.state(self.item_fields(items).flat(), self.user_tower)

    def encode_user(self, user: dict[str, Tensor]) -> State:
        """User features {name: [B] or [B, S]} -> the user tower's `GatedHeads.state`, six keys each [B, H, d_h]."""
        return self.user_tower.state(self.user_fields(user).flat(), self.item_tower)

    def _attend(self, query: Tensor, key: Tensor, value: Tensor, value_gate: Tensor) -> tuple[Tensor, Tensor]:
        """query [B, N, H, d_h] over key/value [B, N, H, d_h], n_a heads splitting d_h."""
        n_a = self.config.attention_heads
        split = lambda t: t.reshape(*t.shape[:-1], n_a, t.shape[-1] // n_a)  # noqa: E731
        q, k = split(query), split(key)
        weights = torch.einsum("bnihc,bnjhc->bnhij", q, k).div(math.sqrt(q.shape[-1])).softmax(-1)
        mix = lambda t: torch.einsum("bnhij,bnjhc->bnihc", weights, split(t)).flatten(-2)  # noqa: E731
        return mix(value), mix(value_gate)

    def score(self, user_state: State, item_state: State, mask: Tensor | None = None) -> Tensor:
        """User state {key: [B, H, d_h]} and item state {key: [B, N, H, d_h]} -> logits [B, N]: the
        gated cross-attention both ways and the sum-max cosine per (user, candidate) pair, / tau + b.
        Pointwise along N (the attention runs over one pair's heads): `mask` is not needed."""
        n = item_state["heads"].shape[1]
        user = {k: v.unsqueeze(1).expand(-1, n, *v.shape[1:]) for k, v in user_state.items()}
        user_context, user_gate_cross = self._attend(user["query"], item_state["key"], item_state["value"], item_state["value_gate"])
        item_context, item_gate_cross = self._attend(item_state["query"], user["key"], user["value"], user["value_gate"])
        user_heads = self.user_tower.norm(user["heads"] + torch.sigmoid(user["gate_self"] + user_gate_cross) * user_context)
        item_heads = self.item_tower.norm(item_state["heads"] + torch.sigmoid(item_state["gate_self"] + item_gate_cross) * item_context)
        cosine = torch.einsum("bnid,bnjd->bnij", F.normalize(user_heads, dim=-1), F.normalize(item_heads, dim=-1))
        similarity = cosine.amax(-1).sum(-1)
        if self.config.symmetric_maxsim:
            similarity = 0.5 * (similarity + cosine.amax(-2).sum(-1))
        return similarity / self.config.temperature + self.bias
