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
