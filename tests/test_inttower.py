import numpy as np
import pytest
import torch

from prerank.data.table import LABEL
from prerank.models import create_model
from prerank.models.inttower import LightSE, cir_loss
from tests.test_contract import SMALL


def test_light_se_reweights_fields_by_a_softmax_of_their_means():
    torch.manual_seed(0)
    se = LightSE(3)
    embeddings = torch.randn(5, 3, 4)
    weights = se.weights(embeddings)
    assert weights.shape == (5, 3)
    torch.testing.assert_close(weights.sum(-1), torch.ones(5))
    expected_weights = torch.softmax(embeddings.mean(-1) @ se.excite.weight.T + se.excite.bias, -1)
    torch.testing.assert_close(weights, expected_weights)
    torch.testing.assert_close(se(embeddings), embeddings * (1 + expected_weights[..., None]))
    # The field with the largest weight gets the largest boost.
    boost = (se(embeddings) / embeddings).mean(-1)
    assert torch.equal(boost.argmax(-1), weights.argmax(-1))


def test_sum_max_score_matches_a_hand_loop(small_data, small_batch):
    batch, _ = small_batch
    model = create_model("inttower", small_data.schema, SMALL["inttower"]).eval()
    with torch.no_grad():
        user = model.encode_user(model.user_inputs(batch))["heads"][:3]  # [3, L, H, d]
        items = model.encode_items(model.item_inputs(batch))["heads"][:6].reshape(3, 2, 2, 8)  # [3, N=2, H, d]
        logits = model.score({"heads": user}, {"heads": items})
    for b in range(3):
        for n in range(2):
            total = sum(
                max(float(user[b, layer, i] @ items[b, n, j]) for j in range(2))
                for layer in range(user.shape[1]) for i in range(2)
            )
            assert logits[b, n].item() == pytest.approx(total, rel=1e-5, abs=1e-5)
    assert user.shape[1] == 2  # one set of heads per user layer (hidden [32, 16])


def test_cir_loss_against_a_hand_computation():
    user = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]]), dim=-1)
    item = torch.nn.functional.normalize(torch.tensor([[1.0, 1.0], [0.0, 1.0], [1.0, 0.0]]), dim=-1)
    label = torch.tensor([1.0, 0.0, 1.0])
    tau = 0.5
    expected = 0.0
    for b in (0, 2):  # positive rows only
        sims = [float(user[b] @ item[j]) / tau for j in range(3)]
        expected += -(sims[b] - np.log(np.sum(np.exp(sims))))
    assert cir_loss(user, item, label, tau).item() == pytest.approx(expected / 2, rel=1e-6)
    assert cir_loss(user, item, torch.zeros(3), tau).item() == 0.0


@pytest.mark.parametrize("overrides", [
    {"fe_block": "input", "output_bias": True},
    {"multi_layer": False},
    {"light_se": "user"},
    {"cir_weight": 0.5},
    {"fe_block": "input", "heads": 8, "init_std": 1e-4},
])
def test_variants_keep_parity_and_train_every_parameter(overrides, small_data, small_batch):
    batch, item_rows = small_batch
    torch.manual_seed(0)
    model = create_model("inttower", small_data.schema, {**SMALL["inttower"], **overrides})
    model.train()
    output = model(batch)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(output.logits.reshape(-1), batch[LABEL])
    (loss + sum(output.aux_losses.values(), torch.zeros(()))).backward()
    assert ("cir" in output.aux_losses) == (overrides.get("cir_weight", 0) > 0)
    with torch.no_grad():  # the training states are the serving ones: CIR's vectors stay out of them
        assert set(model.encode_items(model.item_inputs(batch))) == set(model.encode_user(model.user_inputs(batch))) == {"heads"}
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing
    model.eval()
    with torch.no_grad():
        table = model.encode_catalogue(small_data.items.to_tensors(), batch_size=7)
        assert set(table) == {"heads"}  # training-only CIR vectors never reach the item-state table
        served = model.score(model.encode_user(model.user_inputs(batch)),
                             {k: v[torch.as_tensor(item_rows)][:, None] for k, v in table.items()})
        torch.testing.assert_close(served, model(batch).logits, atol=1e-5, rtol=1e-5)
    if overrides.get("fe_block") == "input":
        # The PyTorch variant projects layer inputs: the last user layer would be unused, so it is not built.
        assert len(model.user.tower.layers) == len(SMALL["inttower"]["hidden"]) - 1


def test_small_init_starts_the_many_head_code_variant_near_zero_logits(small_data, small_batch):
    batch, _ = small_batch
    config = {"fe_block": "input", "heads": 32, "head_dim": 64, "hidden": [32, 16]}
    torch.manual_seed(0)
    default = create_model("inttower", small_data.schema, config).eval()
    small = create_model("inttower", small_data.schema, {**config, "init_std": 1e-4}).eval()
    with torch.no_grad():
        assert default(batch).logits.abs().mean() > 1.0  # why the code's N(0, 1e-4) init matters
        assert small(batch).logits.abs().max() < 1e-3
