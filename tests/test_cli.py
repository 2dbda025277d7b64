import json

import pytest
from typer.testing import CliRunner

from prerank.cli import app

runner = CliRunner()


def test_train_writes_metrics_and_evaluate_rescores(tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", "--dataset", "synthetic", "--model", "two_tower", "--epochs", "2", "--seq-len", "10",
                                 "--embed-dim", "8", "--batch-size", "256", "--set", "hidden=[32, 16]", "--no-progress", "--out", str(out),
                                 "--cache-dir", str(tmp_path / "cache")])
    assert result.exit_code == 0, result.output
    # --no-progress hides the bars, not the per-epoch lines.
    assert "epoch 1: loss" in result.output and "epoch 2: loss" in result.output and "(CPU " in result.output
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("model", "dataset", "protocol", "seed", "seconds_per_epoch", "num_parameters"):
        assert key in metrics
    assert metrics["cpu_seconds_per_epoch"] > 0 and all(h["cpu_seconds"] > 0 for h in metrics["history"])
    assert set(metrics["test"]) >= {"auc", "gauc", "logloss"} and "auc" in metrics["valid"]
    assert metrics["model_config"]["hidden"] == [32, 16]
    result = runner.invoke(app, ["evaluate", "--checkpoint", str(out / "checkpoint.pt")])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["auc"] == metrics["test"]["auc"]


def test_errors_are_messages_not_tracebacks(tmp_path):
    result = runner.invoke(app, ["train", "--dataset", "ml-1m", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "needs --data-dir" in result.output
    result = runner.invoke(app, ["train", "--dataset", "ml-1m", "--data-dir", str(tmp_path), "--out", str(tmp_path)])
    assert result.exit_code == 2 and "no ratings.dat" in result.output
    result = runner.invoke(app, ["train", "--dataset", "synthetic", "--protocol", "random", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "name: Input should be 'temporal'" in result.output and "'random'" in result.output
    result = runner.invoke(app, ["evaluate", "--checkpoint", str(tmp_path / "missing.pt")])
    assert result.exit_code == 2 and "checkpoint not found" in result.output


def test_models_lists_the_registry():
    result = runner.invoke(app, ["models"])
    assert result.exit_code == 0 and "two_tower" in result.output


def test_cascade_build_writes_a_parquet_from_a_trained_teacher(tmp_path):
    from prerank.cascade import load_cascade

    common = ["--dataset", "synthetic", "--epochs", "1", "--seq-len", "8", "--embed-dim", "8", "--batch-size", "512",
              "--no-progress", "--cache-dir", str(tmp_path / "cache")]
    result = runner.invoke(app, ["train", "--model", "din", "--set", "hidden=[16]", "--set", "attention_hidden=[8]",
                                 "--out", str(tmp_path / "din"), *common])
    assert result.exit_code == 0, result.output
    out = tmp_path / "cascade.parquet"
    sizes = ["--retrieval-size", "30", "--random-items", "5", "--prerank-size", "10", "--exposure-size", "3", "--window", "10",
             "--train-requests-per-user", "1", "--cache-dir", str(tmp_path / "cache")]
    result = runner.invoke(app, ["cascade", "build", "--teacher", str(tmp_path / "din" / "checkpoint.pt"), "--out", str(out), *sizes])
    assert result.exit_code == 0, result.output
    cascade = load_cascade(out)
    assert cascade.meta["teacher"] == "din" and cascade.meta["config"]["retrieval_size"] == 30
    assert cascade.summary()["test_requests"] > 0
    result = runner.invoke(app, ["train", "--model", "ranktower", "--cascade", str(out), "--hybrid", "distill_weight=0.5",
                                 "--set", "heads=2", "--set", "head_dim=4", "--out", str(tmp_path / "rt"),
                                 *[a if a != "512" else "16" for a in common]])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "rt" / "metrics.json").read_text())
    assert metrics["objective"]["hybrid"]["distill_weight"] == 0.5 and 0 <= metrics["test_lists"]["ndcg@10"] <= 1
    assert "test cascade lists: recall@10" in result.output and (tmp_path / "rt" / "checkpoint.pt").exists()
    result = runner.invoke(app, ["train", "--cascade", str(out), "--hybrid", "distill=1", "--out", str(tmp_path / "x"), *common])
    assert result.exit_code == 2 and "hybrid.distill: unknown key; known keys: distill_weight" in result.output
    result = runner.invoke(app, ["train", "--model", "two_tower", "--set", "hidden=[8]", "--out", str(tmp_path / "tt"), *common])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["cascade", "build", "--teacher", str(tmp_path / "tt" / "checkpoint.pt"), "--out", str(out), *sizes])
    assert result.exit_code == 2 and "not a ranker" in result.output
    result = runner.invoke(app, ["cascade", "build", "--teacher", str(tmp_path / "missing.pt"), "--out", str(out)])
    assert result.exit_code == 2 and "checkpoint not found" in result.output


def test_a_run_never_overwrites_or_mixes_into_an_existing_out(tmp_path, monkeypatch):
    out = tmp_path / "run"
    common = ["train", "--dataset", "synthetic", "--model", "two_tower", "--epochs", "1", "--seq-len", "5", "--embed-dim", "8",
              "--batch-size", "512", "--set", "hidden=[16]", "--no-progress", "--out", str(out), "--cache-dir", str(tmp_path / "cache")]
    assert runner.invoke(app, common).exit_code == 0
    first = json.loads((out / "metrics.json").read_text())
    refused = runner.invoke(app, [*common, "--seed", "7"])
    assert refused.exit_code == 2 and "already holds a run: give --overwrite" in refused.output
    assert json.loads((out / "metrics.json").read_text()) == first
    # A run that fails half-way leaves OUT as it was; its files stay apart in OUT.partial.
    import prerank.train.run as run_module

    def interrupted(*args, **kwargs):
        (args[4] / "checkpoint.pt").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(run_module, "run_training", interrupted)
    stopped = runner.invoke(app, [*common, "--seed", "7", "--overwrite"])
    assert stopped.exit_code == 130 and "is untouched" in stopped.output
    assert json.loads((out / "metrics.json").read_text()) == first and (tmp_path / "run.partial" / "checkpoint.pt").exists()
    monkeypatch.undo()
    replaced = runner.invoke(app, [*common, "--seed", "7", "--overwrite"])
    assert replaced.exit_code == 0, replaced.output
    assert json.loads((out / "metrics.json").read_text())["seed"] == 7 and not (tmp_path / "run.partial").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("run")] == ["run"]


