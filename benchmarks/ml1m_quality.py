"""Quality of pre-ranking models on MovieLens-1M under both protocols, over seeds.

    python benchmarks/ml1m_quality.py --data-dir ../shared/data/ml-1m \
        --ratings-file ratings-partial-users0001-2999/ratings.dat.gz \
        --models two_tower,two_tower@paper --protocols temporal,inttower --seeds 3 \
        --out benchmarks/results/ml1m_two_tower

A model name followed by `@paper` runs the configuration of the published tables' code (see
VARIANTS). Each (variant, protocol, seed) cell is written to OUT/runs/ as it finishes and skipped
when the script is run again, so an interrupted run resumes. Writes OUT/results.json and
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
from prerank.metrics import rela_impr
from prerank.train.run import run_training, write_json_atomic
from prerank.train.trainer import TrainConfig

# name -> (registered model, config overrides, behaviour-sequence length or None for the default)
VARIANTS: dict[str, tuple[str, dict, int | None]] = {
    # The IntTower repo's dssm.py: cosine with gamma = 1, and its script feeds no behaviour sequence.
    "two_tower@paper": ("two_tower", {"temperature": 1.0, "learn_temperature": False}, 0),
    # FIT's ablations (the paper's: w/o MQM, w/o LSS, w SumMax, w FC) and its meta-size sweep (default N = 16).
    "fit@no_mqm": ("fit", {"use_mqm": False}, None),
    "fit@no_lss": ("fit", {"scorer": "dot"}, None),
    "fit@summax": ("fit", {"scorer": "summax"}, None),
    "fit@fc": ("fit", {"scorer": "fc"}, None),
    **{f"fit@n{n}": ("fit", {"num_meta": n}, None) for n in (8, 32, 64)},
}

# Published ML-1M test AUCs (IntTower paper Table 2; FIT paper table). Protocol: IntTower's, which leaks labels.
PUBLISHED = {
    "two_tower": {"IntTower T2": 0.8697, "FIT": 0.8695},
    "dat": {"IntTower T2": 0.8712, "FIT": 0.8784},
    "cold": {"IntTower T2": 0.8836, "FIT": 0.9009},
    "inttower": {"IntTower T2": 0.8974, "FIT": 0.9036},
    "ranktower": {"FIT": 0.9095},
    "fit": {"FIT": 0.9225},
}


def resolve(variant: str) -> tuple[str, dict, int | None]:
    return VARIANTS.get(variant, (variant, {}, None))


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
        # Published figures belong to the base model and its `@paper` configuration, not to ablations.
        published = PUBLISHED.get(resolve(variant)[0], {}) if "@" not in variant or variant.endswith("@paper") else {}
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
    args = parser.parse_args()

    out = Path(args.out)
    results = []
    for protocol in args.protocols.split(","):
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
                metrics.update(variant=variant, overrides=overrides, seq_len=protocol_config.seq_len)
                write_json_atomic(cell, metrics)
                results.append(metrics)
                print(f"   test AUC {metrics['test']['auc']:.4f}  logloss {metrics['test']['logloss']:.4f}  "
                      f"{metrics['seconds_per_epoch']:.1f} s/epoch", flush=True)
    write_json_atomic(out / "results.json", results)
    summary = summarise(results)
    note = ("Published values come from the IntTower code's protocol, whose mean-rating features leak labels; "
            "compare them with our `inttower` rows only. `@paper` variants use the published code's configuration.")
    (out / "summary.md").write_text(f"# ML-1M quality\n\n{summary}\n\n{note}\n")
    print(summary)


if __name__ == "__main__":
    main()
