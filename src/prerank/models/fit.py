"""FIT: a learnable Fully Interacted Two-tower model for pre-ranking.

Xiong, Yu, Xu, Cheng, Yuan, Mo, "A Learnable Fully Interacted Two-Tower Model for Pre-Ranking
System", SIGIR 2025, arXiv 2509.12948. No official code exists and only the abstract could be read
first-hand; the equations below follow the notes in `design/models/fit-tarq-lttd.md` §1 (secondary
reviews of the paper). Every reading marked [I] is ours and is a config option.

Meta Query Module (MQM), early interaction
    Q ∈ R^{N×D}                       learnable item meta matrix (`num_meta` = N rows)
    Q* = (Q Qᵀ) Q                     query group: parameter-free self-attention, no softmax, no scaling
    k = softmax(e_c Qᵀ / τ)           attention unit: the item's attribute vector e_c against the raw rows of Q
    q̃* = k Q*                         training: soft query, τ annealed from `tau_start` to `tau_end`
    i*(v) = argmax_i e_c q_iᵀ,        eval / serving: hard query, the argmax of the stored logits
    q* = Q*[i*(v)]
    h_seq = Σ_j m_j a_j x_j,          interaction unit: DIN target attention of the query over the
    a_j = MLP([q; x_j; q−x_j; q⊙x_j])   user's behaviour sequence (`prerank.models.layers.TargetAttention`)
    h_u = MLP_u([user fields; h_seq; q])       user tower (conditioned on the meta query)
    h_v = MLP_v([item fields])                 item tower, unchanged from Two-Tower

Lightweight Similarity Scorer (LSS), late interaction (LITE-style separable scorer, [I] on sizes)
    Z_u = reshape(W_u h_u + b_u) ∈ R^{H_u×p},  Z_v = reshape(W_v h_v + b_v) ∈ R^{H_v×p}
    S = Z_u Z_vᵀ ∈ R^{H_u×H_v}
    R = φ(S W_r + b_r) ∈ R^{H_u×m_r}          row-wise FC, shared across the H_u rows
    C = φ(Rᵀ W_c + b_c) ∈ R^{m_r×m_c}         column-wise FC, shared across the m_r columns
    logit = w_oᵀ vec(C) + b_o

Ablations (`use_mqm`, `scorer`), as defined in the notes §1.10 [I]:
    w/o MQM (`use_mqm=False`): no meta query; the user tower sees the masked-mean behaviour field
        only (exactly Two-Tower's user tower) and LSS is kept.
    w/o LSS (`scorer="dot"`): Two-Tower's head, cosine(h_u, h_v)/τ_s + b with a learnable τ_s.
    w SumMax (`scorer="summax"`): IntTower-style Σ_a max_b S_ab over L2-normalised heads, /τ_s + b.
    w FC (`scorer="fc"`): an MLP on vec(S) (`fc_hidden`) down to a scalar.

What runs where (the point of the model)
    encode_items (offline): Z_v [H_v, p] and the selection logits e_c Qᵀ [N]: H_v·p + N floats per
        item, the same state in training and serving (`score` takes their argmax i*(v) at serving
        and softmax(·/τ) in training).
    encode_user (once per request): Q* is a constant, so the interaction unit and the user tower
        run once for each of the N hard queries: a user state Z_u of [N, H_u, p]. Cost grows
        with N and is independent of the number of candidates.
    score (per candidate): gather the user-state row i*(v), S = Z_u Z_vᵀ, row FC, column FC,
        linear: about H_u·H_v·p + H_u·H_v·m_r + m_r·H_u·m_c + m_r·m_c MACs.

Training-mode path (the soft query). q̃* depends on the candidate through k(v), and the user tower
is non-linear in q, so with `soft_selection="query"` (default, the paper's relaxation) the user
side cannot finish before the item is known: in training mode `encode_user` returns the user's
embedded inputs (field vector, behaviour embeddings and mask), and `score` turns the item's
selection logits into the soft weights k, builds q̃* = k Q* and runs the interaction unit
and user tower per (user, candidate) pair — the paper's per-sample training cost — through the
same `_conditioned_user_heads` that `encode_user` runs for the N hard queries at serving time.
`soft_selection="output"` [I] is the alternative relaxation that keeps the serving split in
training too: `encode_user` runs all N hard queries and `score` mixes the N user-state rows by k
(N times the user-side cost per step). As τ → 0, k becomes one-hot and both soft paths equal the
hard path (tested).

Training progress. τ follows a schedule over optimisation steps, so the model counts them itself:
the persistent buffer `train_step` is advanced at the start of every forward pass in training mode
with gradients enabled (`on_training_forward`; one per optimiser step in the trainer). It is saved with the weights, so a
resumed run continues the schedule, and no trainer change is needed.

Readings chosen where the sources are silent [I] (config options):
- `selection_features`: e_c is the concatenation of the item's id-valued features (pooled bags),
  by default all of them (the "item attribute feature set"); D = their count × embed dim. When
  D differs from the behaviour-embedding dim, a bias-free linear map (`query_projection`) takes a
  query to the behaviour space before the interaction unit.
- `meta_init`: Kaiming-uniform (a=√5, bound 1/√D) as one third-party build says the paper does;
  "normal" (std 1/√D) as an alternative. No k-means initialisation (the model never sees data
  at construction).
- `tau_schedule` exponential (default) or linear from `tau_start`=1.0 to `tau_end`=1e-3 over
  `anneal_steps`=300 steps, then held. The selection logits e_c q_iᵀ are small (embeddings start
  at std 0.01), so a linear schedule keeps the soft query near the uniform mix for most of the
  anneal while evaluation uses the hard query: on ML-1M (users 1–2999, inttower protocol) the
  hard-path validation AUC fell from 0.883 to 0.794 in epoch 2 and early stopping ended the run.
  A geometric decay spends equal time per decade of τ. No switch to a hard argmax in training
  (the notes flag this as unconfirmed); at τ=1e-3 the soft query is the hard one for separated
  logits.
- `attention_softmax`: DIN's unnormalised weights (default) or a masked softmax.
- `attention_hidden` (16,): the activation unit runs N·L times per request, so its size is the
  user stage's cost; DIN's (80, 40) made the user stage ~5x slower on CPU. The unit runs through
  `TargetAttention.many_queries`, which never builds the [B, N, L, 4d] input.
- `concat_query`: the query itself is also fed to the user tower (one third-party build).
- `user_heads`/`item_heads`/`head_dim`/`row_units`/`col_units`: 4/4/32/8/8, φ=`lss_activation`
  (ReLU); `normalize_heads` (off by default for LSS and FC) L2-normalises the heads and scales S by
  a learnable 1/τ_s, as a third-party build does for stability.
- The interaction unit attends over the behaviour sequence only (no profile tokens).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prerank.config import LayerSizes, NonEmptyStr, NonNegativeInt, PositiveFloat, PositiveInt
from prerank.data.schema import PAD_INDEX, Schema
from prerank.models.base import PreRankModel, State, config_dataclass, register
from prerank.models.layers import ACTIVATIONS, MLP, Activation, LearnableTemperature, TargetAttention, TowerConfig, TowerPair

# Query × behaviour pairs per chunk when the user stage runs all N hard queries outside training:
# keeps the [rows, N, L, h] attention activations in cache (chunking is exact in eval mode).
EVAL_PAIRS_PER_CHUNK = 1 << 14


@config_dataclass
class FITConfig(TowerConfig):
    # Towers: `TowerConfig`'s defaults, as Two-Tower (IntTower repository's baseline).
    # Meta Query Module.
    use_mqm: bool = True
    num_meta: PositiveInt = 16
    selection_features: tuple[NonEmptyStr, ...] = ()  # () = every id-valued item feature
    meta_init: Literal["kaiming_uniform", "normal"] = "kaiming_uniform"
    tau_start: PositiveFloat = 1.0
    tau_end: PositiveFloat = 1e-3
    anneal_steps: NonNegativeInt = 300  # ~2.5 epochs of ML-1M (users 1–2999) at batch 2048
    tau_schedule: Literal["linear", "exponential"] = "exponential"
    soft_selection: Literal["query", "output"] = "query"
    attention_hidden: LayerSizes = (16,)
    attention_activation: Activation = "prelu"
    attention_softmax: bool = False
    concat_query: bool = True
    # Scorer.
    scorer: Literal["lss", "dot", "summax", "fc"] = "lss"
    user_heads: PositiveInt = 4
    item_heads: PositiveInt = 4
    head_dim: PositiveInt = 32
    row_units: PositiveInt = 8
    col_units: PositiveInt = 8
    lss_activation: Activation = "relu"
    fc_hidden: LayerSizes = (64,)
    normalize_heads: bool = False  # lss / fc only; dot and summax always normalise
    temperature: PositiveFloat = 0.05  # initial 1/scale of normalised similarities (learnable)

    def __post_init__(self) -> None:
        if self.tau_end > self.tau_start:
            raise ValueError(f"need tau_end <= tau_start, got tau_start={self.tau_start}, tau_end={self.tau_end}")


def query_group(meta: Tensor) -> Tensor:
    """Q* = (Q Qᵀ) Q: each hard query aggregates the meta rows by their (unnormalised) similarity.
    `meta` Q [num_meta, D] -> Q* [num_meta, D]."""
    return (meta @ meta.T) @ meta


class LightweightSimilarityScorer(nn.Module):
    """S [..., H_u, H_v] -> logit [...]: row-wise FC (over H_v), column-wise FC (over H_u), linear."""

    def __init__(self, user_heads: int, item_heads: int, row_units: int, col_units: int, activation: str) -> None:
        super().__init__()
        self.row = nn.Linear(item_heads, row_units)
        self.column = nn.Linear(user_heads, col_units)
        self.out = nn.Linear(row_units * col_units, 1)
        self.act = ACTIVATIONS[activation]()

    def forward(self, similarity: Tensor) -> Tensor:
        """S [..., H_u, H_v] (in `score`, [B, N, H_u, H_v]) -> logits [...] ([B, N])."""
        rows = self.act(self.row(similarity))  # [..., H_u, m_r]
        columns = self.act(self.column(rows.transpose(-1, -2)))  # [..., m_r, m_c]
        return self.out(columns.flatten(-2)).squeeze(-1)


@register
class FIT(PreRankModel):
    name = "fit"
    Config = FITConfig

    def __init__(self, schema: Schema, config: FITConfig) -> None:
        super().__init__(schema, config)
        c = config
        self.sequence = schema.sequence_feature
        if c.use_mqm and self.sequence is None:
            raise ValueError("FIT's interaction unit needs a behaviour-sequence feature in the schema "
                             "(build the data with seq_len > 0), or set use_mqm=False")
        behaviour_dim = self.sequence.embed_dim if (c.use_mqm and self.sequence is not None) else 0
        query_in_tower = behaviour_dim if c.concat_query else 0
        self.towers = TowerPair(schema, c, user_extra_dim=behaviour_dim + query_in_tower)
        tower_dim = self.towers.user_tower.out_dim

        if c.use_mqm:
            self.selection_slots = self._selection_slots(schema, c.selection_features)
            query_dim = len(self.selection_slots) * self.towers.item_fields.embed_dim
            self.meta = nn.Parameter(torch.empty(c.num_meta, query_dim))
            if c.meta_init == "kaiming_uniform":
                nn.init.kaiming_uniform_(self.meta, a=math.sqrt(5))
            else:
                nn.init.normal_(self.meta, std=1.0 / math.sqrt(query_dim))
            self.query_projection = nn.Identity() if query_dim == behaviour_dim else nn.Linear(query_dim, behaviour_dim, bias=False)
            self.interaction = TargetAttention(behaviour_dim, tuple(c.attention_hidden), c.attention_activation, c.attention_softmax)
        self.register_buffer("train_step", torch.zeros((), dtype=torch.long))

        if c.scorer == "dot":
            # Two-Tower's head: one "head" per side, the whole tower vector.
            self.user_projection = self.item_projection = None
            self.user_heads, self.item_heads, self.head_dim = 1, 1, tower_dim
        else:
            self.user_heads, self.item_heads, self.head_dim = c.user_heads, c.item_heads, c.head_dim
            self.user_projection = nn.Linear(tower_dim, c.user_heads * c.head_dim)
            self.item_projection = nn.Linear(tower_dim, c.item_heads * c.head_dim)
        self.normalized = c.scorer in ("dot", "summax") or c.normalize_heads
        if self.normalized:
            self.similarity_scale = LearnableTemperature(c.temperature)
        if c.scorer in ("dot", "summax"):
            self.bias = nn.Parameter(torch.zeros(()))
        elif c.scorer == "lss":
            self.lss = LightweightSimilarityScorer(c.user_heads, c.item_heads, c.row_units, c.col_units, c.lss_activation)
        else:
            self.fc = MLP(c.user_heads * c.item_heads, (*c.fc_hidden, 1), activation=c.lss_activation, output_activation=False)

    @staticmethod
    def _selection_slots(schema: Schema, names: tuple[str, ...]) -> list[int]:
        """Positions of e_c's features among the item encoder's id fields."""
        id_names = [f.name for f in schema.item_features if f.is_id]
        wanted = list(names) or id_names
        for name in wanted:
            if name not in schema:
                raise ValueError(f"selection_features: no feature {name!r} in the schema (item id features: {id_names})")
            if name not in id_names:
                raise ValueError(f"selection_features: {name!r} is not an id-valued item-side feature (choose from {id_names})")
        return [id_names.index(name) for name in wanted]

    # -- MQM --------------------------------------------------------------------------------------
    def temperature(self) -> float:
        """τ at the current training step (the schedule of the attention unit's soft selection)."""
        c = self.config
        progress = min(1.0, self.train_step.item() / c.anneal_steps) if c.anneal_steps else 1.0
        if c.tau_schedule == "linear":
            return c.tau_start + (c.tau_end - c.tau_start) * progress
        return c.tau_start * (c.tau_end / c.tau_start) ** progress

    def query_group(self) -> Tensor:
        """The num_meta hard queries Q* [num_meta, D] of the current meta matrix (D = the selection
        attributes' width)."""
        return query_group(self.meta)

    def selection_logits(self, item_embeddings: Tensor) -> Tensor:
        """e_c Qᵀ [M, num_meta] from the item's field embeddings [M, F, d]."""
        attributes = item_embeddings[:, self.selection_slots].flatten(-2)
        return attributes @ self.meta.T

    def _conditioned_user_heads(self, fields: Tensor, behaviours: Tensor, mask: Tensor, queries: Tensor) -> Tensor:
        """The user side conditioned on meta queries: Z_u [B, K, H_u, p].

        `queries` is [K, D] (the same K hard queries for every row: serving) or [B, K, D] (one
        soft query per row and candidate: training)."""
        queries = self.query_projection(queries)
        history = self.interaction.many_queries(queries, behaviours, mask)  # [B, K, d]
        rows, k = history.shape[:2]
        parts = [fields.unsqueeze(1).expand(rows, k, fields.shape[-1]), history]
        if self.config.concat_query:
            parts.append(queries.expand(rows, k, queries.shape[-1]))
        return self._heads(self.towers.user_tower(torch.cat(parts, dim=-1)), self.user_projection, self.user_heads)

    # -- heads ------------------------------------------------------------------------------------
    def _heads(self, vector: Tensor, projection: nn.Module | None, heads: int) -> Tensor:
        z = (projection(vector) if projection is not None else vector).unflatten(-1, (heads, self.head_dim))
        return F.normalize(z, dim=-1) if self.normalized else z

    # -- the contract -----------------------------------------------------------------------------
    def encode_items(self, items: dict[str, Tensor]) -> State:
        """Item features {name: [M] or [M, S]} -> {"heads": Z_v [M, H_v, p]} (under `scorer="dot"` the
        whole tower vector, [M, 1, D]) and, with the MQM, {"selection_logits": e_c Qᵀ [M, num_meta]}:
        the same keys in training and serving."""
        fields = self.towers.item_fields(items)
        state = {"heads": self._heads(self.towers.item_tower(fields.flat()), self.item_projection, self.item_heads)}
        if self.config.use_mqm:
            state["selection_logits"] = self.selection_logits(fields.embeddings)
        return state

    def encode_user(self, user: dict[str, Tensor]) -> State:
        """User features {name: [B] or [B, S]} -> {"heads": Z_u [B, num_meta, H_u, p]}, one row per hard
        query (without the MQM one row, [B, 1, H_u, p]; under `scorer="dot"` p = D, H_u = 1). In
        training with `soft_selection="query"` the user side cannot finish before the item is known:
        {"fields": [B, F_u·d + n_u], "behaviours": [B, S, d], "mask": [B, S] bool} instead."""
        fields = self.towers.user_fields(user).flat()
        if not self.config.use_mqm:
            return {"heads": self._heads(self.towers.user_tower(fields), self.user_projection, self.user_heads).unsqueeze(1)}
        ids = user[self.sequence.name]
        behaviours = self.towers.embeddings.lookup(self.sequence, ids)
        mask = ids != PAD_INDEX
        if self.training and self.config.soft_selection == "query":
            return {"fields": fields, "behaviours": behaviours, "mask": mask}
        hard_queries = self.query_group()
        if self.training:
            return {"heads": self._conditioned_user_heads(fields, behaviours, mask, hard_queries)}
        step = max(1, EVAL_PAIRS_PER_CHUNK // (self.config.num_meta * max(1, ids.shape[1])))
        chunks = [self._conditioned_user_heads(fields[i : i + step], behaviours[i : i + step], mask[i : i + step], hard_queries)
                  for i in range(0, len(fields), step)]
        return {"heads": torch.cat(chunks) if chunks else fields.new_zeros(0, self.config.num_meta, self.user_heads, self.head_dim)}

    def meta_index(self, item_state: State) -> Tensor:
        """The hard selection i*(v) [B, N] (int64) from the item state's selection logits [B, N, num_meta]."""
        return item_state["selection_logits"].argmax(-1)

    def score(self, user_state: State, item_state: State, mask: Tensor | None = None) -> Tensor:
        """Logits [B, N] from the user state (Z_u per meta query [B, num_meta, H_u, p], or in training
        with `soft_selection="query"` the user's embedded inputs) and the item state (Z_v
        [B, N, H_v, p], selection logits [B, N, num_meta])."""
        item_heads = item_state["heads"]  # [B, N, H_v, p]
        candidates = item_heads.shape[1]
        if not self.config.use_mqm:
            user_heads = user_state["heads"].expand(-1, candidates, -1, -1)
        elif not self.training:  # serving: the user-state row of the item's hard query
            heads = user_state["heads"]  # [B, num_meta, H_u, p]
            # One row lookup in the flattened [B·num_meta] states: take_along_dim's broadcast index
            # cost more than the similarity itself.
            rows = self.meta_index(item_state) + torch.arange(len(heads), device=heads.device)[:, None] * heads.shape[1]
            user_heads = heads.flatten(0, 1)[rows]
        else:
            weights = (item_state["selection_logits"] / self.temperature()).softmax(-1)  # k [B, N, num_meta]
            if self.config.soft_selection == "output":  # mix the N hard-query user states
                user_heads = torch.einsum("bnk,bkhp->bnhp", weights, user_state["heads"])
            else:  # the soft query q̃* = k Q* conditions the user side per pair
                user_heads = self._conditioned_user_heads(user_state["fields"], user_state["behaviours"], user_state["mask"],
                                                          weights @ self.query_group())
        similarity = torch.einsum("bnhp,bngp->bnhg", user_heads, item_heads)  # [B, N, H_u, H_v]
        if self.normalized:
            similarity = similarity * self.similarity_scale()
        if self.config.scorer == "dot":
            return similarity[..., 0, 0] + self.bias
        if self.config.scorer == "summax":
            return similarity.max(-1).values.sum(-1) + self.bias
        if self.config.scorer == "lss":
            return self.lss(similarity)
        return self.fc(similarity.flatten(-2)).squeeze(-1)

    def on_training_forward(self) -> None:
        """One more optimisation step on the τ schedule."""
        self.train_step += 1
