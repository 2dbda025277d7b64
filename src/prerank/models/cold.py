"""COLD: Computing power cost-aware Online and Lightweight Deep pre-ranking system.

Wang et al., "COLD: Towards the Next Generation of Pre-Ranking System", DLP-KDD 2020
(arXiv 2007.16122). Spec: `shared/design/models/baselines-and-ranktower.md` §2.

COLD does not decouple: a single deep network (GwEN with an SE block) reads user, item and
user x item cross feature groups, so **all the work is in `score`**. To keep the one contract,
`encode_user` and `encode_items` return only the raw feature-group embeddings (lookups and
pooling, which are shareable per request / per item) and `score` builds the cross groups, runs
the SE block and the FCN for every (user, candidate) pair. The harness thereby measures what
not decoupling costs.

    e_1..e_M       embeddings of the M feature groups (user, item, dense and cross groups)
    s = sigmoid(W [e_1; ...; e_M] + b)       SE block (Eq. 2), s in R^M
    v_i = s_i e_i,   logit = FCN([v_1; ...; v_M])      FCN: 1024-512-256-128-64-1 (§4.1)
    linear_log(x) = -log(-x) - 1 (x < -1);  x (|x| <= 1);  log(x) + 1 (x > 1)      (Eq. 3, optional)

Feature-group selection (§3.2): train with every group, rank the groups by their mean SE weight
(`group_weights`) over an evaluation sample, keep the top k (`groups=[...]`) and retrain;
`prerank cold-select` (`prerank.cli.cold`) does both. A model built with `groups` embeds only the features those
groups read.

Readings we chose where the paper is silent or our data differ (config options):
- `se`: "concat" (default) reads Eq. 2 as one linear layer over the concatenated group
  embeddings (W in R^{M x sum dim e_i}; the paper's W in R^{k x M} is dimensionally a typo);
  "squeeze" first squeezes each group to its mean (W in R^{M x M}), the other reading of the
  text; "senet" is the IntTower repository's FiBiNET layer (mean squeeze, M -> M/2 -> M with
  ReLU, no bias, residual E + E * A), used by `cold@paper`.
- `cross`: public data have no logged user x ad cross features; "product" forms one cross
  group per (user field, item field) pair as the element-wise product of their embeddings;
  "none" drops them (the IntTower repository's COLD, and the paper's "no cross features" row).
- Dense features are groups too: value x a learned vector of the embedding dim.
- Embedding dim: the option `embed_dim` (default the data's, 32 on our ML-1M pipeline); the paper's is `embed_dim=16`.
- FCN activation ReLU with BatchNorm (`activation`, `batch_norm`); the paper names neither.
- The FCN's 2-way softmax output is one logit (equivalent).
- `linear_part`: the IntTower repository adds a logistic-regression term over all features.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from prerank.config import LayerSizes, NonEmptyStr
from prerank.data.schema import PAD_INDEX, Kind, Schema
from prerank.models.base import PreRankModel, State, config_dataclass, register
from prerank.models.layers import MLP, EmbeddingBank, TowerConfig, masked_mean

CROSS = "*"  # a cross group's name: "<user feature>*<item feature>"


@config_dataclass
class COLDConfig(TowerConfig):
    hidden: LayerSizes = (1024, 512, 256, 128, 64)  # () leaves one linear layer over the groups
    se: Literal["concat", "squeeze", "senet"] = "concat"
    cross: Literal["product", "none"] = "product"
    # The feature groups kept (None: all); see `feature_groups`.
    groups: Annotated[tuple[NonEmptyStr, ...], Field(min_length=1)] | None = None
    linear_log: bool = False
    linear_part: bool = False


def feature_groups(schema: Schema, cross: str = "product") -> list[str]:
    """Every feature group COLD can use on `schema`, in the model's order: user, item, cross."""
    user = [f.name for f in schema.user_features]
    item = [f.name for f in schema.item_features]
    crosses = [] if cross == "none" else [
        f"{u.name}{CROSS}{v.name}" for u in schema.user_features if u.is_id for v in schema.item_features if v.is_id
    ]
    return user + item + crosses


def linear_log(x: Tensor) -> Tensor:
    """Eq. 3: identity on [-1, 1], sign(x) (log|x| + 1) outside; C1-continuous. Elementwise: x of any
    shape (in `score`, [B, N, G·d]) -> the same shape."""
    return torch.where(x.abs() <= 1, x, torch.sign(x) * (torch.log(x.abs().clamp_min(1.0)) + 1))


