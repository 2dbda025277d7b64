"""Named experiments: `prerank train --config run.yaml`, the variant files under configs/, OUT/run.yaml."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import typer
import yaml
from typer.testing import CliRunner

import prerank
from prerank import run_config
from prerank.benchmark import BenchmarkConfig, resolve_variant, run_benchmark
from prerank.cli import app
from prerank.cli.train import FLAG_KEYS
from prerank.data.pipeline import ProtocolConfig
from prerank.models import create_model, make_config
from prerank.run_config import RunConfigError, validate, variant_file, variant_names
from prerank.train.trainer import TrainConfig

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]


def resolved(*args: str) -> dict:
    """The run config `prerank train ARGS` would train (`--print-config`)."""
    result = runner.invoke(app, ["train", *args, "--print-config"])
    assert result.exit_code == 0, result.output
    return yaml.safe_load(result.output)


def test_flags_given_override_the_file_and_the_rest_comes_from_it(tmp_path):
    (tmp_path / "exp").mkdir()
    path = tmp_path / "exp" / "run.yaml"
    path.write_text("dataset: {name: synthetic, data_dir: ../data}\nprotocol: {seq_len: 7}\n"
                    "model: {name: dat, options: {hidden: [8]}}\ntraining: {epochs: 4, lr: 0.01}\n")
    config = resolved("--config", str(path), "--epochs", "2", "--set", "temperature=0.5")
    assert config["training"]["epochs"] == 2 and config["training"]["lr"] == 0.01
    assert config["model"]["name"] == "dat"
    assert config["model"]["options"]["hidden"] == [8] and config["model"]["options"]["temperature"] == 0.5
    assert config["protocol"]["seq_len"] == 7 and config["training"]["batch_size"] == 2048  # the default
    assert config["dataset"]["data_dir"] == str((tmp_path / "data").resolve())  # relative to the file's folder
    # A flag given with the default's value still overrides the file.
    assert resolved("--config", str(path), "--epochs", "10")["training"]["epochs"] == 10
    # Another model replaces the model section: the file's options were the other model's.
    defaults = json.loads(json.dumps(dataclasses.asdict(make_config("two_tower"))))
    assert resolved("--config", str(path), "--model", "two_tower")["model"] == {"name": "two_tower", "options": defaults}
    (tmp_path / "empty_options.yaml").write_text("model: {name: dat, options: null}\n")
    assert resolved("--config", str(tmp_path / "empty_options.yaml"), "--set", "hidden=[4]")["model"]["options"]["hidden"] == [4]
    # --embed-dim is a model option.
    assert resolved("--config", str(path), "--embed-dim", "16")["model"]["options"]["embed_dim"] == 16


def test_bad_keys_and_values_are_named_by_their_path(tmp_path):
    path = tmp_path / "run.yaml"
    for text, message in [
        ("model: {name: two_tower, options: {hiden: [8]}}", "run.yaml: model.options.hiden: unknown key; known keys: hidden,"),
        ("training: {epoch: 3}", "run.yaml: training.epoch: unknown key; known keys: epochs,"),
        ("modle: {name: dat}", "run.yaml: modle: unknown key; known keys: dataset, protocol, model,"),
        ("model: {name: dat, option: {}}", "run.yaml: model.option: unknown key; known keys: name, options"),
        ("training: {epochs: 0}", "run.yaml: training.epochs: Input should be greater than or equal to 1 (got 0)"),
        ("training: {device: cuda}", "run.yaml: training.device: set on the command line (--device)"),
        ("protocol: {name: random}", "run.yaml: protocol.name: Input should be 'temporal'"),
        ("protocol: {valid_fraction: 0.6, test_fraction: 0.5}", "run.yaml: protocol: valid_fraction + test_fraction must be < 1"),
        ("model: {name: dat, options: {hidden: [a]}}", "run.yaml: model.options.hidden[0]: Input should be a valid integer"),
        ("model: {name: tower}", "run.yaml: model.name: unknown model 'tower'"),
        ("hybrid: {distill_weight: 0.5}", "run.yaml: hybrid: sets the loss of cascade training"),
        ("cascade: c.parquet\nhybrid: {distill: 0.5}", "run.yaml: hybrid.distill: unknown key; known keys: distill_weight,"),
        ("training: {epochs: 0}\nmodle: 1", "run.yaml: modle: unknown key; known keys: dataset, protocol, model, training, cascade, "
                                            "hybrid; training.epochs: Input should be"),  # every problem at once
        ("[1, 2]", "run.yaml: expected a mapping"),
        ("model: {name: [", "run.yaml: not valid YAML"),
    ]:
        path.write_text(text)
        result = runner.invoke(app, ["train", "--config", str(path), "--out", str(tmp_path / "out")])
        assert result.exit_code == 2 and message in result.output, (text, result.output)
        assert "Traceback" not in result.output
    result = runner.invoke(app, ["train", "--set", "hiden=[8]", "--print-config"])
    assert result.exit_code == 2 and "command line: model.options.hiden: unknown key" in result.output
    result = runner.invoke(app, ["train", "--config", str(tmp_path / "missing.yaml")])
    assert result.exit_code == 2 and "missing.yaml: file not found" in result.output
    result = runner.invoke(app, ["train", "--embed-dim", "8", "--set", "embed_dim=16", "--print-config"])
    assert result.exit_code == 2 and "--embed-dim and --set embed_dim=... disagree" in result.output
    assert not (tmp_path / "out").exists()


def test_model_variant_trains_and_its_run_yaml_reruns_it(tmp_path):
    common = ["--dataset", "synthetic", "--epochs", "1", "--batch-size", "512", "--embed-dim", "8", "--threads", "1",
              "--set", "heads=2", "--set", "head_dim=4", "--no-progress", "--cache-dir", str(tmp_path / "cache")]
    result = runner.invoke(app, ["train", "--model", "inttower@paper", *common, "--out", str(tmp_path / "first")])
    assert result.exit_code == 0, result.output
    first = json.loads((tmp_path / "first" / "metrics.json").read_text())
    # The variant file's settings, under the flags given (heads, head_dim).
    assert first["model"] == "inttower"
    assert {k: first["model_config"][k] for k in ("fe_block", "output_bias", "dropout", "init_std", "heads", "head_dim")} == \
        {"fe_block": "input", "output_bias": True, "dropout": 0.3, "init_std": 1e-4, "heads": 2, "head_dim": 4}
    recorded = yaml.safe_load((tmp_path / "first" / "run.yaml").read_text())
    assert recorded["protocol"]["seq_len"] == 0 and recorded["model"]["options"]["embed_dim"] == 8
    assert recorded["training"]["epochs"] == 1 and recorded["dataset"]["name"] == "synthetic"
    assert not [p.name for p in (tmp_path / "first").iterdir() if p.name.startswith(".")]  # no temporary left behind

    result = runner.invoke(app, ["train", "--config", str(tmp_path / "first" / "run.yaml"), "--no-progress",
                                 "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "again")])
    assert result.exit_code == 0, result.output
    again = json.loads((tmp_path / "again" / "metrics.json").read_text())
    assert again["test"] == first["test"] and again["model_config"] == first["model_config"]
    assert yaml.safe_load((tmp_path / "again" / "run.yaml").read_text()) == recorded
    assert torch.load(tmp_path / "again" / "checkpoint.pt", weights_only=True)["extra"]["data_source"]["protocol"]["seq_len"] == 0


def test_the_variant_file_in_the_repository_and_the_variant_name_are_one_config():
    by_name = resolved("--model", "inttower@paper")
    by_file = resolved("--config", str(REPO / "configs" / "ml-1m" / "inttower@paper.yaml"))
    assert by_name == by_file and by_name["model"]["options"]["fe_block"] == "input" and by_name["protocol"]["seq_len"] == 0
    # The files ship inside the package (found from any folder); configs/ at the root is the same folder.
    assert variant_file("inttower@paper").is_relative_to(Path(prerank.__file__).parent / "configs")
    assert (REPO / "configs").resolve() == run_config.CONFIGS.resolve()


def test_every_variant_file_says_where_it_comes_from_and_builds_its_model(small_data):
    assert {"two_tower@paper", "dat@paper", "cold@paper", "inttower@paper", "fit@no_mqm"} <= set(variant_names())
    for name in variant_names():
        assert variant_file(name).read_text().startswith("# "), name
        model, options, _ = resolve_variant(name)
        assert model == name.partition("@")[0]
        create_model(model, small_data.schema, options)


def test_benchmark_reads_variants_from_their_files(tmp_path, monkeypatch):
    assert resolve_variant("two_tower@paper") == ("two_tower", {"temperature": 1.0, "learn_temperature": False}, 0)
    assert resolve_variant("two_tower") == ("two_tower", {}, None)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "two_tower@narrow.yaml").write_text("# a narrow tower\nmodel: {name: two_tower, options: {hidden: [4]}}\n"
                                                             "protocol: {seq_len: 3}\n")
    (tmp_path / "mine" / "two_tower@long.yaml").write_text("# more epochs\nmodel: {name: two_tower}\ntraining: {epochs: 50}\n")
    (tmp_path / "mine" / "dat@mislabelled.yaml").write_text("# names another model\nmodel: {name: two_tower}\n")
    monkeypatch.setattr(run_config, "CONFIGS", tmp_path)
    assert resolve_variant("two_tower@narrow") == ("two_tower", {"hidden": [4]}, 3)
    assert resolved("--model", "two_tower@narrow")["model"]["options"]["hidden"] == [4]
    with pytest.raises(RunConfigError, match=r"sets model and protocol.seq_len only, not \['training'\]"):
        resolve_variant("two_tower@long")
    with pytest.raises(RunConfigError, match="a variant of 'dat' must set model.name: dat"):
        resolve_variant("dat@mislabelled")
    with pytest.raises(RunConfigError, match="unknown variant 'two_tower@paper'"):
        resolve_variant("two_tower@paper")  # not under this CONFIGS
    # A bad variant stops the benchmark before any cell trains.
    with pytest.raises(RunConfigError, match="two_tower@long"):
        run_benchmark(BenchmarkConfig(dataset="synthetic", models=("two_tower", "two_tower@long")), tmp_path / "bench", progress=False)
    assert not (tmp_path / "bench").exists()


def test_defaults_are_the_configs_and_the_flags_show_them():
    defaults = validate({}, "no file")
    assert defaults.train_config() == TrainConfig() and defaults.protocol == ProtocolConfig()
    assert resolved() == defaults.as_dict()
    # A flag's default in `prerank train --help` is the config's (it overrides the file only when given).
    command = typer.main.get_command(app).commands["train"]
    shown = {param.name: param.default for param in command.params if param.name in FLAG_KEYS and param.default is not None}
    assert {"epochs", "batch_size", "lr", "patience", "seed", "seq_len", "protocol", "model", "dataset"} <= set(shown)
    for flag, default in shown.items():
        value = defaults.as_dict()
        for key in FLAG_KEYS[flag]:
            value = value[key]
        assert value == default, flag
