import json

import pytest
import torch
from typer.testing import CliRunner

from prerank.cli import app
from prerank.cli.cold import rank_feature_groups, top_groups
from prerank.data.table import LABEL
from prerank.models import create_model
from prerank.models.cold import feature_groups, linear_log
from tests.test_contract import SMALL


def test_linear_log_is_identity_inside_and_logarithmic_outside():
    x = torch.tensor([-torch.e, -1.0, -0.5, 0.0, 0.7, 1.0, torch.e ** 2])
    torch.testing.assert_close(linear_log(x), torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.7, 1.0, 3.0]))


def test_se_weights_rank_every_group(small_data, small_batch):
    batch, _ = small_batch
    model = create_model("cold", small_data.schema, SMALL["cold"]).eval()
    groups = feature_groups(small_data.schema)
    assert "segment*category" in groups and model.group_names == [g for g in groups if "*" not in g] + [g for g in groups if "*" in g]
    with torch.no_grad():
        weights = model.group_weights(model.encode_user(model.user_inputs(batch)), model.encode_item_lists(model.item_inputs(batch)))
    assert weights.shape == (len(batch[LABEL]), 1, len(groups))
    assert ((weights > 0) & (weights < 1)).all()
    ranking = rank_feature_groups(model, small_data.valid, sample_rows=100)
    assert sorted(name for name, _ in ranking) == sorted(groups)
    values = [w for _, w in ranking]
    assert values == sorted(values, reverse=True)
    expected = dict(zip(model.group_names, weights.reshape(-1, len(groups)).mean(0).tolist()))
    small = rank_feature_groups(model, small_data.test.subset(torch.arange(48).numpy()), sample_rows=48)
    for name, weight in small:
        assert weight == pytest.approx(expected[name], rel=1e-5)
    assert top_groups(ranking, 2) == [ranking[0][0], ranking[1][0]]
    with pytest.raises(ValueError, match="top-k must lie in 1.."):
        top_groups(ranking, 0)


def test_selected_groups_are_the_only_features_read(small_data, small_batch):
    batch, _ = small_batch
    keep = ["item_id", "user_id*category"]
    model = create_model("cold", small_data.schema, {**SMALL["cold"], "groups": keep}).eval()
    assert model.group_names == keep
    assert model.user_feature_names == ["user_id"] and model.item_feature_names == ["item_id", "category"]
    assert set(model.embeddings.tables) == {"user_id", "item_id", "category"}  # no table for unread features
    changed = dict(batch, segment=torch.zeros_like(batch["segment"]), tags=torch.zeros_like(batch["tags"]),
                   popularity=torch.zeros_like(batch["popularity"]), hist_items=torch.zeros_like(batch["hist_items"]))
    with torch.no_grad():
        torch.testing.assert_close(model(changed).logits, model(batch).logits)
    with pytest.raises(ValueError, match=r"unknown feature groups \['colour'\]"):
        create_model("cold", small_data.schema, {"groups": ["colour"]})


@pytest.mark.parametrize("overrides", [{"se": "squeeze", "linear_log": True}, {"se": "senet", "cross": "none", "linear_part": True}])
def test_variants_keep_parity_and_train_every_parameter(overrides, small_data, small_batch):
    batch, item_rows = small_batch
    torch.manual_seed(0)
    model = create_model("cold", small_data.schema, {**SMALL["cold"], **overrides}).train()
    output = model(batch)
    torch.nn.functional.binary_cross_entropy_with_logits(output.logits.reshape(-1), batch[LABEL]).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing
    model.eval()
    with torch.no_grad():
        table = model.encode_catalogue(small_data.items.to_tensors(), batch_size=7)
        served = model.score(model.encode_user(model.user_inputs(batch)),
                             {k: v[torch.as_tensor(item_rows)][:, None] for k, v in table.items()})
        torch.testing.assert_close(served, model(batch).logits, atol=1e-5, rtol=1e-5)


def test_cold_select_command_ranks_and_retrains(tmp_path):
    runner = CliRunner()
    common = ["--cache-dir", str(tmp_path / "cache")]
    result = runner.invoke(app, ["train", "--dataset", "synthetic", "--model", "cold", "--epochs", "1", "--seq-len", "5",
                                 "--embed-dim", "4", "--batch-size", "512", "--set", "hidden=[16]", "--no-progress",
                                 "--out", str(tmp_path / "full"), *common])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["cold-select", "--checkpoint", str(tmp_path / "full" / "checkpoint.pt"), "--top-k", "3",
                                 "--out", str(tmp_path / "top3"), "--sample-rows", "500", *common])
    assert result.exit_code == 0, result.output
    assert "mean SE weight" in result.output
    metrics = json.loads((tmp_path / "top3" / "metrics.json").read_text())
    assert len(metrics["model_config"]["groups"]) == 3 and metrics["epochs_run"] == 1
    assert json.loads(result.output.split("top 3: ")[1].splitlines()[0]) == metrics["model_config"]["groups"]
    result = runner.invoke(app, ["train", "--dataset", "synthetic", "--model", "two_tower", "--epochs", "1", "--seq-len", "5",
                                 "--embed-dim", "4", "--set", "hidden=[8]", "--no-progress", "--out", str(tmp_path / "tt"), *common])
    result = runner.invoke(app, ["cold-select", "--checkpoint", str(tmp_path / "tt" / "checkpoint.pt"), *common])
    assert result.exit_code == 2 and "needs a COLD model" in result.output
