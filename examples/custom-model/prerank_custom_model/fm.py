"""A factorisation machine, split exactly into a user tower and an item tower.

Rendle, "Factorization Machines", ICDM 2010. Over fields f with embedding e_f [D] and linear weight
w_f (an id's rows of two tables; a dense feature's value times a learned vector and weight):

    y = w0 + sum_f w_f + sum_{f<g} <e_f, e_g>

The pairs split by side. With U the user (and context) fields and I the item fields,

    sum_{f<g} <e_f, e_g> = pairs(U) + pairs(I) + <sum_U e_f, sum_I e_g>,
    pairs(S) = 1/2 (||sum_S e_f||^2 - sum_S ||e_f||^2)

so the FM is a two-tower whose towers are sums of embeddings, plus one scalar per side:

    user state  vector_u = sum_U e_f [B, D],   bias_u = sum_U w_f + pairs(U) [B]
    item state  vector_i = sum_I e_g [M, D],   bias_i = sum_I w_g + pairs(I) [M]
    logit       <vector_u, vector_i> + bias_u + bias_i + w0

Serving stores D + 1 floats per item and costs one dot product per candidate; nothing is
approximated, the split is exact.

Readings we chose (config options where it matters):
- A bag or behaviour sequence is one field: the masked mean of its ids' embeddings and weights.
- `same_side_pairs`: keep pairs(U) and pairs(I) (the full FM, default). Without them the model is
  a pure dot product plus linear terms; the same-side pairs are free at serving (a per-user and a
  per-item scalar) but move calibration, which pointwise log loss measures.
- Features sharing a vocabulary (a behaviour sequence and the item id) share their tables.

This file is the whole plugin: the package's pyproject.toml declares it under the
`prerank.models` entry point. It keeps the contract and does not define `forward`.
"""

from __future__ import annotations

import torch
from pydantic import PositiveFloat
from torch import Tensor, nn

from prerank.data.schema import PAD_INDEX, Feature, Schema
from prerank.models.base import EmbedDims, PreRankModel, State, config_dataclass
from prerank.models.layers import masked_mean


@config_dataclass
class FactorizationMachineConfig:
    # D for every table (the FM's inner products need one size); every model config takes
    # `embed_dim`, and this one sets its own default instead of the data schema's dims.
    embed_dim: EmbedDims = 16
    init_std: PositiveFloat = 0.01
    same_side_pairs: bool = True


class FactorizationMachine(PreRankModel):
    """Factorisation machine as a pre-ranker: each side's fields summed into one vector and one bias."""

    name = "example_fm"
    Config = FactorizationMachineConfig

    def __init__(self, schema: Schema, config: FactorizationMachineConfig) -> None:
        super().__init__(schema, config)
        dims = {f.embed_dim for f in schema.features if f.is_id}
        if len(dims) > 1:
            raise ValueError(f"example_fm needs one embedding dim for every table, got {sorted(dims)}; set embed_dim=<int>")
        dim = dims.pop() if dims else 16  # no id feature: D only sizes the dense features' vectors
        self.vectors = nn.ModuleDict()  # vocabulary -> [V, D]
        self.weights = nn.ModuleDict()  # vocabulary -> [V, 1]
        self.dense_vectors = nn.ParameterDict()  # dense feature -> [D]
        self.dense_weights = nn.ParameterDict()  # dense feature -> []
        for feature in schema.features:
            if feature.is_id and feature.vocab not in self.vectors:
                self.vectors[feature.vocab] = nn.Embedding(feature.vocab_size, dim, padding_idx=PAD_INDEX)
                self.weights[feature.vocab] = nn.Embedding(feature.vocab_size, 1, padding_idx=PAD_INDEX)
                nn.init.normal_(self.vectors[feature.vocab].weight, std=config.init_std)
                nn.init.zeros_(self.weights[feature.vocab].weight)
                with torch.no_grad():
                    self.vectors[feature.vocab].weight[PAD_INDEX].zero_()
            elif not feature.is_id:
                self.dense_vectors[feature.name] = nn.Parameter(torch.randn(dim) * config.init_std)
                self.dense_weights[feature.name] = nn.Parameter(torch.zeros(()))
        self.global_bias = nn.Parameter(torch.zeros(()))

    def _field(self, feature: Feature, values: Tensor) -> tuple[Tensor, Tensor]:
        """One field's embedding [..., D] and linear term [...] from its input (ids or dense values)."""
        if not feature.is_id:
            values = values.float()
            return values.unsqueeze(-1) * self.dense_vectors[feature.name], values * self.dense_weights[feature.name]
        vector = self.vectors[feature.vocab](values)
        weight = self.weights[feature.vocab](values).squeeze(-1)
        if feature.is_bag:
            present = values != PAD_INDEX
            return masked_mean(vector, present), masked_mean(weight.unsqueeze(-1), present).squeeze(-1)
        return vector, weight

    def _side(self, features: tuple[Feature, ...], inputs: dict[str, Tensor]) -> State:
        """A side's state: `vector` [L, D] (sum of its field embeddings) and `bias` [L]."""
        fields, linear = zip(*(self._field(f, inputs[f.name]) for f in features))
        fields = torch.stack(fields, dim=-2)  # [L, F, D]
        vector = fields.sum(-2)
        bias = torch.stack(linear, dim=-1).sum(-1)
        if self.config.same_side_pairs:
            bias = bias + 0.5 * (vector.pow(2).sum(-1) - fields.pow(2).sum((-2, -1)))
        return {"vector": vector, "bias": bias}

    def encode_items(self, items: dict[str, Tensor]) -> State:
        """Item features with leading dim M -> {"vector": [M, D], "bias": [M]}."""
        return self._side(self.schema.item_features, items)

    def encode_user(self, user: dict[str, Tensor]) -> State:
        """User and context features with leading dim B -> {"vector": [B, D], "bias": [B]}."""
        return self._side(self.schema.user_features, user)

    def score(self, user_state: State, item_state: State, mask: Tensor | None = None) -> Tensor:
        """Logits [B, N] from a user state (leading dim B) and item states (leading dims [B, N]).

        Candidates never interact, so `mask` (valid candidates, [B, N]) changes nothing here."""
        cross = torch.einsum("bd,bnd->bn", user_state["vector"], item_state["vector"])
        return cross + user_state["bias"].unsqueeze(-1) + item_state["bias"] + self.global_bias
