"""IntTower: a two-tower model with implicit user-item interaction.

Li, Chen, et al., "IntTower: the Next Generation of Two-Tower Model for Pre-Ranking System",
CIKM 2022 (arXiv 2210.09890); official code `archersama/IntTower` (PyTorch) and
`mindspore-ai/models/research/recommend/IntTower` (MindSpore). Spec:
`shared/design/models/baselines-and-ranktower.md` §5. The paper's full text was not available;
Figure 3, Table 2 and both code bases were.

Light-SE (per tower, over the F pooled id-feature embeddings E [F, d]):

    z = mean_d(E)                       squeeze, one scalar per field
    a = softmax(W z + b)                one linear layer, softmax over fields
    E' = E + E * a                      residual re-weighting; E' is flattened, dense features appended

Towers: L fully connected layers (300, 300, 128), each Linear -> BatchNorm -> ReLU -> Dropout.

FE-Block (`fe_block`):
- ``"output"`` (default; Figure 3 and the MindSpore code): user heads from the output h_u^l of
  every user layer l, item heads from the last item layer:
      M_u^l = reshape(ReLU(W_u^l h_u^l + b), [H, d_h]),   M_v = reshape(W_v h_v^L + b, [H, d_h])
- ``"input"`` (the PyTorch code): user heads from the *input* of every user layer (the tower
  input x_u, h_u^1, h_u^2; the last user output is never used), plain linear projections.

Late interaction, sum-max (the only per-candidate work):

    s(u, v) = sum_l sum_{i<=H} max_{j<=H} <M_u^l[i], M_v[j]>,      logit = s (+ b if `output_bias`)

CIR (contrastive interaction regularisation, optional, `cir_weight` > 0). The paper's equation is
not available; we use an in-batch InfoNCE over the L2-normalised top tower outputs
u_b = h_u^L / |h_u^L|, v_b = h_v^L / |h_v^L| (the representations that feed CIR in Figure 3):

    L_cir = -(1/|P|) sum_{b in P} log( exp(u_b . v_b / tau) / sum_{j<=B} exp(u_b . v_j / tau) )

over the positive rows P of the batch; every other row's item is a negative (rows with the same
item count as negatives too). Under `fe_block="input"` u and v are the last user-head and the
item-head projections, as in the PyTorch code's (removed) CIR. The loss added is `cir_weight * L_cir`. Both official code bases
train without CIR (the maintainer removed it as hard to tune, issue #4), so the default is 0.

Readings we chose where the sources are silent or disagree (all config options):
- `light_se`: "both" towers (Figure 3, PyTorch code) or "user" only (MindSpore); bias on (MindSpore).
- `heads` H = 4, `head_dim` d_h = 64 (MindSpore ML-1M); the PyTorch script uses 32 x 64.
- `dropout` 0.1 (MindSpore); the PyTorch ML-1M script uses 0.3.
- `output_bias`: off in MindSpore, on in PyTorch.
- `multi_layer`: False keeps only the last user layer's heads.
- `init_std`: the PyTorch code draws every tower and head weight from N(0, 1e-4). With
  PyTorch's default init, its 32 x 64 heads summed over three layers start with logits in the
  tens and training diverges, so `inttower@paper` sets 1e-4; the default (4 x 64 heads) keeps
  PyTorch's init.
- Embedding L2 (1e-5 x sum of squares under a summed BCE in the PyTorch code) is left out: under
  the trainer's mean BCE it would be ~2000x weaker than there, i.e. negligible.
- The behaviour sequence (when the protocol provides one) is one more pooled user field; the
  official scripts feed none (`--seq-len 0` reproduces them).

Serving: the item state holds the item heads M_v [H, d_h] (computed offline); the user state the
heads of every user layer [L, H, d_h] (once per request); `score` is L*H*H dot products of length
d_h plus max and sum per candidate.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prerank.config import DropoutRate, NonNegativeFloat, PositiveFloat, PositiveInt
from prerank.data.schema import Schema
from prerank.models.base import PreRankModel, State, config_dataclass, register
from prerank.models.layers import MLP, EmbeddingBank, FieldEncoder, Fields, TowerConfig


@config_dataclass
class IntTowerConfig(TowerConfig):
    dropout: DropoutRate = 0.1
    light_se: Literal["both", "user", "none"] = "both"
    light_se_bias: bool = True
    fe_block: Literal["output", "input"] = "output"
    heads: PositiveInt = 4
    head_dim: PositiveInt = 64
    multi_layer: bool = True
    output_bias: bool = False
    cir_weight: NonNegativeFloat = 0.0
    cir_temperature: PositiveFloat = 0.07
    init_std: PositiveFloat | None = None  # None: PyTorch's default init of the linear layers


class LightSE(nn.Module):
    """E' = E * (1 + softmax(W mean_d(E) + b)): one linear layer re-weights the F fields."""

    def __init__(self, num_fields: int, bias: bool = True) -> None:
        super().__init__()
        self.excite = nn.Linear(num_fields, num_fields, bias=bias)

    def weights(self, embeddings: Tensor) -> Tensor:
        """Field embeddings E [..., F, d] -> a = softmax(W mean_d(E) + b) [..., F], over the fields."""
        return torch.softmax(self.excite(embeddings.mean(-1)), dim=-1)

    def forward(self, embeddings: Tensor) -> Tensor:
        """E [..., F, d] -> E' = E * (1 + a) [..., F, d]."""
        return embeddings * (1.0 + self.weights(embeddings)).unsqueeze(-1)


