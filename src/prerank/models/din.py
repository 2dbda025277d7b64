"""DIN-style ranking teacher: the cascade's full-interaction ranker (not a pre-ranker).

Zhou et al., "Deep Interest Network for Click-Through Rate Prediction", KDD 2018:

    v_U(A) = sum_j a(e_j, v_A) e_j                      Eq. 3, target attention of candidate A
                                                        over the behaviour sequence (TargetAttention)
    logit  = MLP([e_user_fields; e_item_fields; v_U(A); v_U(A) * v_A; crosses]) + b

plus explicit feature crosses, as ranking models on these datasets use (DeepFM/DCN-style):
`crosses` holds the inner products <e_user_f, e_item_g> of every user field with every item field
and <v_U(A), e_item_g>. Those terms need both sides, so nothing beyond embedding lookups can be
hoisted: the item state is the item's raw field embeddings and the user state its field embeddings
and embedded sequence; all the work is in `score` (`decoupled = False`, `is_ranker = True`).

Readings we chose (config options):
- `attention_query`: the query is the candidate's item-id embedding (DIN's goods_id), the keys
  the sequence's item-id embeddings (the same table).
- `attention_softmax`: DIN's original unnormalised weights (False) by default.
- `crosses`: the inner-product crosses above on (True) by default; False gives a plain DIN.
- MLP (200, 80) with PReLU, as in DIN's paper; no batch norm so scoring is per candidate.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from prerank.config import DropoutRate, LayerSizes, PositiveFloat
from prerank.data.schema import PAD_INDEX, Kind, Schema
from prerank.models.base import PreRankModel, State, config_dataclass, register
from prerank.models.layers import MLP, Activation, EmbeddingBank, FieldEncoder, TargetAttention, TowerLayers


@config_dataclass
class DINConfig:
    hidden: TowerLayers = (200, 80)
    activation: Activation = "prelu"
    dropout: DropoutRate = 0.0
    attention_hidden: LayerSizes = (80, 40)
    attention_softmax: bool = False
    crosses: bool = True
    embed_init_std: PositiveFloat = 0.01


@register
class DIN(PreRankModel):
    """DIN-style ranking teacher with target attention and user x item feature crosses."""

    name = "din"
    Config = DINConfig
    decoupled = False
    is_ranker = True

    def __init__(self, schema: Schema, config: DINConfig) -> None:
        super().__init__(schema, config)
        c = config
        self.embeddings = EmbeddingBank(schema, init_std=c.embed_init_std)
        self.sequence = schema.sequence_feature
        self.user_fields = FieldEncoder(self.embeddings, tuple(f for f in schema.user_features if f.kind is not Kind.SEQUENCE))
        self.item_fields = FieldEncoder(self.embeddings, schema.item_features)
        self.item_id = schema[schema.item_id]
        d = self.item_id.embed_dim
        if self.sequence is not None:
            self.attention = TargetAttention(d, tuple(c.attention_hidden), softmax=c.attention_softmax)
        n_u, n_v = self.user_fields.num_fields, self.item_fields.num_fields
        if c.crosses and self.user_fields.embed_dim != self.item_fields.embed_dim:
            raise ValueError(f"din: crosses need user and item fields of one embedding dim, got {self.user_fields.embed_dim} "
                             f"and {self.item_fields.embed_dim}: give every table one dim in the option embed_dim, or set "
                             "crosses=False")
        n_cross = (n_u * n_v + (n_v if self.sequence is not None else 0)) if c.crosses else 0
        in_dim = self.user_fields.flat_dim + self.item_fields.flat_dim + (2 * d if self.sequence is not None else 0) + n_cross
        self.mlp = nn.Sequential(MLP(in_dim, tuple(c.hidden), activation=c.activation, dropout=c.dropout), nn.Linear(c.hidden[-1], 1))

    def encode_items(self, items: dict[str, Tensor]) -> State:
        """Item features {name: [M] or [M, S]} -> {"fields": [M, F_v, d], "dense": [M, n_v], "query":
        the item-id embedding [M, d]}: lookups only, the rest needs the user (`score`)."""
        fields = self.item_fields(items)
        return {"fields": fields.embeddings, "dense": fields.dense, "query": self.embeddings.lookup(self.item_id, items[self.item_id.name])}

    def encode_user(self, user: dict[str, Tensor]) -> State:
        """User features {name: [B] or [B, S]} -> {"fields": [B, F_u, d] (the sequence not among them),
        "dense": [B, n_u]} and, with a behaviour sequence, {"sequence": [B, S, d], "sequence_mask":
        [B, S] bool}: lookups only."""
        fields = self.user_fields(user)
        state = {"fields": fields.embeddings, "dense": fields.dense}
        if self.sequence is not None:
            ids = user[self.sequence.name]
            state["sequence"] = self.embeddings.lookup(self.sequence, ids)
            state["sequence_mask"] = ids != PAD_INDEX
        return state

    def score(self, user_state: State, item_state: State, mask: Tensor | None = None) -> Tensor:
        """User state ([B, F_u, d], [B, n_u], [B, S, d], [B, S]) and item state ([B, N, F_v, d],
        [B, N, n_v], [B, N, d]) -> logits [B, N]: target attention, crosses and the MLP for every
        (user, candidate) pair. Pointwise: `mask` is not needed."""
        n = item_state["fields"].shape[1]
        user_fields = user_state["fields"].unsqueeze(1).expand(-1, n, -1, -1)  # [B, N, Fu, d]
        item_fields = item_state["fields"]  # [B, N, Fv, d]
        parts = [user_fields.flatten(-2), user_state["dense"].unsqueeze(1).expand(-1, n, -1), item_fields.flatten(-2), item_state["dense"]]
        if self.sequence is not None:
            query = item_state["query"]  # [B, N, d]
            keys = user_state["sequence"].unsqueeze(1).expand(-1, n, -1, -1)  # [B, N, L, d]
            mask = user_state["sequence_mask"].unsqueeze(1).expand(-1, n, -1)
            interest = self.attention(query, keys, mask)
            parts += [interest, interest * query]
        if self.config.crosses:
            parts.append(torch.einsum("bnud,bnvd->bnuv", user_fields, item_fields).flatten(-2))
            if self.sequence is not None:
                parts.append(torch.einsum("bnd,bnvd->bnv", interest, item_fields))
        return self.mlp(torch.cat(parts, dim=-1)).squeeze(-1)