class _SideEmbedder(nn.Module):
    """Raw embeddings of one side's chosen features: [..., F, d] (bags pooled, dense = value * w)."""

    def __init__(self, bank: EmbeddingBank, schema: Schema, names: list[str], dim: int, linear_part: bool) -> None:
        super().__init__()
        self.bank = bank
        self.dim = dim
        self.features = tuple(schema[n] for n in names)
        self.dense_vectors = nn.ParameterDict(
            {f.name: nn.Parameter(torch.randn(dim) * 0.1) for f in self.features if f.kind is Kind.DENSE}
        )
        self.linear = None
        if linear_part:
            self.linear = nn.ModuleDict(
                {f.name: nn.Embedding(f.vocab_size if f.is_id else 1, 1) for f in self.features}
            )
            for table in self.linear.values():
                nn.init.zeros_(table.weight)

    def forward(self, batch: dict[str, Tensor]) -> State:
        embedded, linear = [], []
        for f in self.features:
            x = batch[f.name]
            if f.kind is Kind.DENSE:
                embedded.append(x.float().unsqueeze(-1) * self.dense_vectors[f.name])
            else:
                e = self.bank.lookup(f, x)
                embedded.append(masked_mean(e, x != PAD_INDEX) if f.is_bag else e)
            if self.linear is not None:
                w = self.linear[f.name]
                if f.kind is Kind.DENSE:
                    linear.append(x.float() * w.weight[0, 0])
                elif f.is_bag:
                    linear.append(masked_mean(w(x), x != PAD_INDEX).squeeze(-1))
                else:
                    linear.append(w(x).squeeze(-1))
        lead = next(iter(batch.values())).shape[:1]
        state = {"fields": torch.stack(embedded, dim=-2) if embedded else torch.zeros(*lead, 0, self.dim)}
        if self.linear is not None:
            state["linear"] = torch.stack(linear, -1).sum(-1) if linear else torch.zeros(*lead)
        return state


