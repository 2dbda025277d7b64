"""`prerank export`, `bench-serve` and `load-test` end to end on a tiny generated run."""

import json

import pytest
from typer.testing import CliRunner

from prerank.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    result = runner.invoke(app, ["train", "--dataset", "synthetic", "--model", "two_tower", "--epochs", "1", "--seq-len", "10",
                                 "--embed-dim", "8", "--batch-size", "512", "--set", "hidden=[32, 16]", "--no-progress",
                                 "--out", str(out), "--cache-dir", str(out / "cache"), "--threads", "1"])
    assert result.exit_code == 0, result.output
    return out / "checkpoint.pt"


def test_export_bench_and_load_test_commands(checkpoint, tmp_path):
    artifact = tmp_path / "artifact"
    result = runner.invoke(app, ["export", "--checkpoint", str(checkpoint), "--out", str(artifact), "--version", "t1"])
    assert result.exit_code == 0, result.output
    assert "two_tower version t1" in result.output and "64 bytes per item" in result.output  # 16 float32
    result = runner.invoke(app, ["export", "--checkpoint", str(checkpoint), "--out", str(artifact)])
    assert result.exit_code == 2 and "already exists" in result.output

    results = tmp_path / "results"
    result = runner.invoke(app, ["bench-serve", str(artifact), "--sizes", "10,400", "--repeats", "4", "--warmup", "1",
                                 "--k", "5", "--out", str(results)])
    assert result.exit_code == 0, result.output
    bench = json.loads((results / "two_tower.bench.json").read_text())
    assert [row["candidates"] for row in bench["latency"]] == [10, 400]
    assert bench["latency"][1]["sampled_with_replacement"]  # the generated catalogue has 300 items
    for row in bench["latency"]:
        for stage in ("user_stage", "candidate_stage", "total"):
            assert 0 < row[stage]["p50_ms"] <= row[stage]["p99_ms"]
    assert bench["storage"]["bytes_per_item"] == 64 and bench["conditions"]["torch_threads"] == 1
    # The default-config Two-Tower ends in 128 floats: a 16-wide one stores an eighth of that.
    assert bench["storage"]["two_tower_bytes_per_item"] == 512 and bench["storage"]["relative_to_two_tower"] == 0.125
    assert "| 400 (sampled with replacement) | 5 |" in (results / "two_tower.bench.md").read_text()

    result = runner.invoke(app, ["load-test", str(artifact), "--requests", "12", "--concurrency", "3", "--candidates", "50",
                                 "--warmup", "2", "--out", str(results)])
    assert result.exit_code == 0, result.output
    load = json.loads((results / "two_tower.load.json").read_text())
    assert load["requests"] == 12 and load["status_counts"] == {"200": 12} and load["non_2xx"] == 0
    assert load["throughput_rps"] > 0 and load["latency"]["p50_ms"] <= load["latency"]["p99_ms"]
    summary = (results / "README.md").read_text()
    assert "| two_tower |" in summary and "0 non-2xx" in summary


def test_export_and_serve_errors_are_messages(tmp_path):
    result = runner.invoke(app, ["export", "--checkpoint", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "a")])
    assert result.exit_code == 2 and "checkpoint not found" in result.output
    result = runner.invoke(app, ["serve", str(tmp_path), "--port", "0"])
    assert result.exit_code == 2 and "not an artifact" in result.output
    result = runner.invoke(app, ["bench-serve", str(tmp_path)])
    assert result.exit_code == 2 and "not an artifact" in result.output
    result = runner.invoke(app, ["load-test", str(tmp_path), "--url", "http://10.0.0.1:80"])
    assert result.exit_code == 2 and "not an artifact" in result.output


def test_export_onnx_and_bench_both_backends(checkpoint, tmp_path):
    pytest.importorskip("onnxruntime")
    artifact = tmp_path / "artifact"
    result = runner.invoke(app, ["export", "--checkpoint", str(checkpoint), "--out", str(artifact), "--onnx"])
    assert result.exit_code == 0, result.output
    assert (artifact / "onnx" / "user.onnx").exists() and (artifact / "onnx" / "candidates.onnx").exists()
    results = tmp_path / "results"
    for backend in ("torch", "onnxruntime"):
        result = runner.invoke(app, ["bench-serve", str(artifact), "--sizes", "10,100", "--repeats", "3", "--warmup", "1",
                                     "--k", "5", "--backend", backend, "--out", str(results)])
        assert result.exit_code == 0, result.output
    assert json.loads((results / "two_tower.onnxruntime.bench.json").read_text())["backend"] == "onnxruntime"
    summary = (results / "README.md").read_text()
    assert "| two_tower | torch |" in summary and "| two_tower | onnxruntime |" in summary
