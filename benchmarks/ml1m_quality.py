"""Quality of pre-ranking models on MovieLens-1M under both protocols, over seeds.

    python benchmarks/ml1m_quality.py --data-dir ../shared/data/ml-1m \
        --ratings-file ratings-partial-users0001-2999/ratings.dat.gz \
        --models two_tower,two_tower@paper --protocols temporal,inttower --seeds 3 \
        --out benchmarks/results/ml1m_two_tower

A model name followed by `@paper` runs the configuration of the published tables' code (its file
under configs/ml-1m/, read by prerank.benchmark.resolve_variant). Each (variant, protocol, seed)
cell is written to OUT/runs/ as it finishes and skipped when the script is run again, so an
interrupted run resumes. Writes OUT/results.json and
OUT/summary.md (mean ± std over seeds, next to the published ML-1M AUCs).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from prerank.data.datasets import default_cache_dir
from prerank.data.movielens import load_movielens
from prerank.data.pipeline import ProtocolConfig
from prerank.benchmark import PUBLISHED, PUBLISHED_LOGLOSS, resolve_variant as resolve
from prerank.metrics import rela_impr
from prerank.atomic import write_json_atomic
from prerank.train.run import run_training
from prerank.train.trainer import TrainConfig


def summarise(results: list[dict], base: str = "two_tower") -> str:
    lines = [
        "| model | protocol | dataset | seeds | test AUC | test log loss | GAUC | RelaImpr vs "
        f"{base} | s/epoch | rows/s | published AUC |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    cells: dict[tuple[str, str], list[dict]] = {}
    for r in results:
        cells.setdefault((r["variant"], r["protocol"]), []).append(r)
    for (variant, protocol), runs in sorted(cells.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        aucs = np.array([r["test"]["auc"] for r in runs])
        base_runs = cells.get((base, protocol))
        impr = "–"
        if base_runs and variant != base:
            impr = f"{rela_impr(aucs.mean(), np.mean([r['test']['auc'] for r in base_runs])):+.2f}%"
        model = resolve(variant)[0]
        # Published figures belong to the base model and its `@paper` configuration, not to ablations.
        published = {k: f"{v}" + (f" (log loss {PUBLISHED_LOGLOSS[model]})" if k == "IntTower T2" and model in PUBLISHED_LOGLOSS else "")
                     for k, v in PUBLISHED.get(model, {}).items()} if "@" not in variant or variant.endswith("@paper") else {}
        lines.append(
            f"| {variant} | {protocol}{' (leaks labels)' if runs[0]['leaks_labels'] else ''} | {runs[0]['dataset_label']} | "
            f"{len(runs)} | {aucs.mean():.4f} ± {aucs.std():.4f} | "
            f"{np.mean([r['test']['logloss'] for r in runs]):.4f} ± {np.std([r['test']['logloss'] for r in runs]):.4f} | "
            f"{np.mean([r['test']['gauc'] for r in runs]):.4f} | {impr} | "
            f"{np.mean([r['seconds_per_epoch'] for r in runs]):.1f} | {np.mean([r['rows_per_second'] for r in runs]):,.0f} | "
            f"{', '.join(f'{k} {v}' for k, v in published.items()) or '–'} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--ratings-file", default=None)
    parser.add_argument("--models", default="two_tower")
    parser.add_argument("--protocols", default="temporal,inttower")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--patience", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--cache-dir", default=str(default_cache_dir()))
    parser.add_argument("--out", required=True)
    parser.add_argument("--note", default="", help="a paragraph appended to summary.md (e.g. how busy the machine was)")
    parser.add_argument("--summarise-only", action="store_true",
                        help="train nothing: summarise every cell already in OUT/runs (runs with different seed counts)")
    args = parser.parse_args()

    out = Path(args.out)
    results = []
    if args.summarise_only:
        results = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))]
    for protocol in [] if args.summarise_only else args.protocols.split(","):
        for variant in args.models.split(","):
            model, overrides, seq_len = resolve(variant)
            protocol_config = ProtocolConfig(name=protocol, **({} if seq_len is None else {"seq_len": seq_len}))
            data = load_movielens(args.data_dir, protocol_config, args.ratings_file, args.cache_dir)
            for seed in range(1, args.seeds + 1):
                cell = out / "runs" / f"{variant}-{protocol}-seed{seed}.json"
                if cell.exists():
                    results.append(json.loads(cell.read_text()))
                    continue
                print(f"== {variant} / {protocol} / seed {seed}", flush=True)
                config = TrainConfig(epochs=args.epochs, patience=args.patience, seed=seed, batch_size=args.batch_size,
                                     num_threads=args.threads, progress=False)
                metrics = run_training(data, model, config, overrides)
                metrics.update(variant=variant, overrides=overrides, seq_len=protocol_config.seq_len,
                               max_epochs=args.epochs, patience=args.patience)
                write_json_atomic(cell, metrics)
                results.append(metrics)
                print(f"   test AUC {metrics['test']['auc']:.4f}  logloss {metrics['test']['logloss']:.4f}  "
                      f"{metrics['seconds_per_epoch']:.1f} s/epoch", flush=True)
    write_json_atomic(out / "results.json", results)
    summary = summarise(results)
    note = ("Published values come from the IntTower code's protocol, whose mean-rating features leak labels; "
            "compare them with our `inttower` rows only. `@paper` variants use the published code's configuration.")
    budgets = sorted({(r.get("max_epochs", "?"), r.get("patience", "?")) for r in results}, key=str)
    note += " Training budget (max epochs, early-stopping patience on validation AUC): " + ", ".join(map(str, budgets)) + "."
    (out / "summary.md").write_text(f"# ML-1M quality\n\n{summary}\n\n{note}\n" + (f"\n{args.note}\n" if args.note else ""))
    print(summary)


if __name__ == "__main__":
    main()
