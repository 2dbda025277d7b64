"""`prerank benchmark`: every model on one dataset with one budget, the papers' tables side by side.

Each (model, seed) cell runs in its own process (so its peak resident memory is its own), trains
with the shared trainer, evaluates the best epoch, then measures the served path on one CPU
thread: one request = `encode_user` once + one vectorised `score` over N candidates taken from the
precomputed item-state table. Cells are written to OUT/cells/ as they finish; a re-run skips
finished cells, so an interrupted benchmark resumes.

Outputs in OUT: quality.md/csv (AUC, log loss, RelaImpr vs Two-Tower as mean ± std over seeds,
GAUC), cost.md/csv (seconds per epoch, training rows per second, peak RSS of training, serving
p50/p99 at N candidates, item-state bytes per item and relative to Two-Tower, parameters),
results.json, quality_vs_latency.png and training_curves.png.
"""

from __future__ import annotations

import csv
import json
import multiprocessing
import resource
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, field
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import yaml
from pydantic import Field

from prerank.config import NonEmptyStr, PositiveInt, config_dataclass
from prerank.data.pipeline import ProtocolName

# Published ML-1M test AUCs and log losses by model (IntTower Table 2, FIT), protocol and sources in
# the file: data about papers, kept beside the variant configs rather than in code.
_PUBLISHED_FILE = yaml.safe_load((Path(__file__).parent / "configs" / "published" / "ml-1m.yaml").read_text())
PUBLISHED: dict[str, dict[str, float]] = _PUBLISHED_FILE["auc"]
PUBLISHED_LOGLOSS: dict[str, float] = _PUBLISHED_FILE["logloss"]
BASE = "two_tower"
LIST_KS = (10, 50)


def resolve_variant(variant: str) -> tuple[str, dict, int | None]:
    """(registered model, config overrides, behaviour-sequence length or None for the default) of a
    model name or a variant `model@tag`, read from its file under `prerank/configs/` (see
    `prerank.run_config`). A variant sets its model and sequence length only: the data and the
    budget are the benchmark's, the same for every model."""
    from prerank.run_config import RunConfigError, read_variant, variant_file

    if "@" not in variant:
        return variant, {}, None
    given = read_variant(variant)
    extra = [k for k in given if k not in ("model", "protocol")] + [f"protocol.{k}" for k in given.get("protocol", {}) if k != "seq_len"]
    if extra:
        raise RunConfigError(f"{variant_file(variant)}: a benchmark variant sets model and protocol.seq_len only, not {extra}")
    return given["model"]["name"], given["model"].get("options", {}), given.get("protocol", {}).get("seq_len")


@config_dataclass
class BenchmarkConfig:
    dataset: NonEmptyStr = "ml-1m"
    data_dir: str | None = None
    ratings_file: str | None = None
    protocol: ProtocolName = "temporal"
    models: Annotated[tuple[NonEmptyStr, ...], Field(min_length=1)] = ("all",)
    seeds: PositiveInt = 3
    epochs: PositiveInt = 10
    patience: PositiveInt = 2
    batch_size: PositiveInt = 2048
    threads: PositiveInt | None = None
    candidates: PositiveInt = 1000
    latency_repeats: PositiveInt = 200
    cache_dir: str | None = None
    cascade: str | None = None  # a `prerank cascade build` file of the same data: adds Recall/NDCG@K on its test lists
    extra_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)  # model name -> its config overrides


def all_models() -> list[str]:
    from prerank.models import REGISTRY

    # Pre-rankers first, the ranking teacher(s) last as the upper reference.
    return sorted(REGISTRY, key=lambda n: (REGISTRY[n].is_ranker, n != BASE, n))


