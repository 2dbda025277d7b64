"""FIT: the meta-query selection and its serving split, the query group, the LSS, the ablations."""


import numpy as np
import pytest
import torch
import torch.nn.functional as F

from prerank.benchmark import resolve_variant
from prerank.run_config import variant_names
from prerank.data.pipeline import ProtocolConfig
from prerank.data.synthetic import load_synthetic
from prerank.data.table import LABEL
from prerank.models import create_model
from prerank.models.base import gather_items
from prerank.models.fit import LightweightSimilarityScorer, query_group

SMALL = {"hidden": [32, 16], "num_meta": 4, "attention_hidden": [8], "user_heads": 2, "item_heads": 3, "head_dim": 8}
ABLATIONS = {
    "no_mqm": {"use_mqm": False},
    "no_lss": {"scorer": "dot"},
    "summax": {"scorer": "summax"},
    "fc": {"scorer": "fc"},
    "output_mixing": {"soft_selection": "output"},
    "softmax_attention": {"attention_softmax": True, "normalize_heads": True, "tau_schedule": "linear"},
}


def fit(schema, seed=0, **overrides):
    torch.manual_seed(seed)
    return create_model("fit", schema, {**SMALL, **overrides})


def test_hard_path_serves_the_argmax_of_the_stored_selection_logits(small_data, small_batch):
    batch, item_rows = small_batch
    model = fit(small_data.schema).eval()
    with torch.no_grad():
        expected = model(batch).logits
        table = model.encode_catalogue(small_data.items.to_tensors(), batch_size=7)
        user_state = model.encode_user(model.user_inputs(batch))
        served = model.score(user_state, gather_items(table, torch.as_tensor(item_rows)[:, None]))
    # The item state is the item heads plus the selection logits; the user state holds all N meta queries.
    assert set(table) == {"heads", "selection_logits"} and table["selection_logits"].shape == (len(small_data.item_raw_ids), 4)
    assert table["heads"].shape == (len(small_data.item_raw_ids), 3, 8)
    assert user_state["heads"].shape == (len(item_rows), 4, 2, 8)
    torch.testing.assert_close(served, expected, atol=1e-6, rtol=1e-6)
    # The gathered row is the user side conditioned on exactly the item's hard query Q*[i*(v)].
    with torch.no_grad():
        fields = model.towers.user_fields(model.user_inputs(batch)).flat()
        ids = batch["hist_items"]
        behaviours = model.towers.embeddings.lookup(model.sequence, ids)
        meta_index = model.meta_index(table)[torch.as_tensor(item_rows)]
        own_query = model.query_group()[meta_index].unsqueeze(1)  # [B, 1, D]
        heads = model._conditioned_user_heads(fields, behaviours, ids != 0, own_query)
        by_hand = model.lss(torch.einsum("bnhp,bngp->bnhg", heads, table["heads"][torch.as_tensor(item_rows)].unsqueeze(1)))
    torch.testing.assert_close(by_hand, expected, atol=1e-5, rtol=1e-5)


def test_query_group_by_hand():
    meta = torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, -1.0]])
    expected = torch.zeros(2, 3)
    for i in range(2):
        for j in range(2):
            expected[i] += float(meta[i] @ meta[j]) * meta[j]
    torch.testing.assert_close(query_group(meta), expected)
    # Rows: (5*[1,0,2] + (-2)*[0,1,-1]) and ((-2)*[1,0,2] + 2*[0,1,-1]).
    torch.testing.assert_close(query_group(meta), torch.tensor([[5.0, -2.0, 12.0], [-2.0, 2.0, -6.0]]))


def test_lss_against_a_hand_computation():
    torch.manual_seed(0)
    lss = LightweightSimilarityScorer(user_heads=2, item_heads=3, row_units=4, col_units=5, activation="relu")
    user, item = torch.randn(6, 2, 7), torch.randn(6, 3, 7)  # Z_u [H_u, p], Z_v [H_v, p] for 6 pairs
    similarity = torch.einsum("bhp,bgp->bhg", user, item)
    out = lss(similarity)
    assert out.shape == (6,)
    w_r, b_r = lss.row.weight.detach(), lss.row.bias.detach()
    w_c, b_c = lss.column.weight.detach(), lss.column.bias.detach()
    w_o, b_o = lss.out.weight.detach()[0], lss.out.bias.detach()[0]
    for pair in range(6):
        s = [[float(user[pair, a] @ item[pair, b]) for b in range(3)] for a in range(2)]
        rows = [[max(0.0, sum(s[a][b] * float(w_r[r, b]) for b in range(3)) + float(b_r[r])) for r in range(4)] for a in range(2)]
        cols = [[max(0.0, sum(rows[a][r] * float(w_c[c, a]) for a in range(2)) + float(b_c[c])) for c in range(5)] for r in range(4)]
        logit = sum(cols[r][c] * float(w_o[r * 5 + c]) for r in range(4) for c in range(5)) + float(b_o)
        assert out[pair].item() == pytest.approx(logit, abs=1e-5)


