"""The shared contract, checked for every registered model: parity of precomputed item states with
the training forward pass, user/item isolation, the N axis, and gradient flow."""

import numpy as np
import pytest
import torch

from prerank.data.table import LABEL
from prerank.models import REGISTRY, create_model
from prerank.models.base import PreRankModel, gather_items

MODELS = sorted(REGISTRY)
# Small configs keep the suite fast; each model's defaults are exercised by the CLI tests.
SMALL = {
    "two_tower": {"hidden": [32, 16]},
    "inttower": {"hidden": [32, 16], "heads": 2, "head_dim": 8},
    "dat": {"hidden": [32, 16]},
    "cold": {"hidden": [32, 16]},
    "din": {"hidden": [32, 16], "attention_hidden": [16]},
    "ranktower": {"heads": 2, "head_dim": 8, "hidden": [16], "attention_heads": 2},
    "lttd": {"dim": 16, "field_hidden": 16, "tower_hidden": [16], "residual_dim": 4, "residual_hidden": [16],
             "model_dim": 16, "heads": 2, "feedforward": 32, "layers": 1},
    "fit": {"hidden": [32, 16], "num_meta": 4, "attention_hidden": [8], "user_heads": 2, "item_heads": 3, "head_dim": 8},
    "tarq": {"hidden": [32, 16], "levels": 2, "codebook_size": 8},
}


def build(name, schema, seed=0) -> PreRankModel:
    torch.manual_seed(seed)
    return create_model(name, schema, SMALL.get(name, {}))


def catalogue_states(model, data):
    """The offline item-state table: encode_items over the whole catalogue, in chunks of 7."""
    return model.encode_catalogue(data.items.to_tensors(), batch_size=7)


def gather(state, rows):
    return gather_items(state, torch.as_tensor(rows))


@pytest.mark.parametrize("name", MODELS)
def test_parity_of_precomputed_item_states(name, small_data, small_batch):
    batch, item_rows = small_batch
    model = build(name, small_data.schema).eval()
    with torch.no_grad():
        expected = model(batch).logits
        table = catalogue_states(model, small_data)
        user_state = model.encode_user(model.user_inputs(batch))
        served = model.score(user_state, gather(table, item_rows[:, None]))
    assert expected.shape == (len(item_rows), 1)
    torch.testing.assert_close(served, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_user_state_ignores_item_features_and_vice_versa(name, small_data, small_batch):
    batch, _ = small_batch
    model = build(name, small_data.schema).eval()
    perm = torch.randperm(len(batch[LABEL]), generator=torch.Generator().manual_seed(0))
    swapped_items = dict(batch, **{f.name: batch[f.name][perm] for f in small_data.schema.item_features})
    swapped_users = dict(batch, **{f.name: batch[f.name][perm] for f in small_data.schema.user_features})
    with torch.no_grad():
        for a, b in zip(model.encode_user(model.user_inputs(batch)).values(),
                        model.encode_user(model.user_inputs(swapped_items)).values()):
            torch.testing.assert_close(a, b)
        for a, b in zip(model.encode_items(model.item_inputs(batch)).values(),
                        model.encode_items(model.item_inputs(swapped_users)).values()):
            torch.testing.assert_close(a, b)
        # And each stage runs on its own side's features alone: no hidden reach across.
        model.encode_user({f.name: batch[f.name] for f in small_data.schema.user_features})
        model.encode_items({f.name: batch[f.name] for f in small_data.schema.item_features})


@pytest.mark.parametrize("name", [n for n in MODELS if not REGISTRY[n].listwise])
def test_scores_are_pointwise_along_the_candidate_axis(name, small_data, small_batch):
    batch, _ = small_batch
    model = build(name, small_data.schema).eval()
    n_items = len(small_data.item_raw_ids)
    candidates = torch.randint(0, n_items, (4, 100), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        table = catalogue_states(model, small_data)
        users = {k: v[:4] for k, v in model.user_inputs(batch).items()}
        user_state = model.encode_user(users)
        many = model.score(user_state, gather(table, candidates))
        one_by_one = torch.cat([model.score(user_state, gather(table, candidates[:, j : j + 1])) for j in range(100)], dim=1)
    assert many.shape == (4, 100)
    torch.testing.assert_close(many, one_by_one, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_gradient_reaches_every_parameter(name, small_data):
    model = build(name, small_data.schema).train()
    batch = {k: v for k, v in small_data.train.subset(np.arange(256)).to_tensors().items()}
    output = model(batch)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(output.logits.reshape(-1), batch[LABEL])
    loss = loss + sum(output.aux_losses.values(), torch.zeros(()))
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert not missing, f"no gradient reaches: {missing}"
