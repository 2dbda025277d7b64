"""TARQ: target attention approximated by residual quantization.

Li, Zhu, Qiao, Guan, Shao, Liu, Zheng, "Equip Pre-ranking with Target Attention by Residual
Quantization", SIGIR 2026 (arXiv 2509.16931); loss terms as in the official TensorFlow file
(`zyody/tarq_sigir2026`). Notation of `../shared/design/models/fit-tarq-lttd.md` §2.

Two-tower backbone (the `two_tower` towers):
    s_tt(u, v) = cos(v_user, v_item) / tau

Item side, offline (`encode_items`): an item encoder v = g(x_item) in R^d and residual
quantization into L codebooks C_l in R^{K x d}:
    r_1 = v,   z_l = argmin_k ||r_l - c_{l,k}||^2,   r_{l+1} = r_l - c_{l,z_l}
The item state is the two-tower vector, the semantic id (z_1..z_L) and a head key W_h v_item.

User side, once per request (`encode_user`): the personalised codebook, every codeword used as
the query of a multi-head dot-product target attention over the user's behaviour sequence X:
    Q = C W_q   (depends on the codebook only: computed once, not per user; cached in inference)
    K_u = [x_null; X] W_k,  V_u = [x_null; X] W_v                      (per user)
    X̄[l, k] = W_o · concat_h softmax(Q_{l,k,h} K_{u,h}^T / sqrt(d_h)) V_{u,h}   in R^{L x K x d}

Per candidate (`score`), O(L·d):
    ĥ(u, v) = Σ_l X̄[l, z_l(v)]
    logit = s_tt(u, v) + attention_weight · <ĥ, W_h v_item> + b        [I] the composition

Teacher (training only), target attention with the real item as query, co-trained (BCE) in the
same graph as in the official code:
    h_TA = TA_t(q(x_item); X),   L_ta = BCE(teacher_logit, y)
    teacher_head="composed" (default): teacher_logit = s_tt + attention_weight·<h_TA, W_h v_item> + b,
        i.e. the served composition with exact target attention in place of ĥ: the upper bound
        the student approximates.
    teacher_head="mlp": teacher_logit = MLP([h_TA; q; h_TA ⊙ q]) (sequence and item only, the
        official teacher's inputs; weaker than the two-tower on ML-1M).

Distillation (official code): L_rec = (1/2B) Σ_b ||ĥ_b − sg(h_TA,b)||²

Codebook alignment (official code), per level l, with p over all K codes:
    p_l(k) = softmax_k(−||r_l − c_{l,k}||²),   p̄_l(k) = softmax_k(−||r̄_l − X̄[l,k]||²)
    r̄_1 = sg(h_TA), both residual chains advanced with the item-space index z_l
    L_align = λ_KL Σ_l mean_b [KL(p_l ‖ p̄_l) + KL(p̄_l ‖ p_l)]

Total: L = BCE(logit, y) + L_ta + L_rec + L_align (+ the codebook terms below).

Training cost. In training mode the model never builds the whole personalised codebook: the
score needs only the item's own L codewords, and attention is per query, so `encode_user` keeps
the user's attention memory (keys, values, mask) and `score` attends with each candidate's own L
codeword queries (N·L for a list of N), not L·K (`attend_own_codewords`). That is the serving
score exactly, to float rounding (a test checks it); the user state differs between the modes, the
item state does not. The alignment term needs all K codewords per level; it is
computed on the first `align_rows` rows of each (shuffled) batch, an unbiased sub-sample of the
batch mean, at align_rows/B of the full cost.

Readings we chose where the sources are silent (each a config option):
- `combine`: how ĥ enters the served logit. Default "sum": two-tower logit plus the attention
  logit <ĥ, W_h v_item>; "attention_only" drops the two-tower term.
- Both attentions are multi-head scaled dot-product attention (`attention_heads` heads) with
  explicit projections (the codeword queries are projected once, not per user; the keys and
  values once per user) and PyTorch's fused `scaled_dot_product_attention`, with a learnable null
  behaviour so an empty sequence is defined; the student is separate from the teacher unless
  `share_attention`. The official class name says the student is "light"; dot-product attention
  keeps the L·K queries per request cheap.
- `score` gathers row l·K + z_l of the flattened [L·K, d] personalised codebook per level.
- The behaviour sequence is used as raw item embeddings (no self-attention encoder before the
  target attention, which the reviews mention).
- `teacher_query`: "item_encoder" (default) makes the teacher's query the item vector v = g(x_item)
  that is quantized, so the codewords approximate the very query whose attention they stand in
  for, and the teacher's BCE keeps g informative (with no decoder in the public code, g would
  otherwise learn only from the codebook terms, which a constant g satisfies). "separate": its
  own MLP over the item fields.
- Codebook training (`codebook_update`). The codes are an argmin, so nothing in the main loss
  pulls codewords towards the item vectors, and codewords also serve as attention queries and
  drift; on ML-1M that collapsed every level to 2–3 codes. Choices:
  "ema" (default): codebooks are buffers updated by exponential-moving-average k-means on the
  batch residuals (decay `ema_decay`, as in VQ-VAE-2 / SoundStream); the attention adapts through
  W_q instead. "loss": codebooks are parameters with the VQ-VAE codebook term
  `codebook_weight`·||sg(r_l) − c_{l,z_l}||² on top of the main-loss gradient through the queries.
  Both add the commitment term `commitment_weight`·||r_l − sg(c_{l,z_l})||² (β = 0.25, VQ-VAE),
  which the public file does not show. `dead_code_restart`: a codeword unused for `restart_after`
  training steps is moved onto a random residual of the current batch (SoundStream / Jukebox).
  Codebook updates computed in a step are applied at the start of the next training forward, so
  no tensor saved for the current backward pass changes.
- `align_normalise`, `align_temperature`: the official term is softmax(−||·||²) at unit
  temperature, which depends on the vectors' scale. Ours are small (embeddings initialised at
  std 0.01): both distributions come out near uniform and the KL ~1e-7, so the term does nothing.
  `align_normalise=True` divides each row's squared distances by their (detached) mean over the
  K codes before the softmax (then by `align_temperature`); the default keeps the official form.
- `codebook_init`: "kmeans" (default) runs residual k-means on the item vectors of the first
  training batch; "random" draws N(0, 1/d).

Monitoring (official code): per level, codebook utilisation (distinct codes / K) and code entropy;
`codebook_usage` computes them on any set of codes, and the model keeps the per-level
utilisation of each training batch in `batch_utilisation` (a list, one entry per step).
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from prerank.config import LayerSizes, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt
from prerank.data.schema import PAD_INDEX, Schema
from prerank.models.base import PreRankModel, State, config_dataclass, register
from prerank.models.layers import MLP, LearnableTemperature, TowerConfig, TowerPair


@config_dataclass
class TarqConfig(TowerConfig):
    temperature: PositiveFloat = 0.05
    levels: PositiveInt = 3  # L
    codebook_size: PositiveInt = 64  # K
    codebook_init: Literal["kmeans", "random"] = "kmeans"
    kmeans_iterations: NonNegativeInt = 10
    codebook_update: Literal["ema", "loss"] = "ema"
    ema_decay: Annotated[float, Field(ge=0, lt=1)] = 0.99
    codebook_weight: NonNegativeFloat = 1.0  # codebook_update="loss" only
    commitment_weight: NonNegativeFloat = 0.25
    dead_code_restart: bool = True
    restart_after: PositiveInt = 50  # training steps without use
    attention_heads: PositiveInt = 2
    share_attention: bool = False
    teacher_query: Literal["item_encoder", "separate"] = "item_encoder"
    teacher_head: Literal["composed", "mlp"] = "composed"
    combine: Literal["sum", "attention_only"] = "sum"
    attention_weight: NonNegativeFloat = 1.0
    teacher_weight: NonNegativeFloat = 1.0
    distill_weight: NonNegativeFloat = 1.0
    align: bool = True
    align_weight: NonNegativeFloat = 1.0  # λ_KL, the official default
    align_rows: PositiveInt = 256
    align_normalise: bool = False  # [I] divide squared distances by their (detached) mean over the K codes
    align_temperature: PositiveFloat = 1.0
    item_encoder_hidden: LayerSizes = (64,)


def residual_quantize(vectors: Tensor, codebooks: Tensor) -> tuple[Tensor, Tensor]:
    """Greedy residual quantization. vectors [M, d], codebooks [L, K, d] -> codes [M, L] and the
    residual entering each level [M, L, d]."""
    residual = vectors
    codes, residuals = [], []
    for codebook in codebooks:
        residuals.append(residual)
        index = torch.cdist(residual, codebook).argmin(-1)
        codes.append(index)
        residual = residual - codebook[index]
    return torch.stack(codes, 1), torch.stack(residuals, 1)


def residual_kmeans(vectors: Tensor, levels: int, k: int, iterations: int, generator: torch.Generator) -> Tensor:
    """Codebooks [L, K, d] from k-means on the residuals of each level in turn: `vectors` [M, d],
    `levels` L, `k` K."""
    residual = vectors
    books = []
    for _ in range(levels):
        centres = residual[torch.randint(0, len(residual), (k,), generator=generator)].clone()
        for _ in range(iterations):
            assign = torch.cdist(residual, centres).argmin(-1)
            sums = torch.zeros_like(centres).index_add_(0, assign, residual)
            counts = torch.bincount(assign, minlength=k).unsqueeze(-1)
            centres = torch.where(counts > 0, sums / counts.clamp_min(1), centres)
        books.append(centres)
        residual = residual - centres[torch.cdist(residual, centres).argmin(-1)]
    return torch.stack(books)


def ema_codebook_step(ema_sum: Tensor, ema_count: Tensor, codes: Tensor, residuals: Tensor, decay: float,
                      eps: float = 1e-5) -> tuple[Tensor, Tensor, Tensor]:
    """One EMA k-means step for all levels (VQ-VAE appendix / SoundStream).

    ema_sum [L, K, d], ema_count [L, K], codes [M, L], residuals [M, L, d] ->
    (ema_sum', ema_count', codebooks'), with N_k' = γN_k + (1−γ)n_k, m_k' = γm_k + (1−γ)Σ_{z=k} r,
    c_k = m_k' / N̂_k where N̂ is N' Laplace-smoothed so an empty code does not divide by zero."""
    L, K, _ = ema_sum.shape
    one_hot = F.one_hot(codes, K).to(residuals.dtype)  # [M, L, K]
    counts = one_hot.sum(0)
    sums = torch.einsum("mlk,mld->lkd", one_hot, residuals)
    ema_count = decay * ema_count + (1 - decay) * counts
    ema_sum = decay * ema_sum + (1 - decay) * sums
    total = ema_count.sum(-1, keepdim=True)
    smoothed = (ema_count + eps) / (total + K * eps) * total
    return ema_sum, ema_count, ema_sum / smoothed.unsqueeze(-1)


def codebook_usage(codes: Tensor, codebook_size: int) -> dict[str, list[float]]:
    """Per level: utilisation (distinct codes used / K) and the entropy (nats) of the code frequencies.
    `codes` [M, L] -> {"utilisation": L floats, "entropy": L floats}."""
    utilisation, entropy = [], []
    for level in codes.T:
        counts = torch.bincount(level.long(), minlength=codebook_size).double()
        freq = counts[counts > 0] / counts.sum()
        utilisation.append(float((counts > 0).sum() / codebook_size))
        entropy.append(float(-(freq * freq.log()).sum()))
    return {"utilisation": utilisation, "entropy": entropy}


def symmetric_kl(p: Tensor, q: Tensor, eps: float = 1e-8) -> Tensor:
    """KL(p‖q) + KL(q‖p) over the last dim, with the official code's epsilon: distributions p, q
    [..., K] -> [...] (in the alignment, [M, K] -> [M])."""
    return (p * ((p + eps) / (q + eps)).log()).sum(-1) + (q * ((q + eps) / (p + eps)).log()).sum(-1)


class DotProductTargetAttention(nn.Module):
    """Multi-head scaled dot-product target attention with one learnable null behaviour always
    present (an empty sequence gives a defined output). Split into its three costs so each is paid
    where it belongs: `queries` (per query; codewords: once per model), `memory` (per user) and
    `attend` (per query and user)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention_heads={heads} must divide the embedding dim {dim}")
        self.heads = heads
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        self.null = nn.Parameter(torch.zeros(dim))

    def queries(self, x: Tensor) -> Tensor:
        """[..., d] -> [..., H, d/H], pre-scaled by 1/sqrt(d/H)."""
        q = self.query(x)
        return q.reshape(*q.shape[:-1], self.heads, -1) / math.sqrt(q.shape[-1] // self.heads)

    def memory(self, behaviours: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """behaviours [B, S, d], mask [B, S] (True = real item) -> keys, values [B, S+1, H, d/H], mask
        [B, S+1] (the null behaviour first)."""
        seq = torch.cat([self.null.expand(len(behaviours), 1, -1), behaviours], dim=1)
        mask = torch.cat([mask.new_ones(len(mask), 1), mask], dim=1)
        split = lambda t: t.reshape(*t.shape[:-1], self.heads, -1)  # noqa: E731
        return split(self.key(seq)), split(self.value(seq)), mask

    def attend(self, queries: Tensor, memory: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        """queries [Q, H, e] (shared by all rows) or [B, Q, H, e], memory of B users -> [B, Q, d]."""
        keys, values, mask = memory
        if queries.dim() == 3:
            queries = queries.expand(len(keys), *queries.shape)
        # The fused kernel: softmax(q k^T + mask) v without materialising a masked copy of the logits.
        out = F.scaled_dot_product_attention(queries.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
                                             attn_mask=mask[:, None, None, :], scale=1.0)  # [B, H, Q, e]
        return self.out(out.transpose(1, 2).flatten(-2))

    def forward(self, queries: Tensor, behaviours: Tensor, mask: Tensor) -> Tensor:
        """Raw queries [B, Q, d] over behaviours [B, S, d], mask [B, S] -> [B, Q, d]."""
        return self.attend(self.queries(queries), self.memory(behaviours, mask))


@register
class Tarq(PreRankModel):
    name = "tarq"
    Config = TarqConfig
    # Sample rows only: the teacher's BCE needs a label per candidate, which cascade lists do not carry.
    training_modes = ("pointwise",)

    def __init__(self, schema: Schema, config: TarqConfig) -> None:
        super().__init__(schema, config)
        c = config
        self.sequence = schema.sequence_feature
        if self.sequence is None:
            raise ValueError("tarq needs a behaviour-sequence feature in the schema (use --seq-len > 0)")
        self.towers = TowerPair(schema, c)
        dim = self.sequence.embed_dim
        item_flat = self.towers.item_fields.flat_dim
        self.item_encoder = MLP(item_flat, (*c.item_encoder_hidden, dim), output_activation=False)
        books = torch.randn(c.levels, c.codebook_size, dim) / math.sqrt(dim)
        if c.codebook_update == "loss":
            self.codebooks = nn.Parameter(books)
        else:
            self.register_buffer("codebooks", books)
            self.register_buffer("ema_sum", books.clone())
            self.register_buffer("ema_count", torch.ones(c.levels, c.codebook_size))
        self.register_buffer("codebooks_ready", torch.tensor(c.codebook_init == "random"))
        self.register_buffer("code_age", torch.zeros(c.levels, c.codebook_size, dtype=torch.long))
        self.student_attention = DotProductTargetAttention(dim, c.attention_heads)
        self.teacher_attention = self.student_attention if c.share_attention else DotProductTargetAttention(dim, c.attention_heads)
        if c.teacher_query == "separate":
            self.teacher_query = MLP(item_flat, (dim,), output_activation=False)
        if c.teacher_head == "mlp":
            self.teacher_head = nn.Sequential(MLP(3 * dim, (64,)), nn.Linear(64, 1))
        self.head_key = nn.Linear(self.towers.item_tower.out_dim, dim, bias=False)
        self.similarity_scale = LearnableTemperature(c.temperature)
        self.bias = nn.Parameter(torch.zeros(()))
        self.batch_utilisation: list[list[float]] = []
        self._pending: dict[str, Tensor] | None = None
        self._query_cache: tuple[tuple, Tensor] | None = None
        # A training forward's intermediates, from `batch_states` to `auxiliary_losses`.
        self._step: dict | None = None

    # -- stages -------------------------------------------------------------------------------
    def _behaviours(self, user: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        ids = user[self.sequence.name]
        return self.towers.embeddings.lookup(self.sequence, ids), ids != PAD_INDEX

    def _user_vector(self, user: dict[str, Tensor]) -> Tensor:
        return F.normalize(self.towers.user_tower(self.towers.user_fields(user).flat()), dim=-1)

    def _codeword_queries(self) -> Tensor:
        """Projected queries of all L·K codewords [L, K, H, e]. They depend on the weights only, so
        at inference they are computed once and reused until a weight or the codebook changes."""
        if self.training or torch.is_grad_enabled():
            return self.student_attention.queries(self.codebooks)
        q = self.student_attention.query
        key = tuple((t.data_ptr(), t._version) for t in (self.codebooks, q.weight, q.bias))
        if self._query_cache is None or self._query_cache[0] != key:
            self._query_cache = (key, self.student_attention.queries(self.codebooks))
        return self._query_cache[1]

    def _encode_items(self, items: dict[str, Tensor]) -> tuple[State, Tensor, Tensor]:
        """Item features with leading dim M -> (item state, item vector v [M, d], residuals [M, L, d])."""
        flat = self.towers.item_fields(items).flat()
        tower_out = self.towers.item_tower(flat)
        vectors = self.item_encoder(flat)
        codes, residuals = residual_quantize(vectors, self.codebooks)
        state = {"vector": F.normalize(tower_out, dim=-1), "codes": codes, "head_key": self.head_key(tower_out)}
        return state, vectors, residuals

    def encode_items(self, items: dict[str, Tensor]) -> State:
        """Item features [M] -> {"vector": [M, D] (normalised tower output), "codes": semantic id
        [M, L], "head_key": W_h v_item [M, d]}."""
        return self._encode_items(items)[0]

    def _user_state(self, user: dict[str, Tensor]) -> tuple[State, Tensor, Tensor]:
        """(user state, behaviour embeddings [B, S, d], their mask [B, S]); the state as `encode_user` says."""
        behaviours, mask = self._behaviours(user)
        keys, values, memory_mask = self.student_attention.memory(behaviours, mask)
        vector = self._user_vector(user)
        if self.training:
            return {"vector": vector, "memory_keys": keys, "memory_values": values, "memory_mask": memory_mask}, behaviours, mask
        L, K = self.codebooks.shape[:2]
        queries = self._codeword_queries().flatten(0, 1)  # [L·K, H, e], shared by every user
        personal = self.student_attention.attend(queries, (keys, values, memory_mask))
        return {"vector": vector, "personal_codebook": personal.reshape(len(behaviours), L, K, -1)}, behaviours, mask

    def encode_user(self, user: dict[str, Tensor]) -> State:
        """User features [B] -> serving: {"vector": [B, D], "personal_codebook": X̄ [B, L, K, d]}.
        Training: {"vector": [B, D], "memory_keys", "memory_values": [B, S+1, H, d/H], "memory_mask":
        [B, S+1]}, the attention memory from which `score` attends with only the candidates' own L
        codeword queries (module docstring, "Training cost")."""
        return self._user_state(user)[0]

    def attend_own_codewords(self, user_state: State, codes: Tensor, queries: Tensor | None = None) -> Tensor:
        """ĥ computed exactly, in training: each candidate's own L codewords [B, N, L] attend over the
        user's memory (training user state) and are summed -> [B, N, d]; equals `approximate_attention`
        on the full personalised codebook, since attention is per query. `queries`: the projected
        codeword queries [L, K, H, e] if already computed this step."""
        B, N, L = codes.shape
        queries = self._codeword_queries() if queries is None else queries
        own = queries[torch.arange(L, device=codes.device).expand_as(codes), codes]  # [B, N, L, H, e]
        memory = (user_state["memory_keys"], user_state["memory_values"], user_state["memory_mask"])
        return self.student_attention.attend(own.reshape(B, N * L, *own.shape[-2:]), memory).reshape(B, N, L, -1).sum(2)

    def approximate_attention(self, personal: Tensor, codes: Tensor) -> Tensor:
        """ĥ = Σ_l X̄[l, z_l]: personal [B, L, K, d], codes [B, N, L] -> [B, N, d]."""
        B, N, L = codes.shape
        K = personal.shape[2]
        # One gather from the flattened [B, L·K, d] table (row l·K + z_l) is several times cheaper
        # than three-tensor advanced indexing at 1,000 candidates.
        rows = (codes + torch.arange(0, L * K, K, device=codes.device)).reshape(B, N * L)
        flat = personal.reshape(B, L * K, -1)
        picked = flat.index_select(1, rows[0]) if B == 1 else flat[torch.arange(B, device=codes.device)[:, None], rows]
        return picked.reshape(B, N, L, -1).sum(-2)

    def _compose(self, user_vector: Tensor, item_state: State, attention: Tensor) -> Tensor:
        """The served logit from an attention vector per candidate [B, N, d] (ĥ, or h_TA for the teacher)."""
        logit = self.config.attention_weight * (attention * item_state["head_key"]).sum(-1) + self.bias
        if self.config.combine == "sum":
            logit = logit + torch.einsum("bd,bnd->bn", user_vector, item_state["vector"]) * self.similarity_scale()
        return logit

    def score(self, user_state: State, item_state: State, mask: Tensor | None = None) -> Tensor:
        """Logits [B, N]: the two-tower term plus <ĥ, W_h v_item>, ĥ gathered from the user's
        personalised codebook [B, L, K, d] by the candidates' codes [B, N, L] (in training, attended
        exactly: `attend_own_codewords`). User state as `encode_user` gives it, item state {"vector": [B, N, D], "codes", "head_key": [B, N, d]};
        pointwise: `mask` is not needed."""
        if self.training:
            step = self._step or {}
            h_hat = self.attend_own_codewords(user_state, item_state["codes"], step.get("queries"))
            step["h_hat"] = h_hat  # the distillation term's ĥ, not computed twice
        else:
            h_hat = self.approximate_attention(user_state["personal_codebook"], item_state["codes"])
        return self._compose(user_state["vector"], item_state, h_hat)

    # -- training -----------------------------------------------------------------------------
    def _flat_items(self, batch: dict[str, Tensor]) -> tuple[dict[str, Tensor], int]:
        """Item features of leading dims [B] or [B, N] flattened to [B·N], and N."""
        items = self.item_inputs(batch)
        ids = items[self.schema.item_id]
        n = ids.shape[1] if ids.dim() == 2 else 1
        return {k: v.reshape(-1, *v.shape[ids.dim():]) for k, v in items.items()}, n

    def _teacher(self, user_vector: Tensor, item_state: State, vectors: Tensor, flat_items: dict[str, Tensor],
                 behaviours: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        c = self.config
        if c.teacher_query == "separate":
            vectors = self.teacher_query(self.towers.item_fields(flat_items).flat())
        query = vectors.reshape(len(behaviours), -1, vectors.shape[-1])  # [B, N, d]
        h_ta = self.teacher_attention(query, behaviours, mask)
        if c.teacher_head == "mlp":
            return h_ta, self.teacher_head(torch.cat([h_ta, query, h_ta * query], -1)).squeeze(-1)
        return h_ta, self._compose(user_vector, item_state, h_ta)

    def teacher(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """The target-attention teacher on a batch with item features [B] (N = 1) or [B, N]:
        (attention output h_TA [B, N, d], logit [B, N])."""
        user = self.user_inputs(batch)
        behaviours, mask = self._behaviours(user)
        flat, n = self._flat_items(batch)
        state, vectors, _ = self._encode_items(flat)
        state = {k: v.reshape(len(behaviours), n, *v.shape[1:]) for k, v in state.items()}
        return self._teacher(self._user_vector(user), state, vectors, flat, behaviours, mask)

    @torch.no_grad()
    def initialise_codebooks(self, items: dict[str, Tensor]) -> None:
        """Codebooks [L, K, d] by residual k-means on the item vectors v [M, d] of item features
        {name: [M] or [M, S]} (the first training batch's, under `codebook_init="kmeans"`)."""
        vectors = self.item_encoder(self.towers.item_fields(items).flat())
        generator = torch.Generator().manual_seed(0)
        c = self.config
        books = residual_kmeans(vectors.cpu(), c.levels, c.codebook_size, c.kmeans_iterations, generator).to(vectors)
        self.codebooks.copy_(books)
        if c.codebook_update == "ema":
            self.ema_sum.copy_(books)
            self.ema_count.fill_(1.0)
        self.codebooks_ready.fill_(True)

    def on_training_forward(self) -> None:
        """Apply the codebook update computed in the previous training step."""
        self._apply_pending_codebook_update()

    def batch_states(self, batch: dict[str, Tensor]) -> tuple[State, State]:
        """The states `encode_user` / `encode_items` give (user state as `encode_user` says, item
        state {"vector": [B, N, D], "codes": [B, N, L], "head_key": [B, N, d]} for item features [B]
        or [B, N]); in training computed once together with what `auxiliary_losses` needs (the item
        vectors and residuals, the behaviours), and the codebooks initialised on the first batch."""
        if not self.training:
            return super().batch_states(batch)
        flat, n = self._flat_items(batch)
        if not bool(self.codebooks_ready):
            self.initialise_codebooks(flat)
        user_state, behaviours, mask = self._user_state(self.user_inputs(batch))
        state, vectors, residuals = self._encode_items(flat)
        item_state = {k: v.reshape(len(behaviours), n, *v.shape[1:]) for k, v in state.items()}
        # One projection of the codeword queries per step, for the student's ĥ and the alignment.
        self._step = {"flat": flat, "behaviours": behaviours, "mask": mask, "vectors": vectors, "residuals": residuals,
                      "queries": self._codeword_queries()}
        return user_state, item_state

    def auxiliary_losses(self, batch: dict[str, Tensor], user_state: State, item_state: State, logits: Tensor) -> dict[str, Tensor]:
        """The teacher's BCE, the distillation of ĥ onto sg(h_TA), the commitment (and, with
        `codebook_update="loss"`, codebook) term and the codebook alignment, each weighted (module
        docstring); records this step's codebook usage and update. Uses the intermediates of this
        step's `batch_states` (its states, as there) and `logits` [B, N] -> {"teacher_bce", "distill",
        "commitment", "codebook", "align"}: scalars [] (the switched-off terms absent)."""
        step, self._step = self._step, None
        if step is None:
            raise RuntimeError("Tarq.auxiliary_losses runs after batch_states in the same training forward")
        c = self.config
        B, n, L = *logits.shape, c.levels
        codes = item_state["codes"].reshape(B * n, L)
        vectors, residuals = step["vectors"], step["residuals"]
        h_hat = step["h_hat"] if "h_hat" in step else self.attend_own_codewords(user_state, item_state["codes"])
        h_ta, ta_logit = self._teacher(user_state["vector"], item_state, vectors, step["flat"], step["behaviours"], step["mask"])
        target = h_ta.detach()
        label = batch[self.schema.label].reshape(ta_logit.shape).to(ta_logit.dtype)
        losses = {
            "teacher_bce": c.teacher_weight * F.binary_cross_entropy_with_logits(ta_logit, label),
            "distill": c.distill_weight * 0.5 * ((h_hat - target) ** 2).sum(-1).mean(),
        }
        chosen = self.codebooks[torch.arange(L, device=codes.device), codes]  # [B·N, L, d]
        if c.commitment_weight > 0:
            losses["commitment"] = c.commitment_weight * ((residuals - chosen.detach()) ** 2).sum(-1).mean()
        if c.codebook_update == "loss" and c.codebook_weight > 0:
            losses["codebook"] = c.codebook_weight * ((residuals.detach() - chosen) ** 2).sum(-1).mean()
        if c.align:
            # All K codewords per level are needed here: the first `align_rows` users of the
            # (shuffled) batch and all their candidates.
            rows = min(c.align_rows, B)
            memory = tuple(user_state[k][:rows] for k in ("memory_keys", "memory_values", "memory_mask"))
            personal = self.student_attention.attend(step["queries"].flatten(0, 1), memory)
            personal = personal.reshape(rows, 1, L, c.codebook_size, -1).expand(-1, n, -1, -1, -1).flatten(0, 1)
            sub = rows * n
            losses["align"] = c.align_weight * self._alignment(
                codes[:sub], residuals[:sub], target.reshape(B * n, -1)[:sub], personal)
        self._record_codebook_step(codes, residuals.detach())
        return losses

    def _alignment(self, codes: Tensor, residuals: Tensor, target: Tensor, personal: Tensor) -> Tensor:
        """codes [M, L], residuals [M, L, d], target sg(h_TA) [M, d], personal codebooks [M, L, K, d]."""
        total = residuals.new_zeros(())
        attention_residual = target
        rows = torch.arange(len(codes), device=codes.device)
        for level in range(self.config.levels):
            item_side = self._code_distribution(((residuals[:, level, None, :] - self.codebooks[level]) ** 2).sum(-1))
            attention_side = self._code_distribution(((attention_residual[:, None, :] - personal[:, level]) ** 2).sum(-1))
            total = total + symmetric_kl(item_side, attention_side).mean()
            attention_residual = attention_residual - personal[rows, level, codes[:, level]]
        return total

    def _code_distribution(self, squared_distances: Tensor) -> Tensor:
        """softmax_k(−||·||² / τ) over the K codes; with `align_normalise`, the distances are first
        divided by their detached mean over the K codes, which makes the term independent of the
        vectors' scale (at the official unit temperature, vectors of norm ~0.1 give two near-uniform
        distributions and a KL of ~1e-7 whatever the codes)."""
        if self.config.align_normalise:
            squared_distances = squared_distances / squared_distances.detach().mean(-1, keepdim=True).clamp_min(1e-12)
        return (-squared_distances / self.config.align_temperature).softmax(-1)

    # -- codebook maintenance -----------------------------------------------------------------
    @torch.no_grad()
    def _record_codebook_step(self, codes: Tensor, residuals: Tensor) -> None:
        """Usage statistics of this step, and the codebook update to apply before the next one."""
        c = self.config
        self.batch_utilisation.append(codebook_usage(codes, c.codebook_size)["utilisation"])
        used = F.one_hot(codes, c.codebook_size).sum(0) > 0  # [L, K]
        pending: dict[str, Tensor] = {}
        if c.codebook_update == "ema":
            pending["ema_sum"], pending["ema_count"], pending["codebooks"] = ema_codebook_step(
                self.ema_sum, self.ema_count, codes, residuals, c.ema_decay)
        if c.dead_code_restart:
            age = torch.where(used, torch.zeros_like(self.code_age), self.code_age + 1)
            dead = age >= c.restart_after
            if dead.any():
                books = pending.get("codebooks", self.codebooks.detach()).clone()
                # Each dead codeword takes a random residual of its level from this batch.
                picks = torch.randint(0, len(residuals), (int(dead.sum()),), device=residuals.device)
                level_of = dead.nonzero()[:, 0]
                books[dead] = residuals[picks, level_of]
                pending["codebooks"] = books
                if c.codebook_update == "ema":
                    pending["ema_sum"] = torch.where(dead.unsqueeze(-1), books, pending["ema_sum"])
                    pending["ema_count"] = torch.where(dead, torch.ones_like(pending["ema_count"]), pending["ema_count"])
                age = age.masked_fill(dead, 0)
            pending["code_age"] = age
        self._pending = pending

    @torch.no_grad()
    def _apply_pending_codebook_update(self) -> None:
        if self._pending:
            for name, value in self._pending.items():
                getattr(self, name).copy_(value)
        self._pending = None