@pytest.mark.parametrize("soft_selection", ["query", "output"])
def test_soft_selection_converges_to_the_hard_path_as_temperature_falls(small_data, small_batch, soft_selection):
    batch, _ = small_batch
    # Without BatchNorm and dropout, training mode differs from eval mode only by the selection.
    gaps = {}
    for tau in (1.0, 1e-2, 1e-7):
        model = fit(small_data.schema, batch_norm=False, tau_start=tau, tau_end=tau, soft_selection=soft_selection)
        with torch.no_grad():
            model.meta.mul_(50.0)  # spread the selection logits so a moderate τ already separates them
            hard = model.eval()(batch).logits
            items = model.item_inputs(batch)
            hard_index = model.meta_index(model.encode_items(items))
            soft = model.train()(batch).logits
            weights = (model.encode_items(items)["selection_logits"] / model.temperature()).softmax(-1)
        gaps[tau] = (soft - hard).abs().max().item()
        if tau == 1e-7:
            torch.testing.assert_close(weights, F.one_hot(hard_index, 4).float())
            torch.testing.assert_close(soft, hard, atol=1e-5, rtol=1e-5)
    assert gaps[1.0] > gaps[1e-2] > gaps[1e-7]
    assert gaps[1.0] > 1e-3  # the soft path is a real relaxation, not the hard path in disguise


def test_temperature_schedule_follows_training_steps(small_data):
    model = fit(small_data.schema, tau_start=1.0, tau_end=0.01, anneal_steps=10, tau_schedule="linear")
    assert model.temperature() == pytest.approx(1.0)
    model.train_step.fill_(5)
    assert model.temperature() == pytest.approx(0.505)
    model.train_step.fill_(50)
    assert model.temperature() == pytest.approx(0.01)
    exponential = fit(small_data.schema, tau_start=1.0, tau_end=0.01, anneal_steps=10, tau_schedule="exponential")
    exponential.train_step.fill_(5)
    assert exponential.temperature() == pytest.approx(0.1)
    # Training-mode forwards with gradients advance the counter; eval and no-grad passes do not.
    batch = small_data.train.subset(np.arange(32)).to_tensors()
    model.train_step.zero_()
    model.train()(batch)
    model.train()(batch)
    with torch.no_grad():
        model(batch)
    model.eval()(batch)
    assert int(model.train_step) == 2
    assert "train_step" in model.state_dict()


@pytest.mark.parametrize("ablation", sorted(ABLATIONS))
def test_each_variant_trains_a_step_and_keeps_parity(small_data, small_batch, ablation):
    model = fit(small_data.schema, **ABLATIONS[ablation])
    train_batch = small_data.train.subset(np.arange(128)).to_tensors()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    losses = []
    for _ in range(3):
        output = model(train_batch)
        loss = F.binary_cross_entropy_with_logits(output.logits.reshape(-1), train_batch[LABEL])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    batch, item_rows = small_batch
    model.eval()
    with torch.no_grad():
        expected = model(batch).logits
        table = model.encode_catalogue(small_data.items.to_tensors(), batch_size=7)
        served = model.score(model.encode_user(model.user_inputs(batch)), gather_items(table, torch.as_tensor(item_rows)[:, None]))
    torch.testing.assert_close(served, expected, atol=1e-5, rtol=1e-5)
    if ablation == "no_mqm":
        assert set(table) == {"heads"}
    if ablation == "no_lss":
        assert table["heads"].shape[1:] == (1, 16)  # Two-Tower's head: the whole normalised vector


def test_storage_per_item_is_the_item_heads_plus_the_selection_logits(small_data):
    model = create_model("fit", small_data.schema).eval()
    two_tower = create_model("two_tower", small_data.schema).eval()
    items = {k: v[:5] for k, v in small_data.items.to_tensors().items()}
    with torch.no_grad():
        fit_state, tt_state = model.encode_items(items), two_tower.encode_items(items)
    per_item = sum(v[0].numel() * v.element_size() for v in fit_state.values())
    assert per_item == 4 * 32 * 4 + 16 * 4  # H_v·p float32 + num_meta float32 (the same state in training and serving)
    assert sum(v[0].numel() * v.element_size() for v in tt_state.values()) == 128 * 4


def test_clear_errors(small_data):
    no_sequence = load_synthetic(ProtocolConfig(seq_len=0), n_users=20, n_items=10, events_per_user=5, seed=1, embed_dim=8)
    with pytest.raises(ValueError, match="behaviour-sequence feature"):
        create_model("fit", no_sequence.schema, SMALL)
    create_model("fit", no_sequence.schema, {**SMALL, "use_mqm": False})  # w/o MQM needs no sequence
    with pytest.raises(ValueError, match="'segment' is not an id-valued item-side feature"):
        fit(small_data.schema, selection_features=["segment"])
    with pytest.raises(ValueError, match="no feature 'colour'"):
        fit(small_data.schema, selection_features=["colour"])
    with pytest.raises(ValueError, match="tau_end"):
        fit(small_data.schema, tau_start=0.1, tau_end=1.0)
    model = fit(small_data.schema, selection_features=["category"])
    assert model.meta.shape == (4, 8)  # D = one field × embed dim: no projection needed
    assert isinstance(model.query_projection, torch.nn.Identity)


def test_benchmark_variants_build(small_data):
    fit_variants = [v for v in variant_names() if v.startswith("fit@")]
    assert {"fit@no_mqm", "fit@no_lss", "fit@summax", "fit@fc", "fit@n8", "fit@n32", "fit@n64"} <= set(fit_variants)
    for variant in fit_variants:
        name, overrides, _ = resolve_variant(variant)
        create_model(name, small_data.schema, {**SMALL, **overrides})
