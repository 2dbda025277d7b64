"""Per-request cost of TARQ as L·K grows, on 1 CPU thread, one request of 1,000 candidates:
the user stage (personalised codebook: L·K target-attention queries over the behaviour sequence)
and the candidate stage (gather L codewords, sum, dot products), against the Two-Tower and
against exact target attention over the same 1,000 candidates (what the teacher would cost
online: one attention query per candidate).

    PYTHONPATH=src nice -n 5 python benchmarks/tarq_cost.py --data-dir ../shared/data/ml-1m \
        --ratings-file ratings-partial-users0001-2999/ratings.dat.gz --out benchmarks/results/tarq_cost

Untrained weights on the ML-1M (users 1–2999) schema (sequence length 50, embedding dim 32): cost
depends on the shapes only. Writes OUT/results.json and OUT/summary.md.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from prerank.benchmark import measure_request_latency
from prerank.data.movielens import load_movielens
from prerank.data.pipeline import ProtocolConfig
from prerank.models import create_model
from prerank.train.run import write_json_atomic

GRID = ((1, 16), (1, 64), (2, 64), (3, 64), (3, 128), (3, 256), (4, 256), (4, 512))


@torch.no_grad()
def exact_attention_ms(model, user: dict, candidates: int, repeats: int) -> dict:
    """Exact target attention of `candidates` item queries (precomputed offline) over one user's sequence."""
    queries = torch.randn(1, candidates, model.sequence.embed_dim)
    times = []
    with torch.inference_mode():
        for i in range(repeats + repeats // 10):
            started = time.perf_counter()
            behaviours, mask = model._behaviours(user)
            model.teacher_attention(queries, behaviours, mask)
            if i >= repeats // 10:
                times.append(time.perf_counter() - started)
    return {"p50_ms": float(np.percentile(times, 50) * 1000), "p99_ms": float(np.percentile(times, 99) * 1000)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--ratings-file", default=None)
    parser.add_argument("--candidates", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    data = load_movielens(args.data_dir, ProtocolConfig(name="temporal"), args.ratings_file)
    request = data.test.subset(np.arange(1)).to_tensors()
    catalogue = data.items.to_tensors()
    results = {"dataset": data.meta["dataset_label"], "candidates": args.candidates, "threads": 1, "repeats": args.repeats,
               "sequence_length": int(request[data.schema.sequence_feature.name].shape[1]),
               "embed_dim": data.schema.sequence_feature.embed_dim, "rows": []}
    torch.manual_seed(0)
    tt = create_model("two_tower", data.schema).eval()
    latency = measure_request_latency(tt, tt.encode_catalogue(catalogue), tt.user_inputs(request), args.candidates, args.repeats)
    results["rows"].append({"model": "two_tower", "levels": 0, "codebook_size": 0, "codewords": 0, **latency})
    print(results["rows"][-1], flush=True)
    for levels, size in GRID:
        torch.manual_seed(0)
        model = create_model("tarq", data.schema, {"levels": levels, "codebook_size": size, "codebook_init": "random"}).eval()
        table = model.encode_catalogue(catalogue)
        latency = measure_request_latency(model, table, model.user_inputs(request), args.candidates, args.repeats)
        row = {"model": "tarq", "levels": levels, "codebook_size": size, "codewords": levels * size, **latency,
               "user_state_floats": levels * size * model.sequence.embed_dim}
        if (levels, size) == (3, 64):
            # How both scale with the candidate count: TARQ's user stage does not grow with it.
            results["exact_attention"] = {}
            for n in (args.candidates, 10 * args.candidates):
                results["exact_attention"][n] = {
                    "exact_target_attention": exact_attention_ms(model, model.user_inputs(request), n, args.repeats),
                    "tarq_L3_K64": measure_request_latency(model, table, model.user_inputs(request), n, args.repeats)}
        results["rows"].append(row)
        print(row, flush=True)
        write_json_atomic(out / "results.json", results)

    lines = [f"# TARQ per-request cost — ML-1M (users 1–2999) schema", "",
             f"One request of {args.candidates:,} candidates, 1 CPU thread, untrained weights (cost depends on shapes only: "
             f"sequence length {results['sequence_length']}, dim {results['embed_dim']}), {args.repeats} repeats after warm-up. "
             "Measured on a shared 2-core machine with other users' jobs running (load average about 1): absolute times are "
             "indicative, ratios more reliable.", "",
             "| model | L | K | L·K | user stage p50 ms | candidate stage p50 ms | total p50 ms | total p99 ms | user-state floats |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        lk = "–" if r["model"] == "two_tower" else r["codewords"]
        lines.append(f"| {r['model']} | {r['levels'] or '–'} | {r['codebook_size'] or '–'} | {lk} | {r['user_p50_ms']:.3f} | "
                     f"{r['score_p50_ms']:.3f} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} | {r.get('user_state_floats', '–')} |")
    lines += ["", "Exact target attention (the teacher's attention module, one query per candidate, item queries precomputed "
              "offline; attention only, no towers) against TARQ (L = 3, K = 64, towers included) as the candidate count grows:", "",
              "| candidates | exact TA p50 ms | exact TA p99 ms | TARQ user stage p50 ms | TARQ candidate stage p50 ms | TARQ total p50 ms |",
              "|---|---|---|---|---|---|"]
    for n, cell in results["exact_attention"].items():
        e, t = cell["exact_target_attention"], cell["tarq_L3_K64"]
        lines.append(f"| {n:,} | {e['p50_ms']:.3f} | {e['p99_ms']:.3f} | {t['user_p50_ms']:.3f} | {t['score_p50_ms']:.3f} | {t['p50_ms']:.3f} |")
    lines.append("")
    (out / "summary.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
