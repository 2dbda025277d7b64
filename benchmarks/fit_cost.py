"""FIT's cost split: the user stage grows with N (meta queries), the per-candidate stage with H_u·H_v.

    PYTHONPATH=src nice -n 10 python benchmarks/fit_cost.py --data-dir ../shared/data/ml-1m \
        --ratings-file ratings-partial-users0001-2999/ratings.dat.gz --out benchmarks/results/ml1m_fit

For one request (one user of the test split, `--candidates` items drawn from the catalogue) on one
thread, in eval mode, times `encode_user` (once per request) and `score` (gather of the precomputed
item states included) over `--repeats` repetitions (median and p99), and reports the item-state
bytes per item next to Two-Tower's, the user-state bytes per request and the scorer's multiply-adds
per candidate. Weights are freshly initialised: cost does not depend on their values. Writes
OUT/cost.json and OUT/cost.md.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from prerank.data.datasets import default_cache_dir
from prerank.data.movielens import load_movielens
from prerank.data.pipeline import ProtocolConfig
from prerank.models import create_model
from prerank.models.base import gather_items
from prerank.atomic import write_json_atomic

# (label, model, overrides): the N sweep at default heads, then the heads sweep at default N.
CONFIGS = [("two_tower", "two_tower", {})]
CONFIGS += [(f"fit N={n}", "fit", {"num_meta": n}) for n in (8, 16, 32, 64)]
CONFIGS += [(f"fit H_u=H_v={h}", "fit", {"user_heads": h, "item_heads": h}) for h in (2, 8, 16)]
CONFIGS += [(f"fit scorer={s}", "fit", {"scorer": s}) for s in ("dot", "summax", "fc")]
CONFIGS += [("fit w/o MQM", "fit", {"use_mqm": False})]


def scorer_macs(model) -> int:
    """Multiply-adds per candidate in `score` (the similarity matrix and the scorer on top of it)."""
    c = model.config
    hu, hv, p = model.user_heads, model.item_heads, model.head_dim
    similarity = hu * hv * p
    if c.scorer == "lss":
        return similarity + hu * hv * c.row_units + c.row_units * hu * c.col_units + c.row_units * c.col_units
    if c.scorer == "fc":
        dims = [hu * hv, *c.fc_hidden, 1]
        return similarity + sum(a * b for a, b in zip(dims, dims[1:]))
    return similarity + (hu * hv if c.scorer == "summax" else 0)


def state_bytes(state: dict, rows: int) -> int:
    return int(sum(v.numel() * v.element_size() for v in state.values()) // rows)


def time_request(model, user: dict, table: dict, candidates: torch.Tensor, repeats: int) -> dict:
    user_times, score_times = [], []
    with torch.no_grad():
        for i in range(repeats + 3):
            started = time.perf_counter()
            user_state = model.encode_user(user)
            encoded = time.perf_counter()
            scores = model.score(user_state, gather_items(table, candidates))
            done = time.perf_counter()
            if i >= 3:  # warm-up
                user_times.append(encoded - started)
                score_times.append(done - encoded)
    assert scores.shape == candidates.shape
    ms = lambda xs, q: float(np.percentile(xs, q) * 1e3)  # noqa: E731
    return {"user_ms_min": ms(user_times, 0), "user_ms_p50": ms(user_times, 50), "user_ms_p99": ms(user_times, 99),
            "score_ms_min": ms(score_times, 0), "score_ms_p50": ms(score_times, 50), "score_ms_p99": ms(score_times, 99),
            "user_state_bytes": state_bytes(user_state, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--ratings-file", default=None)
    parser.add_argument("--candidates", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--cache-dir", default=str(default_cache_dir()))
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    torch.set_num_threads(1)
    data = load_movielens(args.data_dir, ProtocolConfig(name="temporal"), args.ratings_file, args.cache_dir)
    catalogue = data.items.to_tensors()
    generator = torch.Generator().manual_seed(0)
    candidates = torch.randint(0, len(data.item_raw_ids), (1, args.candidates), generator=generator)
    request = data.test.subset(np.array([len(data.test) // 2])).to_tensors()
    rows = []
    for label, name, overrides in CONFIGS:
        torch.manual_seed(0)
        model = create_model(name, data.schema, overrides).eval()
        user = model.user_inputs(request)
        table = model.encode_catalogue(catalogue)
        row = {"config": label, "model": name, "overrides": overrides, **time_request(model, user, table, candidates, args.repeats),
               "item_state_bytes": state_bytes(table, len(data.item_raw_ids)), "num_parameters": model.num_parameters()}
        if name == "fit":
            row["scorer_macs_per_candidate"] = scorer_macs(model)
            if model.config.use_mqm:
                row["meta_queries"] = model.config.num_meta
        rows.append(row)
        print(f"{label:18s} user {row['user_ms_p50']:.3f} ms  score({args.candidates}) {row['score_ms_p50']:.3f} ms  "
              f"item {row['item_state_bytes']} B", flush=True)
    base_bytes = rows[0]["item_state_bytes"]
    payload = {"dataset_label": data.meta.get("dataset_label"), "candidates": args.candidates, "repeats": args.repeats,
               "threads": 1, "note": "untrained weights; one request; eval mode; wall-clock on a shared CPU", "rows": rows}
    out = Path(args.out)
    write_json_atomic(out / "cost.json", payload)
    lines = [f"# FIT cost split — {data.meta.get('dataset_label')}, one request of {args.candidates} candidates, 1 thread",
             "", "| config | encode_user min / p50 / p99 (ms) | score min / p50 / p99 (ms) | scorer MACs / candidate | "
             "item state (B/item) | vs Two-Tower | user state (B/request) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['config']} | {r['user_ms_min']:.3f} / {r['user_ms_p50']:.3f} / {r['user_ms_p99']:.3f} | "
                     f"{r['score_ms_min']:.3f} / {r['score_ms_p50']:.3f} / "
                     f"{r['score_ms_p99']:.3f} | {r.get('scorer_macs_per_candidate', '–')} | {r['item_state_bytes']} | "
                     f"{r['item_state_bytes'] / base_bytes:.2f}x | {r['user_state_bytes']} |")
    lines += ["", "Timings include Python dispatch; `score` includes gathering the candidates' precomputed item states. "
              "Untrained weights (cost does not depend on their values). The CPU is shared: the minimum is the least "
              "disturbed figure, p99 mostly measures other processes."]
    tmp = out / ".cost.md.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(out / "cost.md")


if __name__ == "__main__":
    main()
