"""LT-TTD: a listwise transformer over a two-tower encoder, trained with two-tower distillation.

Abraich, "Theoretical Guarantees for LT-TTD: A Unified Transformer-based Architecture for
Two-Level Ranking Systems", arXiv 2505.04434, 2025. Only the abstract and secondary summaries
were readable (design notes `fit-tarq-lttd.md` §3): the architecture is known in outline, the
distillation equations, loss weights and UPQE are not public. Everything marked [I] below is a
proposal of the notes (§3.3) or ours, and is a config option.

Two-Tower Encoder (TTE), per side (user q / item i), over the side's field embeddings e^1..e^F
(bags and the behaviour sequence masked-mean pooled, dense features one extra field):

    h^j   = act(W_j e^j + b_j)                      per-field hidden state          [I] per-field projection
    alpha = softmax_j(w^T h^j)                      attention-based adaptive pooling [S]
    e     = MLP(sum_j alpha_j h^j)                  e_q, e_i in R^d (L2-normalised for cosine)
    r     = MLP_r([e^1; ...; e^F; dense])           residual extractor, r_q, r_i in R^{d_r}   [S]
    s(q, i) = <e_q, e_i>,   TTE logit t(q, i) = s(q, i) / tau + b                   (as `two_tower`)

Listwise Transformer (LT) over a request's candidate list i_1..i_N [S]:

    x_j = [e_q; e_{i_j}; r_q; r_{i_j}; s(q, i_j)]   (2d + 2d_r + 1)
    o   = w_o^T TransformerEncoder(W_in x)_j + b_o  one score per candidate          [I] linear head

Losses (training only, returned by `auxiliary_losses`, already weighted; §3.3 proposals [I]):

    L_ret  = mean_requests mean_{p in P} softplus(LSE_{n in Neg} t(q, n) - t(q, p))
             sampled softmax: each positive p (relevance >= `retrieval_min_relevance`) against the
             request's other list items and, with `retrieval_negatives = "list+batch"`, every item
             of the other requests of the batch (in-batch negatives)
    L_rank = ListNet: - sum_j g_j log softmax(o)_j,  g = (2^rel - 1) / sum(2^rel - 1) over the list
    L_down = T^2 KL(sg(softmax(o / T)) || softmax(t / T))   LT -> TTE ("two-tower distillation")
    L_up   = T^2 KL(sg(softmax(t / T)) || softmax(o / T))   TTE -> LT (consistency)
    L      = w_ret L_ret + w_rank L_rank + lambda_KD (w_down L_down + w_up L_up)

`mode = "disjoint"` is the baseline the paper's claim is measured against: the TTE trains alone on
L_ret, is frozen, then the LT trains on L_rank (+ lambda_KD w_up L_up from the frozen TTE). The model
says so through its training plan (`training_phases`: phase "two_tower" trains the TTE, in which
`score` is the TTE; phase "transformer" the rest), which the trainer runs in order.

Readings chosen where the sources are silent (config options):
- `similarity` cosine (bounded, so s is a well-scaled token feature) with a learnable temperature
  initialised at 0.05, as our `two_tower`; `dot` is the other choice.
- `pooling` "attention" (the paper's adaptive pooling); "mean" pools fields uniformly.
- Residual extractors read the flattened fields (cross-field information the per-field pooling
  cannot express); `residual_dim = 0` drops them. They feed only the LT, so in disjoint mode they
  train with the LT in phase 2 (on the frozen embeddings), not with the TTE.
- `list_attention = False` is an ablation, not the paper: each candidate attends only to itself,
  so the LT becomes a pointwise scorer over the same tokens (what the list context adds).
- No positional encoding: the candidate list is a set (and the cascade's row order would leak
  stages); the LT is permutation-equivariant.
- The LT attends only over valid candidates: `score` takes an optional `mask` [B, N] (padding of
  padded request lists); without it every candidate counts, which is the serving case.
- Positives of L_ret: relevance >= 3, the liked items (rating >= 4) under the cascade's default
  grading, the same items the evaluation counts as relevant. Pointwise batches (no lists) use the
  label. L_rank runs over the whole list (all stages), with the cascade's graded relevance.
- lambda_KD 0.5, w_down 1, w_up 0.25 (notes: mu = 0.1-0.5), T 1; transformer 2 layers, 4 heads,
  d_model 64, pre-norm, feed-forward 128, dropout 0.1. No BatchNorm anywhere, so freezing the TTE
  freezes it completely.

Serving: item state = (e_i, r_i) offline; user state = (e_q, r_q) once per request; `score`
runs the LT across the request's N candidates in one call (O(l (N^2 d_m + N d_m^2))), so its
scores are not pointwise (`listwise = True`). `coarse_score` is the TTE stage alone (a dot product
per candidate), what a two-level pipeline runs before the LT (`two_level = True`,
`prerank.train.two_stage`). On cascade lists the model's own losses are its objective
(`list_objective = "own"`); the hybrid list loss is added only on request.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prerank.config import DropoutRate, LayerSizes, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt
from prerank.data.schema import Schema
from prerank.data.table import LABEL
from prerank.models.base import ALL_PARTS, PreRankModel, State, TrainingPhase, config_dataclass, register
from prerank.models.layers import ACTIVATIONS, MLP, Activation, EmbeddingBank, FieldEncoder, LearnableTemperature
from prerank.models.list_losses import NEG, distillation_loss, listnet_loss



@config_dataclass
class LTTDConfig:
    # two-tower encoder
    dim: PositiveInt = 64  # d
    field_hidden: PositiveInt = 64  # per-field hidden state size
    tower_hidden: LayerSizes = (128,)
    residual_dim: NonNegativeInt = 16  # d_r; 0 disables the residual extractors
    residual_hidden: LayerSizes = (128,)
    activation: Activation = "relu"
    pooling: Literal["attention", "mean"] = "attention"
    similarity: Literal["cosine", "dot"] = "cosine"
    temperature: PositiveFloat = 0.05
    learn_temperature: bool = True
    embed_init_std: PositiveFloat = 0.01
    # listwise transformer
    model_dim: PositiveInt = 64
    layers: PositiveInt = 2
    heads: PositiveInt = 4
    feedforward: PositiveInt = 128
    dropout: DropoutRate = 0.1
    # False: each candidate attends only to itself (an ablation: the same tokens, no list context)
    list_attention: bool = True
    # losses
    mode: Literal["joint", "disjoint"] = "joint"
    retrieval_weight: NonNegativeFloat = 1.0  # w_ret
    rank_weight: NonNegativeFloat = 1.0  # w_rank
    kd_weight: NonNegativeFloat = 0.5  # lambda_KD
    kd_down_weight: NonNegativeFloat = 1.0  # w_down: LT -> TTE
    kd_up_weight: NonNegativeFloat = 0.25  # w_up: TTE -> LT
    kd_temperature: PositiveFloat = 1.0  # T
    retrieval_negatives: Literal["list", "list+batch"] = "list+batch"
    retrieval_min_relevance: PositiveInt = 3

    def __post_init__(self) -> None:
        if self.model_dim % self.heads:
            raise ValueError(f"model_dim {self.model_dim} must be divisible by heads {self.heads}")


class FieldPoolingEncoder(nn.Module):
    """One side of the TTE: per-field hidden states, adaptive (attention) pooling, a tower to R^d;
    plus the residual extractor over the flattened fields."""

    def __init__(self, fields: FieldEncoder, c: LTTDConfig) -> None:
        super().__init__()
        self.fields = fields
        n, e, h = fields.num_fields, fields.embed_dim, c.field_hidden
        self.field_weight = nn.Parameter(torch.empty(n, e, h))
        self.field_bias = nn.Parameter(torch.zeros(n, h))
        # nn.Linear's default init with the fan-in of all fields together (bound 1/sqrt(F e)): the
        # per-field states then start at the scale of one Linear over the flattened fields.
        nn.init.kaiming_uniform_(self.field_weight.view(n * e, h).T, a=math.sqrt(5))
        self.dense = nn.Linear(fields.num_dense, h) if fields.num_dense else None
        self.act = ACTIVATIONS[c.activation]()
        self.pool = nn.Linear(h, 1, bias=False) if c.pooling == "attention" else None
        self.tower = MLP(h, (*c.tower_hidden, c.dim), activation=c.activation, output_activation=False)
        self.residual = (MLP(fields.flat_dim, (*c.residual_hidden, c.residual_dim), activation=c.activation, output_activation=False)
                         if c.residual_dim else None)
        self.cosine = c.similarity == "cosine"

    def forward(self, batch: dict[str, Tensor]) -> State:
        """One side's features {name: [...] or [..., S]} (leading dims [B] or [M]) -> {"vector": e
        [..., d] (unit norm under cosine), "residual": r [..., d_r] ([..., 0] with `residual_dim` 0)}."""
        f = self.fields(batch)
        hidden = torch.einsum("...fe,feh->...fh", f.embeddings, self.field_weight) + self.field_bias
        if self.dense is not None:
            hidden = torch.cat([hidden, self.dense(f.dense).unsqueeze(-2)], dim=-2)
        hidden = self.act(hidden)
        if self.pool is not None:
            pooled = (self.pool(hidden).softmax(-2) * hidden).sum(-2)
        else:
            pooled = hidden.mean(-2)
        vector = self.tower(pooled)
        if self.cosine:
            vector = F.normalize(vector, dim=-1)
        flat = f.flat()
        residual = self.residual(flat) if self.residual is not None else flat.new_zeros(*flat.shape[:-1], 0)
        return {"vector": vector, "residual": residual}


def sampled_softmax_loss(user: Tensor, items: Tensor, positive: Tensor, mask: Tensor, scale: Tensor, bias: Tensor,
                         in_batch: bool) -> Tensor:
    """L_ret. `user` [B, d], `items` [B, N, d], `positive`/`mask` [B, N] bool, `scale` and `bias` []
    -> []. Each positive against its own list's non-positives and (in_batch) all valid items of the
    other requests; requests without a positive or a negative are left out."""
    b = user.shape[0]
    own = torch.einsum("bd,bnd->bn", user, items) * scale + bias
    negative = mask & ~positive
    neg_logits = own.masked_fill(~negative, NEG)
    if in_batch and b > 1:
        cross = torch.einsum("bd,cnd->bcn", user, items) * scale + bias  # [B, B, N]
        other = mask.unsqueeze(0).expand(b, -1, -1) & ~torch.eye(b, dtype=torch.bool, device=user.device).unsqueeze(-1)
        neg_logits = torch.cat([neg_logits, cross.masked_fill(~other, NEG).reshape(b, -1)], dim=1)
    neg_lse = torch.logsumexp(neg_logits, dim=1, keepdim=True)
    has_negative = (neg_logits > NEG / 2).any(1)
    per_positive = F.softplus(neg_lse - own).masked_fill(~positive, 0.0)
    count = positive.sum(1)
    per_request = per_positive.sum(1) / count.clamp_min(1)
    defined = (count > 0) & has_negative
    return per_request[defined].mean() if defined.any() else own.new_zeros(())


def list_kl(target_logits: Tensor, student_logits: Tensor, mask: Tensor, temperature: float) -> Tensor:
    """T^2 KL(sg(softmax(target / T)) || softmax(student / T)) over each list's valid items: logits
    and `mask` [B, N] -> [], the mean over requests with >= 2 valid items."""
    t = temperature
    return t * t * distillation_loss(student_logits / t, target_logits.detach(), mask, t)


@register
class LTTD(PreRankModel):
    """LT-TTD: two-tower encoder, listwise transformer over the candidate list, bidirectional KD."""

    name = "lttd"
    Config = LTTDConfig
    listwise = True
    list_objective = "own"
    two_level = True

    def __init__(self, schema: Schema, config: LTTDConfig) -> None:
        super().__init__(schema, config)
        c = config
        self.embeddings = EmbeddingBank(schema, init_std=c.embed_init_std)
        self.user_encoder = FieldPoolingEncoder(FieldEncoder(self.embeddings, schema.user_features), c)
        self.item_encoder = FieldPoolingEncoder(FieldEncoder(self.embeddings, schema.item_features), c)
        self.similarity_scale = LearnableTemperature(c.temperature, learnable=c.learn_temperature)
        self.bias = nn.Parameter(torch.zeros(()))
        self.token = nn.Linear(2 * c.dim + 2 * c.residual_dim + 1, c.model_dim)
        layer = nn.TransformerEncoderLayer(c.model_dim, c.heads, c.feedforward, c.dropout, batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, c.layers, enable_nested_tensor=False)
        self.head = nn.Sequential(nn.LayerNorm(c.model_dim), nn.Linear(c.model_dim, 1))

    # -- the training plan ----------------------------------------------------------------------
    def training_phases(self) -> list[TrainingPhase]:
        """Joint: one phase. Disjoint: the TTE alone ("two_tower", `score` is the TTE), then the LT and
        the residual extractors, which feed only the LT ("transformer", the TTE frozen)."""
        if self.config.mode == "joint":
            return [TrainingPhase()]
        tte = self.two_tower_parameters()
        in_tte = {id(p) for p in tte}
        return [TrainingPhase("two_tower", tte), TrainingPhase("transformer", [p for p in self.parameters() if id(p) not in in_tte])]

    def two_tower_parameters(self) -> list[nn.Parameter]:
        """The TTE's parameters: embeddings, per-field encoders and towers, temperature and bias."""
        residual = {id(p) for enc in (self.user_encoder, self.item_encoder) if enc.residual is not None for p in enc.residual.parameters()}
        tte = [*self.embeddings.parameters(), *self.user_encoder.parameters(), *self.item_encoder.parameters(),
               *self.similarity_scale.parameters(), self.bias]
        return [p for p in tte if id(p) not in residual]

    # -- the contract ---------------------------------------------------------------------------
    def encode_items(self, items: dict[str, Tensor]) -> State:
        """Item features [M] -> {"vector": e_i [M, d], "residual": r_i [M, d_r]}."""
        return self.item_encoder(items)

    def encode_user(self, user: dict[str, Tensor]) -> State:
        """User features [B] -> {"vector": e_q [B, d], "residual": r_q [B, d_r]}."""
        return self.user_encoder(user)

    def similarity(self, user_state: State, item_state: State) -> Tensor:
        """s(q, i) [B, N] from e_q [B, d] and e_i [B, N, d]."""
        return torch.einsum("bd,bnd->bn", user_state["vector"], item_state["vector"])

    def _scale(self) -> Tensor:
        return self.similarity_scale()

    def coarse_score(self, user_state: State, item_state: State) -> Tensor:
        """The TTE stage alone: e_q [B, d] and e_i [B, N, d] -> t(q, i) = s(q, i) / tau + b [B, N],
        pointwise along N."""
        return self.similarity(user_state, item_state) * self._scale() + self.bias

    def score(self, user_state: State, item_state: State, mask: Tensor | None = None) -> Tensor:
        """User state {"vector": [B, d], "residual": [B, d_r]} and item state {"vector": [B, N, d],
        "residual": [B, N, d_r]} -> the LT's scores o [B, N] over each request's list (the TTE's t in
        phase "two_tower"); `mask` [B, N] keeps padding out of the attention."""
        if self.phase == "two_tower":
            return self.coarse_score(user_state, item_state)
        items, residual = item_state["vector"], item_state["residual"]
        n = items.shape[1]
        expand = lambda t: t.unsqueeze(1).expand(-1, n, -1)  # noqa: E731
        tokens = torch.cat([expand(user_state["vector"]), items, expand(user_state["residual"]), residual,
                            self.similarity(user_state, item_state).unsqueeze(-1)], dim=-1)
        padding, attend = None, None
        if not self.config.list_attention:
            attend = ~torch.eye(n, dtype=torch.bool, device=items.device)
        elif mask is not None:
            mask = mask.bool()
            # A request with no valid candidate would attend to nothing (NaN); let it see its row.
            padding = ~(mask | ~mask.any(-1, keepdim=True))
        hidden = self.transformer(self.token(tokens), mask=attend, src_key_padding_mask=padding)
        return self.head(hidden).squeeze(-1)

    # -- training objectives --------------------------------------------------------------------
    def _list_targets(self, batch: dict[str, Tensor], shape: torch.Size) -> tuple[Tensor, Tensor]:
        """(relevance, mask) [B, N]: the cascade list's, or for pointwise rows the label's."""
        if "relevance" in batch and "mask" in batch:
            return batch["relevance"].reshape(shape), batch["mask"].bool().reshape(shape)
        label = batch[LABEL].reshape(shape)
        relevance = torch.where(label > 0, self.config.retrieval_min_relevance, 0)
        return relevance, torch.ones(shape, dtype=torch.bool, device=label.device)

    def auxiliary_losses(self, batch: dict[str, Tensor], user_state: State, item_state: State, logits: Tensor) -> dict[str, Tensor]:
        """The model's own objective, weighted scalars [] (module docstring): "lttd_retrieval" (L_ret
        on the TTE), "lttd_rank" (ListNet on the LT's `logits` [B, N]), "lttd_kd_down" and
        "lttd_kd_up" (the switched-off terms absent); in phase "two_tower" L_ret alone, in phase
        "transformer" L_rank and L_up. The batch holds a cascade list's "relevance" and "mask"
        [B, N], or pointwise rows' label [B] (N = 1); the states are {"vector", "residual"}: [B, d],
        [B, d_r] and [B, N, d], [B, N, d_r]."""
        c = self.config
        relevance, mask = self._list_targets(batch, logits.shape)
        stage = self.phase
        losses: dict[str, Tensor] = {}
        if stage in (ALL_PARTS, "two_tower") and c.retrieval_weight:
            positive = mask & (relevance >= c.retrieval_min_relevance)
            losses["lttd_retrieval"] = c.retrieval_weight * sampled_softmax_loss(
                user_state["vector"], item_state["vector"], positive, mask, self._scale(), self.bias,
                c.retrieval_negatives == "list+batch")
        if stage == "two_tower":
            return losses
        if c.rank_weight:
            losses["lttd_rank"] = c.rank_weight * listnet_loss(logits, relevance, mask)
        if c.kd_weight:
            tte = self.coarse_score(user_state, item_state)
            if stage == ALL_PARTS and c.kd_down_weight:
                losses["lttd_kd_down"] = c.kd_weight * c.kd_down_weight * list_kl(logits, tte, mask, c.kd_temperature)
            if c.kd_up_weight:
                losses["lttd_kd_up"] = c.kd_weight * c.kd_up_weight * list_kl(tte, logits, mask, c.kd_temperature)
        return losses
