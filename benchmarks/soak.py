"""A bounded soak of the HTTP service: mixed valid and invalid requests, no 5xx, bounded memory.

    PYTHONPATH=src python benchmarks/soak.py --out benchmarks/results/soak [--artifact DIR]

Starts `prerank serve` on a free loopback port (a Two-Tower trained for one epoch on the generated
dataset and exported, unless `--artifact` names one) and sends `--requests` POST /v1/prerank
bodies (default 10,000) at `--concurrency` 32, cycling through valid requests and every kind of
bad one a client can send (the cases of issue 18: malformed JSON, a lone surrogate, a candidate
sent twice, unknown candidates, a body over the size limit, too long a behaviour or string, wrong
types, a non-finite or absurd dense value where the schema has one, extra fields, k = 0). Samples
the server's resident memory every 0.1 s. Passes when no answer is a 5xx or a transport error,
every bad body gets the 4xx its kind expects, and the server's RSS at the end is within
`--rss-growth-mib` of its RSS after the warm-up. Writes OUT/soak.json, OUT/soak.md and
OUT/rss.png; exits 1 when it fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from prerank.atomic import atomic_path, write_json_atomic, write_text_atomic  # noqa: E402
from prerank.data.schema import Schema  # noqa: E402
from prerank.serve.artifact import IDS_FILE  # noqa: E402
from prerank.serve.bench import RequestSampler  # noqa: E402
from prerank.serve.loadtest import _fire, local_server  # noqa: E402


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def small_artifact(folder: Path) -> Path:
    import torch

    from prerank.data.synthetic import load_synthetic
    from prerank.serve import export_artifact
    from prerank.train.run import train_and_evaluate
    from prerank.train.trainer import TrainConfig

    torch.manual_seed(0)
    data = load_synthetic(embed_dim=16)
    _, model = train_and_evaluate(data, "two_tower", TrainConfig(epochs=1, batch_size=512, progress=False),
                                  {"hidden": [64, 32]})
    export_artifact(model, data, folder / "artifact")
    return folder / "artifact"


def bodies(artifact: Path, seed: int) -> list[tuple[str, bytes, set[int]]]:
    """(kind, body, the statuses it may get) for one cycle: valid requests between the bad ones."""
    schema = Schema.from_dict(json.loads((artifact / "model.json").read_text())["schema"])
    vocabs = json.loads((artifact / "vocabs.json").read_text())
    ids = np.load(artifact / IDS_FILE, allow_pickle=False)
    sampler = RequestSampler(schema, vocabs, ids, seed)
    good = sampler.request(min(200, len(ids)), 10)
    raw = lambda body: json.dumps(body).encode()  # noqa: E731
    bad = {
        "malformed JSON": (b'{"candidates": [1, 2', {422}),
        "lone surrogate": (raw(good)[:-1] + b', "on_unknown": "skip", "behaviour": ["\\ud800"]}', {422}),
        "candidate twice": (raw({**good, "candidates": good["candidates"][:5] + good["candidates"][:1]}), {422}),
        "unknown candidate": (raw({**good, "candidates": good["candidates"][:5] + ["no-such-item"]}), {422}),
        "body over the limit": (raw({**good, "behaviour": ["x" * 900] * 5_000}), {413}),
        "behaviour too long": (raw({**good, "behaviour": [good["candidates"][0]] * 10_001}), {422}),
        "string too long": (raw({**good, "behaviour": ["x" * 1_001]}), {422}),
        "wrong type": (raw({**good, "candidates": "1,2,3"}), {422}),
        "extra field": (raw({**good, "surprise": True}), {422}),
        "k = 0": (raw({**good, "k": 0}), {422}),
        "unknown feature": (raw({**good, "user_features": {**good["user_features"], "no_such_feature": 1}}), {422}),
    }
    dense = [f.name for f in schema.user_features if f.kind.value == "dense"]
    if dense:
        bad["absurd dense value"] = (raw({**good, "user_features": {**good["user_features"], dense[0]: 3e38}}), {422})
        bad["NaN dense value"] = (raw(good).replace(f'"{dense[0]}": '.encode(), f'"{dense[0]}": NaN, "x": '.encode()), {422})
    cycle = []
    for kind, (body, expected) in bad.items():
        cycle.append(("valid", raw(sampler.request(min(200, len(ids)), 10)), {200}))
        cycle.append((kind, body, expected))
    return cycle


async def fire_checked(url: str, cycle: list, total: int, concurrency: int) -> dict:
    """`total` requests cycling through `cycle`; per kind, the status counts and any unexpected one."""
    import httpx

    per_kind: dict[str, dict[str, int]] = {}
    unexpected: list[str] = []
    issued = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        async def worker() -> None:
            nonlocal issued
            while issued < total:
                kind, body, expected = cycle[issued % len(cycle)]
                issued += 1
                try:
                    response = await client.post("/v1/prerank", content=body, headers={"content-type": "application/json"})
                    status = str(response.status_code)
                except httpx.TransportError as err:
                    status = f"transport error ({type(err).__name__})"
                counts = per_kind.setdefault(kind, {})
                counts[status] = counts.get(status, 0) + 1
                if not status.isdigit() or int(status) not in expected:
                    unexpected.append(f"{kind}: {status}")

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    return {"requests": issued, "wall_seconds": wall, "per_kind": per_kind, "unexpected": unexpected[:50],
            "unexpected_count": len(unexpected)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifact", default=None)
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rss-growth-mib", type=float, default=64.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        artifact = Path(args.artifact) if args.artifact else small_artifact(Path(scratch))
        cycle = bodies(artifact, args.seed)
        with local_server(artifact) as (url, child):
            asyncio.run(_fire(url, [b for kind, b, _ in cycle if kind == "valid"], 200, 8, 60, 600))  # warm-up
            samples: list[tuple[float, float]] = []
            done = threading.Event()
            origin = time.perf_counter()

            def sample() -> None:
                while not done.is_set():
                    samples.append((time.perf_counter() - origin, rss_mib(child.pid)))
                    time.sleep(0.1)

            sampler = threading.Thread(target=sample, daemon=True)
            rss_start = rss_mib(child.pid)
            load_before = os.getloadavg()[0]
            sampler.start()
            report = asyncio.run(fire_checked(url, cycle, args.requests, args.concurrency))
            done.set()
            sampler.join()
            rss_end = rss_mib(child.pid)
    statuses: dict[str, int] = {}
    for counts in report["per_kind"].values():
        for status, n in counts.items():
            statuses[status] = statuses.get(status, 0) + n
    fivexx = sum(n for s, n in statuses.items() if s.startswith("5") or not s.isdigit())
    result = {**report, "concurrency": args.concurrency, "status_counts": statuses, "status_5xx_or_transport": fivexx,
              "rss_mib_after_warmup": rss_start, "rss_mib_max": max(r for _, r in samples), "rss_mib_end": rss_end,
              "rss_growth_limit_mib": args.rss_growth_mib, "load_1min_before": load_before,
              "load_1min_after": os.getloadavg()[0], "cpus": os.cpu_count(), "artifact": str(args.artifact or "generated")}
    result["passed"] = fivexx == 0 and report["unexpected_count"] == 0 and rss_end - rss_start <= args.rss_growth_mib
    out = Path(args.out)
    write_json_atomic(out / "soak.json", result)
    lines = [f"# HTTP soak: {result['requests']:,} mixed requests at concurrency {args.concurrency} (loopback)", "",
             f"{'PASSED' if result['passed'] else 'FAILED'}: {fivexx} answers 5xx or transport errors, "
             f"{report['unexpected_count']} with another status than their kind expects; server RSS "
             f"{rss_start:.0f} MiB after warm-up, {result['rss_mib_max']:.0f} MiB at most, {rss_end:.0f} MiB at the end "
             f"(limit +{args.rss_growth_mib:.0f}). {report['wall_seconds']:.1f} s wall; load {load_before:.2f} before, "
             f"{result['load_1min_after']:.2f} after, {os.cpu_count()} CPUs.", "",
             "| request kind | statuses |", "|---|---|"]
    lines += [f"| {kind} | {json.dumps(counts)} |" for kind, counts in report["per_kind"].items()]
    if report["unexpected"]:
        lines += ["", "Unexpected: " + "; ".join(report["unexpected"])]
    lines += ["", "Command: `python benchmarks/soak.py " + " ".join(sys.argv[1:]) + "`"]
    write_text_atomic(out / "soak.md", "\n".join(lines) + "\n")
    figure, axis = plt.subplots(figsize=(7, 3.5))
    axis.plot([t for t, _ in samples], [r for _, r in samples])
    axis.set_xlabel("seconds")
    axis.set_ylabel("server RSS (MiB)")
    axis.set_title(f"soak: {result['requests']:,} mixed requests at concurrency {args.concurrency}")
    figure.tight_layout()
    with atomic_path(out / "rss.png") as tmp:
        figure.savefig(tmp, format="png", dpi=120)
    plt.close(figure)
    print("\n".join(lines[:3]))
    sys.exit(0 if result["passed"] else 1)


if __name__ == "__main__":
    main()