def measure_request_latency(model, item_table: dict, user_inputs: dict, n_candidates: int, repeats: int, seed: int = 0) -> dict:
    """One request of `n_candidates` random catalogue rows, timed by `prerank.latency` on the current
    thread count: the user stage is `encode_user`, the candidate stage gathering the item states and
    one `score` (item states precomputed; no raw-request encoding, unlike `prerank bench-serve`)."""
    import torch

    from prerank.latency import time_request_stages
    from prerank.models.base import gather_items

    generator = torch.Generator().manual_seed(seed)
    n_items = len(next(iter(item_table.values())))
    rows = torch.randint(0, n_items, (1, n_candidates), generator=generator)
    with torch.inference_mode():
        timed = time_request_stages(lambda i: model.encode_user(user_inputs),
                                    lambda i, user_state: model.score(user_state, gather_items(item_table, rows)),
                                    repeats, warmup=repeats // 10)
    wall = timed["wall"]
    return {
        "candidates": n_candidates,
        "p50_ms": wall["total"]["p50_ms"], "p99_ms": wall["total"]["p99_ms"],
        "user_p50_ms": wall["user_stage"]["p50_ms"], "user_p99_ms": wall["user_stage"]["p99_ms"],
        "score_p50_ms": wall["candidate_stage"]["p50_ms"], "score_p99_ms": wall["candidate_stage"]["p99_ms"],
        **timed,
    }


def item_state_bytes(item_table: dict) -> float:
    n_items = len(next(iter(item_table.values())))
    return sum(v.element_size() * v.numel() for v in item_table.values()) / n_items


def run_cell(config: BenchmarkConfig, variant: str, seed: int) -> dict:
    """One (model, seed) cell; runs in a fresh process."""
    import torch

    from prerank.data.datasets import load_dataset
    from prerank.data.pipeline import ProtocolConfig
    from prerank.train.run import train_and_evaluate
    from prerank.train.trainer import TrainConfig

    model_name, overrides, seq_len = resolve_variant(variant)
    protocol = ProtocolConfig(name=config.protocol, **({} if seq_len is None else {"seq_len": seq_len}))
    data = load_dataset(config.dataset, config.data_dir, protocol, config.ratings_file, config.cache_dir)
    train_config = TrainConfig(epochs=config.epochs, patience=config.patience, batch_size=config.batch_size,
                               seed=seed, num_threads=config.threads, progress=False)
    result, model = train_and_evaluate(data, model_name, train_config, {**overrides, **config.extra_overrides.get(model_name, {})})
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    torch.set_num_threads(1)
    model.eval()
    item_table = model.encode_catalogue(data.items.to_tensors())
    first_test_row = data.test.subset(np.arange(1)).to_tensors()
    result["serving"] = measure_request_latency(model, item_table, model.user_inputs(first_test_row),
                                                config.candidates, config.latency_repeats, seed)
    result["item_state_bytes"] = item_state_bytes(item_table)
    if config.cascade:
        from prerank.cascade import check_cascade_matches, load_cascade
        from prerank.train.listwise import evaluate_lists

        cascade = load_cascade(Path(config.cascade))
        check_cascade_matches(cascade, data)
        result["test_lists"] = evaluate_lists(model, data, cascade.lists("test"), ks=LIST_KS)
    result.update(variant=variant, overrides=overrides, seq_len=protocol.seq_len, is_ranker=type(model).is_ranker,
                  decoupled=type(model).decoupled)
    return result


def _cell_path(out: Path, variant: str, seed: int) -> Path:
    return out / "cells" / f"{variant.replace('/', '_')}-seed{seed}.json"


def run_benchmark(config: BenchmarkConfig, out: Path, progress: bool = True) -> list[dict]:
    from tqdm.auto import tqdm

    from prerank.atomic import write_json_atomic

    variants = all_models() if "all" in config.models else list(config.models)
    for variant in variants:
        resolve_variant(variant)  # a bad variant fails here, before any cell trains
    cells = [(v, s) for v in variants for s in range(1, config.seeds + 1)]
    results = []
    context = multiprocessing.get_context("spawn")
    bar = tqdm(cells, desc="benchmark", unit="cell", disable=not progress)
    for variant, seed in bar:
        bar.set_postfix_str(f"{variant} seed {seed}")
        path = _cell_path(out, variant, seed)
        if path.exists():
            results.append(json.loads(path.read_text()))
            continue
        with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
            result = pool.submit(run_cell, config, variant, seed).result()
        write_json_atomic(path, result)
        results.append(result)
        tqdm.write(f"{variant} seed {seed}: test AUC {result['test']['auc']:.4f}  p99 {result['serving']['p99_ms']:.2f} ms "
                   f"at N={config.candidates}")
    write_reports(results, config, out)
    return results


def _mean_or_none(values) -> float | None:
    known = [v for v in values if v is not None]
    return float(np.mean(known)) if known else None


def _mean_std(values) -> tuple[float, float]:
    values = np.asarray(values, dtype=float)
    return float(values.mean()), float(values.std())


def top_k_metrics(cell: dict) -> dict[str, float]:
    """Recall@K / NDCG@K of a cell: on the cascade's test requests (`--cascade`), else over the
    full catalogue for implicit-feedback datasets, else none."""
    source = cell.get("test_lists") or cell.get("test_ranking", {}).get("full") or {}
    return {k: v for k, v in source.items() if k.startswith(("recall@", "ndcg@"))}


def aggregate(results: list[dict]) -> list[dict]:
    from prerank.metrics import rela_impr

    by_variant: dict[str, list[dict]] = {}
    for r in results:
        by_variant.setdefault(r["variant"], []).append(r)
    base_auc = np.mean([r["test"]["auc"] for r in by_variant[BASE]]) if BASE in by_variant else None
    base_bytes = np.mean([r["item_state_bytes"] for r in by_variant[BASE]]) if BASE in by_variant else None
    rows = []
    for variant, runs in by_variant.items():
        auc_mean, auc_std = _mean_std([r["test"]["auc"] for r in runs])
        impr = [rela_impr(r["test"]["auc"], base_auc) for r in runs] if base_auc is not None else None
        row = {
            "model": variant,
            "role": "ranker (upper reference)" if runs[0]["is_ranker"] else "pre-ranker",
            "seeds": len(runs),
            "auc": auc_mean, "auc_std": auc_std,
            "logloss": _mean_std([r["test"]["logloss"] for r in runs])[0],
            "logloss_std": _mean_std([r["test"]["logloss"] for r in runs])[1],
            "gauc": _mean_std([r["test"]["gauc"] for r in runs])[0],
            **{name: _mean_std([top_k_metrics(r)[name] for r in runs])[0] for name in top_k_metrics(runs[0])},
            "rela_impr": _mean_std(impr)[0] if impr else None,
            "rela_impr_std": _mean_std(impr)[1] if impr else None,
            "seconds_per_epoch": _mean_std([r["seconds_per_epoch"] for r in runs])[0],
            "cpu_seconds_per_epoch": _mean_or_none([r.get("cpu_seconds_per_epoch") for r in runs]),
            "ranking_eval_seconds": _mean_or_none([r.get("ranking_eval_seconds") for r in runs]),
            "rows_per_second": _mean_std([r["rows_per_second"] for r in runs])[0],
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
            "p50_ms": _mean_std([r["serving"]["p50_ms"] for r in runs])[0],
            "p99_ms": _mean_std([r["serving"]["p99_ms"] for r in runs])[0],
            # CPU time of the same requests (prerank.latency): what a request costs on a core of its own.
            "cpu_p99_ms": _mean_or_none([r["serving"].get("cpu_time", {}).get("total", {}).get("p99_ms") for r in runs]),
            "load_average_1min": _mean_or_none([r["serving"].get("load_average_1min") for r in runs]),
            "bytes_per_item": _mean_std([r["item_state_bytes"] for r in runs])[0],
            "num_parameters": runs[0]["num_parameters"],
            "published": PUBLISHED.get(resolve_variant(variant)[0], {}) if runs[0]["dataset"] == "ml-1m" else {},
        }
        row["storage_vs_two_tower"] = row["bytes_per_item"] / base_bytes if base_bytes else None
        rows.append(row)
    return rows


def write_reports(results: list[dict], config: BenchmarkConfig, out: Path) -> None:
    from prerank.atomic import write_json_atomic

    rows = aggregate(results)
    first = results[0]
    leak = first.get("leaks_labels")
    header = (f"Dataset: {first['dataset_label']}; protocol: {first['protocol']}"
              f"{' (leaks labels into features: for comparison with published tables only)' if leak else ' (leakage-free)'}; "
              f"{config.epochs} epochs max, early stopping patience {config.patience}, batch {config.batch_size}, "
              f"seeds 1..{config.seeds}. Serving: one request of {config.candidates} candidates on 1 CPU thread.")
    list_columns = list(top_k_metrics(first))
    published_note = ("Published AUCs are ML-1M (all users) under the IntTower code's protocol, which leaks labels; "
                      "they compare with rows measured under `--protocol inttower` only.")
    if config.cascade:
        published_note += (f" Recall@K / NDCG@K: every model, as trained above (pointwise), ranks the test request lists of the "
                           f"simulated cascade `{config.cascade}` against the real interactions (graded).")
    elif list_columns:
        published_note += (" Recall@K / NDCG@K: each test user's held-out items ranked against the full catalogue "
                           "(the user's other positives masked).")
    quality = ["| model | role | seeds | AUC | log loss | GAUC | RelaImpr vs two_tower | " + "".join(f"{c} | " for c in list_columns)
               + "published AUC |", "|---|---|---|---|---|---|---|" + "---|" * len(list_columns) + "---|"]
    cost = ["| model | s/epoch | CPU s/epoch | ranking eval s | train rows/s | peak RSS (MB) | p50 ms | p99 ms | CPU p99 ms | load avg "
            "| bytes/item | vs two_tower | parameters |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda v, spec: "–" if v is None else format(v, spec)  # noqa: E731
    for r in rows:
        impr = "–" if r["rela_impr"] is None or r["model"] == BASE else f"{r['rela_impr']:+.2f}% ± {r['rela_impr_std']:.2f}"
        published = ", ".join(f"{k} {v}" for k, v in r["published"].items()) or "–"
        quality.append(f"| {r['model']} | {r['role']} | {r['seeds']} | {r['auc']:.4f} ± {r['auc_std']:.4f} | "
                       f"{r['logloss']:.4f} ± {r['logloss_std']:.4f} | {r['gauc']:.4f} | {impr} | "
                       + "".join(f"{fmt(r.get(c), '.4f')} | " for c in list_columns) + f"{published} |")
        cost.append(f"| {r['model']} | {r['seconds_per_epoch']:.1f} | {fmt(r['cpu_seconds_per_epoch'], '.1f')} | "
                    f"{fmt(r['ranking_eval_seconds'], '.1f')} | {r['rows_per_second']:,.0f} | {r['peak_rss_mb']:,.0f} | "
                    f"{r['p50_ms']:.3f} | {r['p99_ms']:.3f} | {fmt(r['cpu_p99_ms'], '.3f')} | {fmt(r['load_average_1min'], '.2f')} | "
                    f"{r['bytes_per_item']:.0f} | {fmt(r['storage_vs_two_tower'], '.2f')}× | "
                    f"{r['num_parameters']:,} |")
    markdown = (f"# prerank benchmark\n\n{header}\n\n## Quality (test split)\n\n" + "\n".join(quality)
                + f"\n\n{published_note}\n\n## Cost\n\n" + "\n".join(cost)
                + "\n\n![quality vs latency](quality_vs_latency.png)\n\n![training curves](training_curves.png)\n")
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmark.md").write_text(markdown)
    for name, columns in (("quality", ["model", "role", "seeds", "auc", "auc_std", "logloss", "logloss_std", "gauc", "rela_impr", "rela_impr_std",
                                       *list_columns]),
                          ("cost", ["model", "seconds_per_epoch", "cpu_seconds_per_epoch", "ranking_eval_seconds", "rows_per_second", "peak_rss_mb", "p50_ms", "p99_ms",
                                    "cpu_p99_ms", "load_average_1min", "bytes_per_item", "storage_vs_two_tower", "num_parameters"])):
        with open(out / f"{name}.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
    write_json_atomic(out / "results.json", {"config": asdict(config), "summary": rows, "cells": results})
    plot(rows, results, out)


def plot(rows: list[dict], results: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for r in rows:
        ax.errorbar(r["p99_ms"], r["auc"], yerr=r["auc_std"], fmt="s" if "ranker (" in r["role"] else "o", capsize=3)
        ax.annotate(r["model"], (r["p99_ms"], r["auc"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("serving latency p99, ms (one request, 1 CPU thread)")
    ax.set_ylabel("test AUC (mean ± std over seeds)")
    ax.set_title(f"{results[0]['dataset_label']} [{results[0]['protocol']}]")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "quality_vs_latency.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for variant in dict.fromkeys(r["variant"] for r in results):
        run = next(r for r in results if r["variant"] == variant)  # the first seed's curve
        ax.plot([h["epoch"] for h in run["history"]], [h["valid_auc"] for h in run["history"]], marker="o", label=variant)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation AUC")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "training_curves.png", dpi=120)
    plt.close(fig)
