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
the query of a target attention over the user's behaviour sequence:
    X̄[l, k] = TA_s(c_{l,k}; X_seq)   in R^{L x K x d}

Per candidate (`score`), O(L·d):
    ĥ(u, v) = Σ_l X̄[l, z_l(v)]
    logit = s_tt(u, v) + attention_weight · <ĥ, W_h v_item> + b        [I] the composition

Teacher (training only): target attention with the real item as query,
    h_TA = TA_t(q(x_item); X_seq),   ta_logit = MLP([h_TA; q; h_TA ⊙ q]),   L_ta = BCE(ta_logit, y)
co-trained in the same graph as in the official code.

Distillation (official code): L_rec = (1/2B) Σ_b ||ĥ_b − sg(h_TA,b)||²

Codebook alignment (official code), per level l, with p over all K codes:
    p_l(k) = softmax_k(−||r_l − c_{l,k}||²),   p̄_l(k) = softmax_k(−||r̄_l − X̄[l,k]||²)
    r̄_1 = sg(h_TA), both residual chains advanced with the item-space index z_l
    L_align = λ_KL Σ_l mean_b [KL(p_l ‖ p̄_l) + KL(p̄_l ‖ p_l)]

Total: L = BCE(logit, y) + L_ta + L_rec + L_align (+ optional VQ commitment).

Readings we chose where the sources are silent (each a config option):
- `combine`: how ĥ enters the served logit. Default "sum": two-tower logit plus the attention
  logit <ĥ, W_h v_item>; "attention_only" drops the two-tower term.
- Both attentions are `torch.nn.MultiheadAttention` (scaled dot product, `attention_heads`
  heads) with a learnable null key so an empty sequence is defined; the student is separate from
  the teacher unless `share_attention`. The official class name says the student is "light";
  dot-product attention keeps the L·K queries per request cheap (a DIN MLP per query would cost
  ~100x more).
- The behaviour sequence is used as raw item embeddings (no self-attention encoder before the
  target attention, which the reviews mention); the item query of the teacher and the item
  encoder g are small MLPs over the item fields.
- `codebook_init`: "kmeans" (default) runs residual k-means on the item vectors of the first
  training batch; "random" draws N(0, 1/d). `commitment_weight` (default 0) adds the VQ-VAE
  commitment term ||r_l − sg(c_{l,z_l})||², which the public file does not show.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prerank.data.schema import PAD_INDEX, Schema
from prerank.models.base import PreRankModel, State, config_dataclass, register
from prerank.models.layers import MLP
from prerank.models.two_tower import TowerPair


@config_dataclass
class TarqConfig:
    hidden: tuple[int, ...] = (300, 300, 128)
    activation: str = "relu"
    batch_norm: bool = True
    dropout: float = 0.0
    temperature: float = 0.05
    embed_init_std: float = 0.01
    levels: int = 3  # L
    codebook_size: int = 64  # K
    codebook_init: Literal["kmeans", "random"] = "kmeans"
    kmeans_iterations: int = 10
    attention_heads: int = 2
    share_attention: bool = False
    combine: Literal["sum", "attention_only"] = "sum"
    attention_weight: float = 1.0
    teacher_weight: float = 1.0
    distill_weight: float = 1.0
    align: bool = True
    align_weight: float = 1.0  # λ_KL, the official default
    commitment_weight: float = 0.0
    item_encoder_hidden: tuple[int, ...] = (64,)


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
    """Codebooks [L, K, d] from k-means on the residuals of each level in turn."""
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


def codebook_usage(codes: Tensor, codebook_size: int) -> dict[str, list[float]]:
    """Per level: utilisation (distinct codes used / K) and the entropy (nats) of the code frequencies."""
    utilisation, entropy = [], []
    for level in codes.T:
        counts = torch.bincount(level.long(), minlength=codebook_size).double()
        freq = counts[counts > 0] / counts.sum()
        utilisation.append(float((counts > 0).sum() / codebook_size))
        entropy.append(float(-(freq * freq.log()).sum()))
    return {"utilisation": utilisation, "entropy": entropy}