def test_quickstart_beats_the_base_rate_and_says_so(tmp_path):
    import numpy as np

    from prerank.cli.quickstart import base_rate_logloss

    # By hand: a positive rate of 0.25 on [1, 0] costs -(log 0.25 + log 0.75) / 2.
    assert base_rate_logloss([1, 0, 0, 0], [1, 0]) == pytest.approx(-(np.log(0.25) + np.log(0.75)) / 2)
    result = runner.invoke(app, ["quickstart", "--out", str(tmp_path / "qs")])
    assert result.exit_code == 0, result.output
    assert "base-rate log loss" in result.output
    metrics = json.loads((tmp_path / "qs" / "two_tower" / "metrics.json").read_text())
    assert metrics["test"]["logloss"] < 0.69 and metrics["test"]["auc"] > 0.72  # base rate: 0.692


def test_an_interrupted_run_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    import torch

    import prerank.train.trainer as trainer_module

    common = ["train", "--dataset", "synthetic", "--model", "two_tower", "--epochs", "4", "--patience", "4", "--seq-len", "5",
              "--embed-dim", "8", "--batch-size", "512", "--set", "hidden=[16]", "--set", "dropout=0.2", "--no-progress"]
    whole = runner.invoke(app, [*common, "--out", str(tmp_path / "whole")])
    assert whole.exit_code == 0, whole.output
    calls = []
    real_auc = trainer_module.auc

    def auc_then_interrupt(*args):
        calls.append(1)
        if len(calls) == 3:  # during epoch 3's validation: epochs 1 and 2 are complete
            raise KeyboardInterrupt
        return real_auc(*args)

    monkeypatch.setattr(trainer_module, "auc", auc_then_interrupt)
    cut = runner.invoke(app, [*common, "--out", str(tmp_path / "cut")])
    assert cut.exit_code == 130 and "prerank train --resume" in cut.output and not (tmp_path / "cut").exists()
    monkeypatch.undo()
    assert runner.invoke(app, ["train", "--resume", str(tmp_path / "cut"), "--epochs", "9"]).exit_code == 2  # no run flags
    resumed = runner.invoke(app, ["train", "--resume", str(tmp_path / "cut"), "--no-progress"])
    assert resumed.exit_code == 0, resumed.output
    assert "resuming after epoch 2" in resumed.output and "epoch 3: loss" in resumed.output and "epoch 1: loss" not in resumed.output
    a, b = (json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("whole", "cut"))
    assert a["test"] == b["test"] and a["best_epoch"] == b["best_epoch"]
    assert [h["train_loss"] for h in a["history"]] == [h["train_loss"] for h in b["history"]]
    weights = [torch.load(tmp_path / name / "checkpoint.pt", weights_only=False)["state_dict"] for name in ("whole", "cut")]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not (tmp_path / "cut.partial").exists() and not list(tmp_path.rglob("resume.pt"))


def test_the_label_leak_is_said_in_history_and_evaluate(tmp_path):
    out = tmp_path / "paper"
    result = runner.invoke(app, ["train", "--dataset", "synthetic", "--model", "two_tower", "--protocol", "inttower",
                                 "--seq-len", "0", "--epochs", "1", "--embed-dim", "8", "--batch-size", "512",
                                 "--set", "hidden=[16]", "--no-progress", "--out", str(out)])
    assert result.exit_code == 0, result.output
    history = json.loads((out / "history.json").read_text())
    assert history["leaks_labels"] is True and history["protocol"] == "inttower" and len(history["epochs"]) == 1
    evaluated = runner.invoke(app, ["evaluate", "--checkpoint", str(out / "checkpoint.pt")])
    assert evaluated.exit_code == 0 and json.loads(evaluated.output)["leaks_labels"] is True
