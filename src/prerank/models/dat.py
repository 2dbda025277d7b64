"""DAT: the Dual Augmented Two-tower model.

Yu, Wang, Feng, Xue, "A Dual Augmented Two-tower Model for Online Large-scale Recommendation",
DLP-KDD 2021. Spec: `shared/design/models/baselines-and-ranktower.md` §3. Not the IntTower
repository's `DAT.py`, whose augmented vectors are fresh random tensors on every forward pass.

Towers (Eq. 1), over inputs augmented with a learned vector per user id / item id:

    z_u = [e_u1; ...; e_uF; dense_u; a_u],    z_v = [e_v1; ...; e_vF; dense_v; a_v]
    h_l = ReLU(W_l h_{l-1} + b_l),  l = 1..L  (256, 128, 32),      p = h_L / |h_L|
    logit(u, v) = <p_u, p_v> / tau + b

Adaptive-Mimic Mechanism (Eq. 2), sg = stop-gradient, T = rows in the batch:

    loss_u = (1/T) sum y * |a_u - sg(p_v)|^2,      loss_v = (1/T) sum y * |a_v - sg(p_u)|^2

Category Alignment Loss (Eq. 3), per batch, C = unbiased covariance of a category's p_v:

    loss_CA = sum_{i != major} |C(S_major) - C(S_i)|_F^2

with S_major the category with the most rows in the batch; categories with fewer than two rows
are skipped. Total (Eq. 5): BCE + lambda1 loss_u + lambda2 loss_v + lambda3 loss_CA, with
lambda1 = lambda2 = 0.5 and lambda3 = 1 as in the paper.

Readings we chose where the paper is silent (config options):
- `temperature` / `output_bias`: the paper scores sigmoid(<p_u, p_v>) with no scale; with a ReLU
  last layer the cosine lies in [0, 1] and the probability in [0.5, 0.73]. Our default is a
  learnable temperature (initial 0.05) and a bias, as for our Two-Tower; `temperature=1,
  learn_temperature=False` is the IntTower repository's cos x gamma + b with gamma = 1.
- `last_relu`: the paper applies ReLU to the last layer too; we do not by default. With sampled
  negatives (4 per positive on Amazon Beauty) the towers learn to put users and items on
  disjoint ReLU supports, where every cosine is 0 and the dead units pass no gradient: one epoch
  on a quarter of Beauty's training rows ended at valid AUC 0.5000 with 12 and 13 of 32 output
  units ever active, against 0.659 without the last ReLU. `last_relu: true` is the paper's tower.
- "[.]^2" of a vector: squared L2 norm summed over dims, averaged over the T rows.
- Negatives: the paper samples S random items per positive; our harness trains on the logged
  labelled rows (ML-1M: explicit negatives), like every other model here.
- `category_feature`: the item feature used as category. "auto" takes the first item-side
  categorical or multi-valued feature after the item id (ML-1M: `genres`). `multi_category`
  says how an item with several values (a movie's genres) maps to categories: "first" (default)
  counts it in its first-listed value only (ML-1M lists a movie's genres in a fixed order, so
  this is one primary genre per movie); "each" counts it in every one of its categories.
  Covariances are over the batch's rows (an item seen in two rows counts twice).
- The augmented vectors have the tower's output dim (needed to compare a_u with p_v) and train
  from the main loss through their tower too; only p is stopped in the mimic losses.

Serving: a_v is folded into p_v offline, a_u into p_u once per request; `score` is one dot
product per candidate. The states hold p alone, in training as in serving: the mimic losses look
a_u and a_v up again from the batch's ids.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prerank.config import NonEmptyStr, NonNegativeFloat, PositiveFloat
from prerank.data.schema import PAD_INDEX, Kind, Schema, Side
from prerank.models.base import PreRankModel, State, config_dataclass, register
from prerank.models.layers import MLP, EmbeddingBank, FieldEncoder, LearnableTemperature, TowerConfig, TowerLayers, batched_dot


@config_dataclass
class DATConfig(TowerConfig):
    hidden: TowerLayers = (256, 128, 32)
    batch_norm: bool = False
    last_relu: bool = False  # the paper's towers end in a ReLU (module docstring)
    temperature: PositiveFloat = 0.05
    learn_temperature: bool = True
    output_bias: bool = True
    mimic_user_weight: NonNegativeFloat = 0.5  # lambda1
    mimic_item_weight: NonNegativeFloat = 0.5  # lambda2
    category_weight: NonNegativeFloat = 1.0  # lambda3; 0 switches the Category Alignment Loss off
    category_feature: NonEmptyStr = "auto"
    multi_category: Literal["first", "each"] = "first"


@register
class DAT(PreRankModel):
    name = "dat"
    Config = DATConfig
    # Sample rows only: the mimic and category-alignment losses are per labelled row.
    training_modes = ("pointwise",)

    def __init__(self, schema: Schema, config: DATConfig) -> None:
        super().__init__(schema, config)
        c = config
        dim = c.hidden[-1]
        self.embeddings = EmbeddingBank(schema, init_std=c.embed_init_std)
        self.user_fields = FieldEncoder(self.embeddings, schema.user_features)
        self.item_fields = FieldEncoder(self.embeddings, schema.item_features)
        self.user_augment = nn.Embedding(schema[schema.user_id].vocab_size, dim, padding_idx=PAD_INDEX)
        self.item_augment = nn.Embedding(schema[schema.item_id].vocab_size, dim, padding_idx=PAD_INDEX)
        for table in (self.user_augment, self.item_augment):
            nn.init.normal_(table.weight, std=c.embed_init_std)
        mlp = dict(activation=c.activation, batch_norm=c.batch_norm, dropout=c.dropout, output_activation=c.last_relu)
        self.user_tower = MLP(self.user_fields.flat_dim + dim, tuple(c.hidden), **mlp)
        self.item_tower = MLP(self.item_fields.flat_dim + dim, tuple(c.hidden), **mlp)
        self.similarity_scale = LearnableTemperature(c.temperature, learnable=c.learn_temperature)
        self.bias = nn.Parameter(torch.zeros(())) if c.output_bias else None
        self.category_feature = self._category_feature(schema, c) if c.category_weight > 0 else None

    @staticmethod
    def _category_feature(schema: Schema, c: DATConfig) -> str:
        if c.category_feature == "auto":
            for f in schema.item_features:
                if f.name != schema.item_id and f.kind in (Kind.CATEGORICAL, Kind.MULTI_CATEGORICAL):
                    return f.name
            raise ValueError("dat: the schema has no item-side categorical feature for the Category Alignment Loss; "
                             "set category_weight=0")
        if c.category_feature not in schema:
            raise ValueError(f"dat: category_feature {c.category_feature!r} is not in the schema")
        f = schema[c.category_feature]
        if f.side is not Side.ITEM or f.kind not in (Kind.CATEGORICAL, Kind.MULTI_CATEGORICAL):
            raise ValueError(f"dat: category_feature {c.category_feature!r} must be an item-side categorical feature")
        return f.name

    def _encode(self, fields: FieldEncoder, augment: nn.Embedding, tower: MLP, features: dict[str, Tensor], key: str) -> State:
        a = augment(features[key])
        return {"vector": F.normalize(tower(torch.cat([fields(features).flat(), a], dim=-1)), dim=-1)}

    def encode_items(self, items: dict[str, Tensor]) -> State:
        """Item features {name: [M] or [M, S]} -> {"vector": p_v [M, D]} (D = hidden[-1], unit norm,
        the augmented vector a_v among the tower's inputs)."""
        return self._encode(self.item_fields, self.item_augment, self.item_tower, items, self.schema.item_id)

    def encode_user(self, user: dict[str, Tensor]) -> State:
        """User features {name: [B] or [B, S]} -> {"vector": p_u [B, D]} (unit norm, a_u among the
        tower's inputs)."""
        return self._encode(self.user_fields, self.user_augment, self.user_tower, user, self.schema.user_id)

    def score(self, user_state: State, item_state: State, mask: Tensor | None = None) -> Tensor:
        """User state {"vector": [B, D]} and item state {"vector": [B, N, D]} -> logits [B, N] =
        <p_u, p_v> / tau (+ b). Pointwise: `mask` is not needed."""
        logits = batched_dot(user_state["vector"], item_state["vector"]) * self.similarity_scale()
        return logits + self.bias if self.bias is not None else logits

    def score_shared(self, user_state: State, item_state: State) -> Tensor:
        """{"vector": [B, D]} against one list {"vector": [N, D]} -> logits [B, N] (one matmul)."""
        logits = user_state["vector"] @ item_state["vector"].T * self.similarity_scale()
        return logits + self.bias if self.bias is not None else logits

    def auxiliary_losses(self, batch, user_state, item_state, logits) -> dict[str, Tensor]:
        """Pointwise batches only (N = 1): the batch's label, user and item ids [B] and category ids [B]
        or [B, S], the states {"vector": [B, D]} and {"vector": [B, 1, D]} and logits [B, 1] -> the
        weighted scalars [] "mimic_user", "mimic_item" (Eq. 2) and, unless `category_weight` is 0,
        "category_alignment" (Eq. 3)."""
        if logits.shape[1] != 1:
            raise ValueError("dat: the mimic and category losses are defined for pointwise batches (one item per row)")
        c = self.config
        label = batch[self.schema.label].reshape(-1)
        p_u, p_v = user_state["vector"], item_state["vector"][:, 0]
        # The augmented vectors are looked up again rather than kept in the states, which stay the
        # serving states (a lookup per row is cheap).
        a_u = self.user_augment(batch[self.schema.user_id])
        a_v = self.item_augment(batch[self.schema.item_id].reshape(-1))
        losses = {
            "mimic_user": c.mimic_user_weight * mimic_loss(a_u, p_v, label),
            "mimic_item": c.mimic_item_weight * mimic_loss(a_v, p_u, label),
        }
        if self.category_feature is not None:
            ids = batch[self.category_feature]
            ids = ids.reshape(len(label), -1)
            membership = category_membership(ids, self.schema[self.category_feature].vocab_size, c.multi_category)
            losses["category_alignment"] = c.category_weight * category_alignment_loss(p_v, membership)
        return losses


def mimic_loss(augment: Tensor, target: Tensor, label: Tensor) -> Tensor:
    """(1/T) sum_rows y * |a - sg(p)|^2 (Eq. 2): `augment` a [T, D], `target` p [T, D], `label` y [T]
    -> []. Only positive rows pull `augment` towards `target`."""
    return (label * (augment - target.detach()).pow(2).sum(-1)).mean()


def category_membership(ids: Tensor, vocab_size: int, mode: str) -> Tensor:
    """[B, K] 0/1 membership of each row's item in each category, from category ids [B, L] (0 = padding)."""
    if mode == "first":
        ids = ids[:, :1]
    onehot = torch.zeros(ids.shape[0], vocab_size, device=ids.device)
    onehot.scatter_(1, ids.long(), 1.0)
    onehot[:, PAD_INDEX] = 0.0
    return onehot


def category_alignment_loss(vectors: Tensor, membership: Tensor) -> Tensor:
    """sum over categories i != major of |C(S_major) - C(S_i)|_F^2 (Eq. 3); C unbiased, |S_i| >= 2:
    `vectors` p_v [B, D], `membership` [B, K] (`category_membership`) -> []."""
    counts = membership.sum(0)
    kept = counts >= 2
    if kept.sum() < 2:
        return vectors.sum() * 0.0
    membership, counts = membership[:, kept], counts[kept]
    means = membership.T @ vectors / counts[:, None]  # [K, d]
    # Second moments from the (row, category) pairs alone: a row is in one category or a few, so a
    # dense [B, K] x [B, d, d] contraction spends nearly all its work on zeros (on Amazon Beauty's
    # 443 first attributes it cost more than the rest of the training step).
    rows, categories = membership.nonzero(as_tuple=True)
    weight = membership[rows, categories][:, None, None]
    second = vectors.new_zeros(membership.shape[1], vectors.shape[1], vectors.shape[1]).index_add_(
        0, categories, weight * vectors[rows, :, None] * vectors[rows, None, :])
    cov = (second - counts[:, None, None] * torch.einsum("ki,kj->kij", means, means)) / (counts[:, None, None] - 1)
    major = int(torch.argmax(counts))
    return (cov - cov[major]).pow(2).sum((-1, -2)).sum()