class LayeredTower(nn.Module):
    """An MLP whose every layer's input and output are returned (the FE-Block reads them)."""

    def __init__(self, in_dim: int, hidden: tuple[int, ...], activation: str, batch_norm: bool, dropout: float) -> None:
        super().__init__()
        dims = (in_dim, *hidden)
        self.layers = nn.ModuleList(
            MLP(dims[i], (dims[i + 1],), activation=activation, batch_norm=batch_norm, dropout=dropout) for i in range(len(hidden))
        )

    def forward(self, x: Tensor) -> list[Tensor]:
        """x [..., in_dim] -> [x, h^1, ..., h^L]: the input followed by every layer's output, h^l
        [..., hidden[l-1]]."""
        out = [x]
        for layer in self.layers:
            out.append(layer(out[-1]))
        return out


class _Side(nn.Module):
    def __init__(self, fields: FieldEncoder, se: bool, se_bias: bool, c: IntTowerConfig, hidden: tuple[int, ...]) -> None:
        super().__init__()
        self.fields = fields
        self.light_se = LightSE(fields.num_fields, se_bias) if se and fields.num_fields > 0 else None
        self.tower = LayeredTower(fields.flat_dim, hidden, c.activation, c.batch_norm, c.dropout)

    def forward(self, features: dict[str, Tensor]) -> list[Tensor]:
        fields = self.fields(features)
        if self.light_se is not None:
            fields = Fields(self.light_se(fields.embeddings), fields.dense)
        return self.tower(fields.flat())


