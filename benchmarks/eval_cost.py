"""What a full-catalogue test ranking costs beside one training epoch, per model.

    PYTHONPATH=src nice -n 10 python benchmarks/eval_cost.py --data-dir ../shared/data/amazon-beauty-5core \
        --out benchmarks/results/eval_cost

For every model (`--models`, default all): one training epoch on the dataset (`--dataset`, default
the S3-Rec Amazon Beauty files) under `leave_last_out`, then the test ranking of every test user
against the whole catalogue (`eval_candidates = "full"`), both through `train_and_evaluate`, on
`--threads` threads. Records wall and process-CPU seconds of the epoch and of the ranking, the
1-minute load average before and after, and the ranking metrics (one epoch: a cost check, not a
quality figure). `--ranking-users N` ranks only the first N test users (by id) where ranking them
all would take hours (COLD's per-pair MLP): the table then gives the measured seconds and the
projection to every test user, marked as such. Resumable: a model already in OUT/results.json is skipped unless `--force` (which
re-measures the models named and keeps the other rows); each model's row is written as soon as it
is measured. Writes OUT/results.json, OUT/summary.md and
OUT/cost.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from prerank.atomic import atomic_path, write_json_atomic, write_text_atomic  # noqa: E402
from prerank.data.datasets import default_cache_dir, load_dataset  # noqa: E402
from prerank.data.pipeline import ProtocolConfig  # noqa: E402
from prerank.data.table import LABEL  # noqa: E402
from prerank.models import REGISTRY  # noqa: E402
from prerank.train.run import train_and_evaluate  # noqa: E402
from prerank.train.trainer import TrainConfig  # noqa: E402

DEFAULT_MODELS = ["two_tower", "dat", "tarq", "inttower", "fit", "ranktower", "cold", "lttd"]


def first_test_users(data, n: int):
    """`data` with its test split cut to the rows of its first `n` users (by user index)."""
    user = data.test[data.schema.user_id]
    kept = np.unique(user)[:n]
    return dataclasses.replace(data, test=data.test.subset(np.flatnonzero(np.isin(user, kept))))


def measure(data, model: str, threads: int, batch_size: int, ranking_users: int | None, all_users: int) -> dict:
    load_before = os.getloadavg()[0]
    if ranking_users is not None:
        data = first_test_users(data, ranking_users)
    config = TrainConfig(epochs=1, batch_size=batch_size, num_threads=threads, progress=False, eval_candidates="full")
    started = time.perf_counter()
    metrics, _ = train_and_evaluate(data, model, config)
    ranking = metrics["test_ranking"]["full"]
    return {"model": model, "threads": threads, "batch_size": batch_size, "train_rows": metrics["train_rows"],
            "epoch_seconds": metrics["seconds_per_epoch"], "epoch_cpu_seconds": metrics["cpu_seconds_per_epoch"],
            "ranking_seconds": metrics["ranking_eval_seconds"], "ranking_cpu_seconds": metrics["ranking_eval_cpu_seconds"],
            "ranked_users": ranking["requests"], "test_users": all_users, "catalogue_items": ranking["catalogue_items"],
            "recall@10": ranking["recall@10"], "ndcg@10": ranking["ndcg@10"],
            "total_seconds": time.perf_counter() - started, "load_1min_before": load_before,
            "load_1min_after": os.getloadavg()[0]}


def projected(row: dict, key: str) -> float:
    """A ranking figure of `row` for every test user (measured on `ranked_users` of them)."""
    return row[key] * row.get("test_users", row["ranked_users"]) / row["ranked_users"]


def write_reports(payload: dict, out: Path) -> None:
    order = {name: i for i, name in enumerate(DEFAULT_MODELS)}
    payload["rows"].sort(key=lambda r: order.get(r["model"], len(order)))
    rows = payload["rows"]
    write_json_atomic(out / "results.json", payload)
    lines = [f"# Full-catalogue test ranking vs one training epoch — {payload['dataset_label']}, `leave_last_out`", "",
             f"{payload['threads']} thread(s), batch {payload['batch_size']}, one epoch per model (a cost check: "
             "the metrics are one epoch's, not results). Ranking: every test user against the whole catalogue, "
             "the user's other positives masked. The ratio is of CPU seconds (the cost; wall time also counts "
             "waiting for a shared CPU). A row ranked on fewer users than the test split has its ranking "
             "seconds measured on those users and projected (×) to all of them.", "",
             "| model | epoch s (CPU s) | ranking s (CPU s) | ranking / epoch (CPU) | users ranked × items | "
             "Recall@10 | NDCG@10 | load before / after |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        users = r.get("test_users", r["ranked_users"])
        ranking = f"{r['ranking_seconds']:.1f} ({r['ranking_cpu_seconds']:.1f})"
        if r["ranked_users"] < users:
            ranking += f" on {r['ranked_users']:,} users; × {users / r['ranked_users']:.1f} = " \
                       f"{projected(r, 'ranking_seconds'):.0f} ({projected(r, 'ranking_cpu_seconds'):.0f})"
        lines.append(f"| {r['model']} | {r['epoch_seconds']:.1f} ({r['epoch_cpu_seconds']:.1f}) | {ranking} | "
                     f"{projected(r, 'ranking_cpu_seconds') / r['epoch_cpu_seconds']:.2f} | "
                     f"{r['ranked_users']:,} of {users:,} × {r['catalogue_items']:,} | {r['recall@10']:.4f} | "
                     f"{r['ndcg@10']:.4f} | {r['load_1min_before']:.2f} / {r['load_1min_after']:.2f} |")
    lines += ["", f"Machine: {payload['machine']}. Command: `{payload['command']}`."]
    write_text_atomic(out / "summary.md", "\n".join(lines) + "\n")
    figure, axis = plt.subplots(figsize=(8, 4))
    x = range(len(rows))
    axis.bar([i - 0.2 for i in x], [r["epoch_cpu_seconds"] for r in rows], 0.4, label="one training epoch")
    axis.bar([i + 0.2 for i in x], [projected(r, "ranking_cpu_seconds") for r in rows], 0.4,
             label="full-catalogue test ranking (projected where hatched)",
             hatch=None)
    for i, r in enumerate(rows):
        if r["ranked_users"] < r.get("test_users", r["ranked_users"]):
            axis.patches[len(rows) + i].set_hatch("//")
    axis.set_xticks(list(x), [r["model"] for r in rows])
    axis.set_yscale("log")
    axis.set_ylabel("CPU seconds (log)")
    axis.set_title(f"{payload['dataset_label']}: evaluation cost vs training ({payload['threads']} thread(s))")
    axis.legend()
    figure.tight_layout()
    with atomic_path(out / "cost.png") as tmp:
        figure.savefig(tmp, format="png", dpi=120)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--dataset", default="s3rec")
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS, choices=sorted(REGISTRY))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=2048)
    parser.add_argument("--cache-dir", default=str(default_cache_dir()))
    parser.add_argument("--ranking-users", type=int, default=None, help="rank only the first N test users (projected)")
    parser.add_argument("--force", action="store_true", help="re-measure models already in OUT/results.json")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    out = Path(args.out)
    data = load_dataset(args.dataset, args.data_dir, ProtocolConfig(name="leave_last_out"), cache_dir=args.cache_dir)
    settings = {"dataset_label": data.meta.get("dataset_label"), "threads": args.threads, "batch_size": args.batch_size}
    done: list[dict] = []
    if (out / "results.json").exists():
        previous = json.loads((out / "results.json").read_text())
        if all(previous.get(k) == v for k, v in settings.items()):
            done = previous["rows"]  # --force re-measures the models named, and keeps the others
        elif not args.force:
            raise SystemExit(f"{out / 'results.json'} was measured with other settings; give --force or another --out")
    payload = {**settings, "machine": f"{os.cpu_count()} CPUs, torch {torch.__version__}",
               "command": "python benchmarks/eval_cost.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in
                                                                       (("threads", args.threads),
                                                                        ("batch_size", args.batch_size))),
               "rows": done}
    for model in args.models:
        if any(r["model"] == model for r in done) and not args.force:
            print(f"{model}: already measured", flush=True)
            continue
        all_users = len(np.unique(data.test[data.schema.user_id][data.test[LABEL] > 0]))
        row = measure(data, model, args.threads, args.batch_size, args.ranking_users, all_users)
        done[:] = [r for r in done if r["model"] != model] + [row]
        write_reports(payload, out)
        print(f"{model}: epoch {row['epoch_seconds']:.1f} s ({row['epoch_cpu_seconds']:.1f} CPU), ranking of "
              f"{row['ranked_users']:,} users {row['ranking_seconds']:.1f} s ({row['ranking_cpu_seconds']:.1f} CPU), "
              f"load {row['load_1min_after']:.2f}", flush=True)


if __name__ == "__main__":
    main()
