"""Serving cost of every registered model on one dataset's schema and catalogue: exports an
artifact per model and runs `prerank bench-serve` on it (latency p50/p99 of one request at each N,
user and candidate stage; storage per item; parameters), then one HTTP load test.

    python benchmarks/serving_all.py --data-dir ../shared/data/ml-1m \
        --ratings-file ratings-partial-users0001-2999/ratings.dat.gz --out benchmarks/results/serving

Models are exported with their initial (seeded) weights unless `--checkpoint MODEL=PATH` gives a
trained one: the serving cost of these models does not depend on the weights' values, only on
their shapes. Run it on a quiet machine; the summary records the load average.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import torch
import yaml

import prerank
from prerank.data.movielens import load_movielens
from prerank.data.pipeline import ProtocolConfig
from prerank.models import REGISTRY, create_model
from prerank.serve.artifact import export_artifact
from prerank.serve.bench import bench_serve, write_bench, write_summary
from prerank.serve.loadtest import load_test, write_load
from prerank.models.checkpoint import load_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--ratings-file", default=None)
    parser.add_argument("--models", default=",".join(sorted(REGISTRY)))
    parser.add_argument("--checkpoint", action="append", default=[], metavar="MODEL=PATH")
    parser.add_argument("--sizes", default="100,1000,10000")
    parser.add_argument("--repeats", type=int, default=300)
    parser.add_argument("--load-test", default="two_tower", help="model whose artifact gets the HTTP load test ('' for none)")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--artifacts", default=None, help="where to keep the artifacts (default: a temporary folder)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    checkpoints = dict(pair.split("=", 1) for pair in args.checkpoint)

    data = load_movielens(args.data_dir, ProtocolConfig(), args.ratings_file)
    artifacts = Path(args.artifacts or tempfile.mkdtemp(prefix="prerank-serving-"))
    sizes = tuple(int(n) for n in args.sizes.split(","))
    for name in args.models.split(","):
        if name in checkpoints:
            model, _ = load_checkpoint(Path(checkpoints[name]))
            weights = checkpoints[name]
        else:
            torch.manual_seed(0)
            model = create_model(name, data.schema)
            weights = "initial (seed 0)"
        path = artifacts / name
        export_artifact(model.eval(), data, path, overwrite=True, source={"weights": weights})
        result = bench_serve(path, sizes, threads=1, repeats=args.repeats)
        result["weights"] = weights
        write_bench(result, Path(args.out))
        at = next((r for r in result["latency"] if r["candidates"] == 1000), result["latency"][0])
        print(f"{name}: total p50 {at['total']['p50_ms']:.3f} / p99 {at['total']['p99_ms']:.3f} ms at N = {at['candidates']} "
              f"(CPU time p99 {at['cpu_time']['total']['p99_ms']:.3f}), {result['storage']['bytes_per_item']:.0f} B/item, "
              f"load {os.getloadavg()[0]:.1f}", flush=True)
    if args.load_test:
        result = load_test(artifacts / args.load_test, requests=args.requests, concurrency=args.concurrency)
        write_load(result, Path(args.out))
        print(f"load test {args.load_test}: {result}", flush=True)
    targets = yaml.safe_load((Path(__file__).parent / "serving_targets.yaml").read_text())["cpu_p99_ms"]
    published = yaml.safe_load((Path(prerank.__file__).parent / "configs" / "published" / "ml-1m.yaml").read_text())["latency_ms"]
    print(f"summary: {write_summary(Path(args.out), targets, published)}")


if __name__ == "__main__":
    main()