class SEBlock(nn.Module):
    """Per-group weights s [..., G] from group embeddings E [..., G, d], and E re-weighted by them
    (G = the number of feature groups, the paper's M)."""

    def __init__(self, num_groups: int, dim: int, kind: str) -> None:
        super().__init__()
        self.kind = kind
        if kind == "concat":
            self.excite = nn.Linear(num_groups * dim, num_groups)
        elif kind == "squeeze":
            self.excite = nn.Linear(num_groups, num_groups)
        else:
            reduced = max(1, num_groups // 2)
            self.excite = nn.Sequential(nn.Linear(num_groups, reduced, bias=False), nn.ReLU(),
                                        nn.Linear(reduced, num_groups, bias=False), nn.ReLU())

    def weights(self, groups: Tensor) -> Tensor:
        """Group embeddings E [..., G, d] -> weights s [..., G]: sigmoid gates ("concat", "squeeze"),
        or the FiBiNET layer's non-negative ReLU outputs ("senet")."""
        if self.kind == "concat":
            return torch.sigmoid(self.excite(groups.flatten(-2)))
        if self.kind == "squeeze":
            return torch.sigmoid(self.excite(groups.mean(-1)))
        return self.excite(groups.mean(-1))

    def forward(self, groups: Tensor) -> tuple[Tensor, Tensor]:
        """E [..., G, d] -> (re-weighted groups [..., G, d]: s_i e_i, or e_i (1 + s_i) for "senet";
        the weights s [..., G])."""
        s = self.weights(groups)
        scaled = groups * (1.0 + s if self.kind == "senet" else s).unsqueeze(-1)
        return scaled, s


@register
class COLD(PreRankModel):
    name = "cold"
    Config = COLDConfig
    decoupled = False

    def __init__(self, schema: Schema, config: COLDConfig) -> None:
        super().__init__(schema, config)
        c = config
        available = feature_groups(schema, c.cross)
        if c.groups is None:
            chosen = set(available)
        else:
            unknown = [g for g in c.groups if g not in available]
            if unknown:
                raise ValueError(f"cold: unknown feature groups {unknown}; available: {available}")
            chosen = set(c.groups)
        kept = [g for g in available if g in chosen]
        crosses = [g.split(CROSS) for g in kept if CROSS in g]
        plain = [g for g in kept if CROSS not in g]
        # The features a side embeds: its own groups and those its cross groups read.
        needed = set(plain) | {n for pair in crosses for n in pair}
        # Groups are stacked into one [M, d] matrix for the SE block, so every table needs one dim.
        dims = {schema[n].vocab: schema[n].embed_dim for n in sorted(needed) if schema[n].is_id}
        if len(set(dims.values())) > 1:
            raise ValueError(f"cold: its feature groups are stacked and need one embedding dim, got {dims}: give every "
                             "table one dim in the option embed_dim")
        dim = next(iter(dims.values())) if dims else next(f.embed_dim for f in schema.features if f.is_id)
        self.user_feature_names = [f.name for f in schema.user_features if f.name in needed]
        self.item_feature_names = [f.name for f in schema.item_features if f.name in needed]
        self.embeddings = EmbeddingBank(schema, init_std=c.embed_init_std, only=tuple(needed))
        self.user_side = _SideEmbedder(self.embeddings, schema, self.user_feature_names, dim, c.linear_part)
        self.item_side = _SideEmbedder(self.embeddings, schema, self.item_feature_names, dim, c.linear_part)
        # Index of each group inside [user fields; item fields] (plain) or of the cross pair.
        side_index = {n: i for i, n in enumerate(self.user_feature_names + self.item_feature_names)}
        self.register_buffer("plain_index", torch.tensor([side_index[g] for g in plain], dtype=torch.long), persistent=False)
        self.register_buffer("cross_user", torch.tensor([side_index[u] for u, _ in crosses], dtype=torch.long), persistent=False)
        self.register_buffer("cross_item", torch.tensor([side_index[v] for _, v in crosses], dtype=torch.long), persistent=False)
        # Group order inside `score`: plain groups then crosses; `group_names` follows it.
        self.group_names = plain + [f"{u}{CROSS}{v}" for u, v in crosses]
        self.se = SEBlock(len(self.group_names), dim, c.se)
        self.fcn = nn.Sequential(
            MLP(len(self.group_names) * dim, tuple(c.hidden), activation=c.activation, batch_norm=c.batch_norm, dropout=c.dropout),
            nn.Linear(c.hidden[-1] if c.hidden else len(self.group_names) * dim, 1),
        )

    def encode_items(self, items: dict[str, Tensor]) -> State:
        """Raw item feature embeddings only: COLD's item work is all in `score`. Item features
        {name: [M] or [M, S]} -> {"fields": [M, F_v, d]} over the item features the kept groups read
        (bags pooled, a dense value times a learned [d] vector) and, with `linear_part`,
        {"linear": [M]}."""
        return self.item_side(items)

    def encode_user(self, user: dict[str, Tensor]) -> State:
        """Raw user feature embeddings only (shareable per request): the rest is in `score`. User
        features {name: [B] or [B, S]} -> {"fields": [B, F_u, d]} and, with `linear_part`,
        {"linear": [B]}."""
        return self.user_side(user)

    def _groups(self, user_state: State, item_state: State) -> Tensor:
        items = item_state["fields"]  # [B, N, Fv, d]
        users = user_state["fields"].unsqueeze(1).expand(-1, items.shape[1], -1, -1)  # [B, N, Fu, d]
        fields = torch.cat([users, items], dim=-2)
        plain = fields.index_select(-2, self.plain_index)
        cross = fields.index_select(-2, self.cross_user) * fields.index_select(-2, self.cross_item)
        return torch.cat([plain, cross], dim=-2)  # [B, N, M, d]

    def group_weights(self, user_state: State, item_state: State) -> Tensor:
        """The SE block's weight of every feature group for every pair: user state {"fields":
        [B, F_u, d]} and item state {"fields": [B, N, F_v, d]} -> [B, N, G] (order: `group_names`)."""
        return self.se.weights(self._groups(user_state, item_state))

    def score(self, user_state: State, item_state: State, mask: Tensor | None = None) -> Tensor:
        """User state {"fields": [B, F_u, d]} and item state {"fields": [B, N, F_v, d]} (with
        `linear_part`, "linear" [B] and [B, N]) -> logits [B, N]: cross groups, SE block and FCN for
        every (user, candidate) pair. Pointwise: `mask` is not needed."""
        weighted, _ = self.se(self._groups(user_state, item_state))
        x = weighted.flatten(-2)
        if self.config.linear_log:
            x = linear_log(x)
        logits = self.fcn(x).squeeze(-1)
        if self.config.linear_part:
            logits = logits + user_state["linear"].unsqueeze(-1) + item_state["linear"]
        return logits
