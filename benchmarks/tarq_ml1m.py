"""TARQ on MovieLens-1M: quality with and without codebook alignment, the teacher it approximates,
codebook utilisation per level, and per-request cost as L·K grows.

    python benchmarks/tarq_ml1m.py --data-dir ../shared/data/ml-1m \
        --ratings-file ratings-partial-users0001-2999/ratings.dat.gz --out benchmarks/results/ml1m_tarq

Writes OUT/results.json and OUT/summary.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from prerank.benchmark import measure_request_latency
from prerank.data.movielens import load_movielens
from prerank.data.pipeline import ProtocolConfig
from prerank.data.table import LABEL
from prerank.metrics import auc, logloss
from prerank.models import create_model
from prerank.models.tarq import codebook_usage
from prerank.train.run import train_and_evaluate, write_json_atomic
from prerank.train.trainer import TrainConfig, iterate_batches, model_columns, to_device_tensors


@torch.no_grad()
def teacher_report(model, table) -> dict:
    model.eval()
    tensors = to_device_tensors(table, model_columns(model), torch.device("cpu"))
    logits = torch.cat([model.teacher(batch)[1] for batch in iterate_batches(tensors, 16384)])
    p = torch.sigmoid(logits).numpy()
    return {"auc": auc(table[LABEL], p), "logloss": logloss(table[LABEL], p)}


@torch.no_grad()
def usage_report(model, table, batch_size: int = 2048) -> dict:
    model.eval()
    items = {f.name: torch.as_tensor(table[f.name]).long() if table[f.name].dtype.kind == "i" else torch.as_tensor(table[f.name]).float()
             for f in model.schema.item_features}
    codes = model.encode_catalogue(items)["codes"]
    K = model.config.codebook_size
    per_batch = [codebook_usage(codes[i : i + batch_size], K)["utilisation"] for i in range(0, len(codes), batch_size)]
    return {"evaluation_set": codebook_usage(codes, K), "per_batch_utilisation": np.mean(per_batch, axis=0).tolist()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--ratings-file", default=None)
    parser.add_argument("--protocol", default="temporal")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    out = Path(args.out)
    data = load_movielens(args.data_dir, ProtocolConfig(name=args.protocol), args.ratings_file, args.cache_dir)
    results = {"dataset": data.meta["dataset_label"], "protocol": args.protocol, "runs": {}, "cost": []}
    for name, overrides in (("two_tower", None), ("tarq", {}), ("tarq (no alignment)", {"align": False})):
        config = TrainConfig(epochs=args.epochs, patience=2, seed=args.seed, num_threads=args.threads, progress=False)
        metrics, model = train_and_evaluate(data, "tarq" if overrides is not None else name, config, overrides)
        run = {"test": metrics["test"], "seconds_per_epoch": metrics["seconds_per_epoch"], "best_epoch": metrics["best_epoch"]}
        if overrides is not None:
            run["teacher_test"] = teacher_report(model, data.test)
            run["codebook"] = usage_report(model, data.test)
        results["runs"][name] = run
        print(name, run, flush=True)
        write_json_atomic(out / "results.json", results)

    torch.set_num_threads(1)
    request = {k: v[:1] for k, v in data.test.subset(np.arange(1)).to_tensors().items()}
    for levels, size in ((1, 16), (2, 32), (3, 64), (3, 128), (4, 256)):
        model = create_model("tarq", data.schema, {"levels": levels, "codebook_size": size, "codebook_init": "random"}).eval()
        table = model.encode_catalogue(data.items.to_tensors())
        latency = measure_request_latency(model, table, model.user_inputs(request), 1000, repeats=200)
        results["cost"].append({"levels": levels, "codebook_size": size, "codewords": levels * size, **latency})
        print(results["cost"][-1], flush=True)
    write_json_atomic(out / "results.json", results)

    lines = [f"# TARQ on {results['dataset']} [{args.protocol}], seed {args.seed}\n",
             "| model | test AUC | test log loss | teacher test AUC | utilisation per level (eval set) | per batch | entropy (nats) |",
             "|---|---|---|---|---|---|---|"]
    percent = lambda values: ", ".join(f"{v:.0%}" for v in values)  # noqa: E731
    for name, run in results["runs"].items():
        cells = [name, f"{run['test']['auc']:.4f}", f"{run['test']['logloss']:.4f}", "–", "–", "–", "–"]
        if "codebook" in run:
            usage = run["codebook"]
            cells[3:] = [f"{run['teacher_test']['auc']:.4f}", percent(usage["evaluation_set"]["utilisation"]),
                         percent(usage["per_batch_utilisation"]), ", ".join(f"{e:.2f}" for e in usage["evaluation_set"]["entropy"])]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Per-request cost, one request of 1,000 candidates, 1 CPU thread (untrained weights; cost depends on shapes only):", "",
              "| L | K | L·K | user stage p50 ms | score p50 ms | total p50 ms | total p99 ms |", "|---|---|---|---|---|---|---|"]
    for c in results["cost"]:
        lines.append(f"| {c['levels']} | {c['codebook_size']} | {c['codewords']} | {c['user_p50_ms']:.3f} | {c['score_p50_ms']:.3f} | "
                     f"{c['p50_ms']:.3f} | {c['p99_ms']:.3f} |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
