import json

import pytest

from prerank.benchmark import BenchmarkConfig, aggregate, run_benchmark


def test_benchmark_writes_tables_and_plots_and_resumes(tmp_path):
    config = BenchmarkConfig(dataset="synthetic", models=("two_tower", "two_tower@paper"), seeds=1, epochs=1,
                             batch_size=256, candidates=50, latency_repeats=5)
    out = tmp_path / "bench"
    results = run_benchmark(config, out, progress=False)
    for name in ("benchmark.md", "quality.csv", "cost.csv", "results.json", "quality_vs_latency.png", "training_curves.png"):
        assert (out / name).stat().st_size > 0, name
    cells = sorted((out / "cells").iterdir())
    assert len(cells) == 2
    stamps = [c.stat().st_mtime_ns for c in cells]
    summary = {r["model"]: r for r in json.loads((out / "results.json").read_text())["summary"]}
    assert summary["two_tower"]["storage_vs_two_tower"] == 1.0
    assert summary["two_tower@paper"]["auc"] == results[1]["test"]["auc"]
    # The variant's settings come from configs/ml-1m/two_tower@paper.yaml.
    assert results[1]["overrides"] == {"temperature": 1.0, "learn_temperature": False} and results[1]["seq_len"] == 0
    assert 0 < summary["two_tower"]["p50_ms"] <= summary["two_tower"]["p99_ms"]
    # A second run finds every cell done and recomputes none.
    again = run_benchmark(config, out, progress=False)
    assert [c.stat().st_mtime_ns for c in sorted((out / "cells").iterdir())] == stamps
    assert [r["test"] for r in again] == [r["test"] for r in results]


def test_rela_impr_is_against_two_tower():
    cell = lambda variant, auc: {"variant": variant, "test": {"auc": auc, "logloss": 0.5, "gauc": 0.6}, "is_ranker": False,  # noqa: E731
                                 "seconds_per_epoch": 1.0, "rows_per_second": 1.0, "peak_rss_mb": 1.0, "dataset": "synthetic",
                                 "serving": {"p50_ms": 1.0, "p99_ms": 2.0}, "item_state_bytes": 8.0, "num_parameters": 1}
    rows = {r["model"]: r for r in aggregate([cell("two_tower", 0.7), cell("x", 0.75), cell("x", 0.75)])}
    assert rows["x"]["rela_impr"] == pytest.approx(25.0) and rows["x"]["seeds"] == 2


def test_a_cascade_adds_list_metrics_to_the_quality_table(tmp_path):
    import torch

    from prerank.cascade import CascadeConfig, build_cascade, save_cascade
    from prerank.data.datasets import load_dataset
    from prerank.data.pipeline import ProtocolConfig
    from prerank.models import create_model

    data = load_dataset("synthetic", None, ProtocolConfig(), None, str(tmp_path / "cache"))
    torch.manual_seed(0)
    teacher = create_model("din", data.schema, {"hidden": [8], "attention_hidden": [4]}).eval()
    save_cascade(build_cascade(data, teacher, CascadeConfig(retrieval_size=20, random_items=5, prerank_size=8, exposure_size=3, window=4)),
                 tmp_path / "cascade.parquet")
    config = BenchmarkConfig(dataset="synthetic", models=("two_tower",), seeds=1, epochs=1, batch_size=256, candidates=20,
                             latency_repeats=3, cache_dir=str(tmp_path / "cache"), cascade=str(tmp_path / "cascade.parquet"))
    run_benchmark(config, tmp_path / "bench", progress=False)
    row = json.loads((tmp_path / "bench" / "results.json").read_text())["summary"][0]
    assert 0 <= row["recall@10"] <= 1 and 0 <= row["ndcg@50"] <= 1
    assert "| recall@10 | ndcg@10 | recall@50 | ndcg@50 |" in (tmp_path / "bench" / "benchmark.md").read_text()
