"""Wall time of one training epoch with 1 and K processes (`torchrun`, gloo on CPU).

    python benchmarks/distributed_epoch.py --data-dir ../shared/data/ml-1m \
        --ratings-file ratings-partial-users0001-2999/ratings.dat.gz --processes 1,2 \
        --out benchmarks/results/distributed_epoch

Each run is the user's command, `prerank train --epochs 1` (under `torchrun --standalone
--nproc-per-node K` for K > 1), one torch thread per process. Reported: the epoch's training-loop
wall time (`seconds_per_epoch` in metrics.json, rank 0's clock, data loading and evaluation not
included), the whole command's wall time, and the 1-minute load average before and after each run
(the CPU is shared). The preprocessing cache is warmed first so no run pays for it. Writes
OUT/results.json and OUT/summary.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from prerank.atomic import write_json_atomic


def run_once(processes: int, args, out_dir: Path) -> dict:
    train = ["-m", "prerank", "train", "--dataset", "ml-1m", "--data-dir", str(args.data_dir), "--ratings-file", args.ratings_file,
             "--protocol", "temporal", "--model", args.model, "--epochs", "1", "--threads", "1", "--no-progress",
             "--cache-dir", str(args.cache_dir), "--out", str(out_dir)]
    launcher = [sys.executable] if processes == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                        "--nproc-per-node", str(processes)]
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    subprocess.run(launcher + train, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    wall = time.perf_counter() - started
    metrics = json.loads((out_dir / "metrics.json").read_text())
    return {"processes": processes, "epoch_seconds": metrics["seconds_per_epoch"], "command_seconds": wall,
            "rows_per_second": metrics["rows_per_second"], "train_rows": metrics["train_rows"],
            "test_auc": metrics["test"]["auc"], "load_1min_before": load_before, "load_1min_after": os.getloadavg()[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--ratings-file", default="ratings-partial-users0001-2999/ratings.dat.gz")
    parser.add_argument("--model", default="two_tower")
    parser.add_argument("--processes", default="1,2")
    parser.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "prerank-cache")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    from prerank.data.datasets import load_dataset
    from prerank.data.pipeline import ProtocolConfig

    load_dataset("ml-1m", args.data_dir, ProtocolConfig(name="temporal"), args.ratings_file, args.cache_dir)  # warm the cache
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in [int(p) for p in args.processes.split(",")]:
            rows.append(run_once(k, args, Path(tmp) / f"p{k}"))
            print(rows[-1], flush=True)
    label = "ML-1M (users 1–2999)"
    result = {"dataset": label, "protocol": "temporal", "model": args.model, "cpu_count": os.cpu_count(),
              "threads_per_process": 1, "runs": rows}
    write_json_atomic(args.out / "results.json", result)
    lines = [f"# One epoch of {args.model}, {label}, temporal protocol, 1 torch thread per process",
             "", f"Machine: {os.cpu_count()} CPU cores, shared with other users (load average in the table).", "",
             "| processes | epoch (s) | command (s) | rows/s | test AUC | load before → after |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['processes']} | {r['epoch_seconds']:.1f} | {r['command_seconds']:.1f} | {r['rows_per_second']:,.0f} | "
                     f"{r['test_auc']:.4f} | {r['load_1min_before']:.2f} → {r['load_1min_after']:.2f} |")
    (args.out / "summary.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