def symmetric_kl(p: Tensor, q: Tensor, eps: float = 1e-8) -> Tensor:
    """KL(p‖q) + KL(q‖p) over the last dim, with the official code's epsilon."""
    return (p * ((p + eps) / (q + eps)).log()).sum(-1) + (q * ((q + eps) / (p + eps)).log()).sum(-1)


class _NullKeyAttention(nn.Module):
    """Multi-head target attention of queries over a padded sequence, with one learnable null key
    always present so that an empty sequence gives a defined output."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.null = nn.Parameter(torch.zeros(1, 1, dim))

    def forward(self, queries: Tensor, keys: Tensor, mask: Tensor) -> Tensor:
        """queries [B, Q, d], keys [B, n, d], mask [B, n] (True = real item) -> [B, Q, d]."""
        keys = torch.cat([self.null.expand(len(keys), 1, -1), keys], dim=1)
        padding = torch.cat([mask.new_zeros(len(mask), 1), ~mask], dim=1)
        return self.attention(queries, keys, keys, key_padding_mask=padding, need_weights=False)[0]


@register
class Tarq(PreRankModel):
    name = "tarq"
    Config = TarqConfig

    def __init__(self, schema: Schema, config: TarqConfig) -> None:
        super().__init__(schema, config)
        c = config
        self.sequence = schema.sequence_feature
        if self.sequence is None:
            raise ValueError("tarq needs a behaviour-sequence feature in the schema (use --seq-len > 0)")
        self.towers = TowerPair(schema, c.hidden, c.activation, c.batch_norm, c.dropout, c.embed_init_std)
        dim = self.sequence.embed_dim
        item_flat = self.towers.item_fields.flat_dim
        self.item_encoder = MLP(item_flat, (*c.item_encoder_hidden, dim), output_activation=False)
        self.codebooks = nn.Parameter(torch.randn(c.levels, c.codebook_size, dim) / math.sqrt(dim))
        self.register_buffer("codebooks_ready", torch.tensor(c.codebook_init == "random"))
        self.student_attention = _NullKeyAttention(dim, c.attention_heads)
        self.teacher_attention = self.student_attention if c.share_attention else _NullKeyAttention(dim, c.attention_heads)
        self.teacher_query = MLP(item_flat, (dim,), output_activation=False)
        self.teacher_head = nn.Sequential(MLP(3 * dim, (64,)), nn.Linear(64, 1))
        self.head_key = nn.Linear(self.towers.item_tower.out_dim, dim, bias=False)
        self.log_inv_temperature = nn.Parameter(torch.tensor(-math.log(c.temperature)))
        self.bias = nn.Parameter(torch.zeros(()))

    # -- stages -------------------------------------------------------------------------------
    def _behaviours(self, user: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        ids = user[self.sequence.name]
        return self.towers.embeddings.lookup(self.sequence, ids), ids != PAD_INDEX

    def encode_items(self, items: dict[str, Tensor]) -> State:
        flat = self.towers.item_fields(items).flat()
        tower_out = self.towers.item_tower(flat)
        codes, _ = residual_quantize(self.item_encoder(flat), self.codebooks)
        return {"vector": F.normalize(tower_out, dim=-1), "codes": codes, "head_key": self.head_key(tower_out)}

    def encode_user(self, user: dict[str, Tensor]) -> State:
        vector = F.normalize(self.towers.user_tower(self.towers.user_fields(user).flat()), dim=-1)
        behaviours, mask = self._behaviours(user)
        L, K, d = self.codebooks.shape
        queries = self.codebooks.reshape(1, L * K, d).expand(len(behaviours), -1, -1)
        personal = self.student_attention(queries, behaviours, mask).reshape(-1, L, K, d)
        return {"vector": vector, "personal_codebook": personal}

    def approximate_attention(self, personal: Tensor, codes: Tensor) -> Tensor:
        """ĥ = Σ_l X̄[l, z_l]: personal [B, L, K, d], codes [B, N, L] -> [B, N, d]."""
        B, N, L = codes.shape
        levels = torch.arange(L, device=codes.device).expand(B, N, L)
        batch = torch.arange(B, device=codes.device)[:, None, None].expand(B, N, L)
        return personal[batch, levels, codes].sum(-2)

    def score(self, user_state: State, item_state: State) -> Tensor:
        h_hat = self.approximate_attention(user_state["personal_codebook"], item_state["codes"])
        logit = self.config.attention_weight * (h_hat * item_state["head_key"]).sum(-1) + self.bias
        if self.config.combine == "sum":
            scale = self.log_inv_temperature.clamp(max=math.log(100.0)).exp()
            logit = logit + torch.einsum("bd,bnd->bn", user_state["vector"], item_state["vector"]) * scale
        return logit

    # -- training -----------------------------------------------------------------------------
    def teacher(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """The target-attention teacher on pointwise rows: (attention output h_TA [B, d], logit [B])."""
        behaviours, mask = self._behaviours(self.user_inputs(batch))
        query = self.teacher_query(self.towers.item_fields(self.item_inputs(batch)).flat())
        h_ta = self.teacher_attention(query.unsqueeze(1), behaviours, mask).squeeze(1)
        return h_ta, self.teacher_head(torch.cat([h_ta, query, h_ta * query], -1)).squeeze(-1)

    @torch.no_grad()
    def initialise_codebooks(self, items: dict[str, Tensor]) -> None:
        vectors = self.item_encoder(self.towers.item_fields(items).flat())
        generator = torch.Generator().manual_seed(0)
        c = self.config
        self.codebooks.copy_(residual_kmeans(vectors.cpu(), c.levels, c.codebook_size, c.kmeans_iterations, generator).to(vectors))
        self.codebooks_ready.fill_(True)

    def forward(self, batch: dict[str, Tensor]):
        if self.training and not bool(self.codebooks_ready):
            self.initialise_codebooks(self.item_inputs(batch))
        return super().forward(batch)

    def auxiliary_losses(self, batch, user_state, item_state, logits) -> dict[str, Tensor]:
        c = self.config
        h_ta, ta_logit = self.teacher(batch)
        target = h_ta.detach()
        label = batch[self.schema.label].reshape(-1)
        personal = user_state["personal_codebook"]
        codes = item_state["codes"].reshape(len(label), 1, -1)
        h_hat = self.approximate_attention(personal, codes).squeeze(1)
        losses = {
            "teacher_bce": c.teacher_weight * F.binary_cross_entropy_with_logits(ta_logit, label),
            "distill": c.distill_weight * 0.5 * ((h_hat - target) ** 2).sum(-1).mean(),
        }
        if c.align or c.commitment_weight > 0:
            vectors = self.item_encoder(self.towers.item_fields(self.item_inputs(batch)).flat())
            z, residuals = residual_quantize(vectors, self.codebooks)
            if c.align:
                losses["align"] = c.align_weight * self._alignment(z, residuals, target, personal)
            if c.commitment_weight > 0:
                chosen = self.codebooks[torch.arange(c.levels), z]  # [B, L, d]
                losses["commitment"] = c.commitment_weight * ((residuals - chosen.detach()) ** 2).sum(-1).mean()
        return losses

    def _alignment(self, codes: Tensor, residuals: Tensor, target: Tensor, personal: Tensor) -> Tensor:
        total = residuals.new_zeros(())
        attention_residual = target
        batch = torch.arange(len(codes), device=codes.device)
        for level in range(self.config.levels):
            item_side = (-((residuals[:, level, None, :] - self.codebooks[level]) ** 2).sum(-1)).softmax(-1)
            attention_side = (-((attention_residual[:, None, :] - personal[:, level]) ** 2).sum(-1)).softmax(-1)
            total = total + symmetric_kl(item_side, attention_side).mean()
            attention_residual = attention_residual - personal[batch, level, codes[:, level]]
        return total