@register
class IntTower(PreRankModel):
    name = "inttower"
    Config = IntTowerConfig

    def __init__(self, schema: Schema, config: IntTowerConfig) -> None:
        super().__init__(schema, config)
        c = config
        hidden = tuple(c.hidden)
        # Which entries of the user tower's [x, h^1, ..., h^L] the user heads read.
        sources = list(range(1, len(hidden) + 1)) if c.fe_block == "output" else list(range(len(hidden)))
        self.user_sources = sources if c.multi_layer else sources[-1:]
        self.embeddings = EmbeddingBank(schema, init_std=c.embed_init_std)
        user_fields = FieldEncoder(self.embeddings, schema.user_features)
        # The "input" variant never reads the last user layers' outputs: they are not built.
        self.user = _Side(user_fields, c.light_se != "none", c.light_se_bias, c, hidden[: max(self.user_sources)])
        self.item = _Side(FieldEncoder(self.embeddings, schema.item_features), c.light_se == "both", c.light_se_bias, c, hidden)
        width = c.heads * c.head_dim
        dims = (user_fields.flat_dim, *hidden)
        self.user_heads = nn.ModuleList(nn.Linear(dims[s], width) for s in self.user_sources)
        self.item_heads = nn.Linear(c.hidden[-1], width)
        self.bias = nn.Parameter(torch.zeros(())) if c.output_bias else None
        # A CIR training step's vectors, from `batch_states` to `auxiliary_losses`.
        self._cir: tuple[Tensor, Tensor] | None = None
        if c.init_std is not None:
            for module in (self.user.tower, self.item.tower, self.user_heads, self.item_heads):
                for layer in module.modules():
                    if isinstance(layer, nn.Linear):
                        nn.init.normal_(layer.weight, std=c.init_std)
                        nn.init.zeros_(layer.bias)

    def _split_heads(self, x: Tensor) -> Tensor:
        return x.reshape(*x.shape[:-1], self.config.heads, self.config.head_dim)

    def _encode_items(self, items: dict[str, Tensor]) -> tuple[State, Tensor]:
        """(item state, CIR vector [M, D]): the normalised top item output (D = hidden[-1]; under
        `fe_block="input"` the head projection, D = H·d_h)."""
        top = self.item(items)[-1]
        projected = self.item_heads(top)
        return {"heads": self._split_heads(projected)}, F.normalize(top if self.config.fe_block == "output" else projected, dim=-1)

    def _encode_user(self, user: dict[str, Tensor]) -> tuple[State, Tensor]:
        """(user state, CIR vector [B, D]), as `_encode_items`."""
        layers = self.user(user)
        heads = []
        for source, project in zip(self.user_sources, self.user_heads):
            h = project(layers[source])
            heads.append(torch.relu(h) if self.config.fe_block == "output" else h)
        state = {"heads": torch.stack([self._split_heads(h) for h in heads], dim=-3)}  # [B, L, H, d_h]
        return state, F.normalize(layers[-1] if self.config.fe_block == "output" else heads[-1], dim=-1)

    def encode_items(self, items: dict[str, Tensor]) -> State:
        """Item features {name: [M] or [M, S]} -> {"heads": M_v [M, H, d_h]}."""
        return self._encode_items(items)[0]

    def encode_user(self, user: dict[str, Tensor]) -> State:
        """User features {name: [B] or [B, S]} -> {"heads": [B, L, H, d_h]}, one set of heads per user
        layer read (L = the tower's layers with `multi_layer`, else 1)."""
        return self._encode_user(user)[0]

    def batch_states(self, batch: dict[str, Tensor]) -> tuple[State, State]:
        """The serving states ({"heads": [B, L, H, d_h]}, {"heads": [B, N, H, d_h]}); in training with
        `cir_weight` > 0 (pointwise batches only, N = 1) computed together with the CIR vectors, which
        `auxiliary_losses` takes and which never enter a state."""
        if not (self.training and self.config.cir_weight > 0):
            return super().batch_states(batch)
        items = self.item_inputs(batch)
        if items[self.schema.item_id].dim() != 1:
            raise ValueError("inttower: CIR is defined for pointwise batches (one item per row)")
        user_state, user_cir = self._encode_user(self.user_inputs(batch))
        item_state, item_cir = self._encode_items(items)
        self._cir = (user_cir, item_cir)
        return user_state, {k: v.unsqueeze(1) for k, v in item_state.items()}

    def score(self, user_state: State, item_state: State, mask: Tensor | None = None) -> Tensor:
        """User heads {"heads": [B, L, H, d_h]} and item heads {"heads": [B, N, H, d_h]} -> logits
        [B, N] = sum_l sum_i max_j <M_u^l[i], M_v[j]> (+ b). Pointwise: `mask` is not needed."""
        # sim[b, n, l, i, j] = <M_u^l[i], M_v[j]>; max over item heads j, sum over user heads i and layers l.
        sim = torch.einsum("blid,bnjd->bnlij", user_state["heads"], item_state["heads"])
        logits = sim.amax(-1).sum((-1, -2))
        return logits + self.bias if self.bias is not None else logits

    def score_shared(self, user_state: State, item_state: State) -> Tensor:
        """User heads {"heads": [B, L, H, d_h]} against one list's item heads {"heads": [N, H, d_h]}
        -> logits [B, N]: the same sum of max similarities as `score`, all B·L·H user heads against
        all N·H item heads in one matmul (twice `score`'s speed over a 12k-item catalogue)."""
        user, items = user_state["heads"], item_state["heads"]
        b, layers, heads, dim = user.shape
        sim = (user.reshape(-1, dim) @ items.reshape(-1, dim).T).view(b, layers * heads, len(items), items.shape[1])
        logits = sim.amax(-1).sum(1)
        return logits + self.bias if self.bias is not None else logits

    def auxiliary_losses(self, batch, user_state, item_state, logits) -> dict[str, Tensor]:
        """With `cir_weight` > 0: this step's CIR vectors [B, D] (from `batch_states`) and the label
        [B] -> {"cir": cir_weight * L_cir []}; otherwise no losses."""
        if self.config.cir_weight <= 0:
            return {}
        (user_cir, item_cir), self._cir = self._cir, None
        loss = cir_loss(user_cir, item_cir, batch[self.schema.label], self.config.cir_temperature)
        return {"cir": self.config.cir_weight * loss}


def cir_loss(user: Tensor, item: Tensor, label: Tensor, temperature: float) -> Tensor:
    """In-batch InfoNCE of each positive row's user against all the batch's items (module docstring):
    `user`, `item` [B, D] (unit norm), `label` [B] -> []; 0 for a batch without positives."""
    positive = label > 0.5
    if not positive.any():
        return user.sum() * 0.0
    log_p = torch.log_softmax(user @ item.T / temperature, dim=-1)
    return -log_p.diagonal()[positive].mean()
