"""`prerank bench-serve`: the serving cost of one artifact, for the comparison tables.

Latency of one request at N candidates (default 100, 1,000 and 10,000), split into the two online
stages the contract defines:

- user stage: encoding the raw request with the vocabularies and `encode_user` (once per request);
- candidate stage: raw candidate ids -> catalogue rows, gathering N item states from the table,
  one vectorised `score`, and the top-k selection.

Requests are generated from the artifact itself: user feature values drawn from the
vocabularies, a full-length behaviour sequence (the most expensive case) and N candidates drawn
from the catalogue (with replacement when N exceeds it). Also reported: item-state storage per
item, absolute and relative to a Two-Tower, and the parameter count. A benchmark, not a test:
run it on a quiet machine with the thread count you will serve with.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from prerank.atomic import write_text_atomic
from prerank.latency import time_request_stages
from prerank.data.schema import OOV_INDEX, Kind, Schema
from prerank.models.base import create_model
from prerank.serve.artifact import read_manifest, state_layout
from prerank.serve.scorer import Scorer

REFERENCE_MODEL = "two_tower"


class RequestSampler:
    """Random but well-formed requests for an artifact's schema, vocabularies and catalogue."""

    def __init__(self, schema: Schema, vocabs: dict[str, list], item_ids: np.ndarray, seed: int = 0) -> None:
        self.schema, self.vocabs, self.item_ids = schema, vocabs, item_ids
        self.rng = np.random.default_rng(seed)

    def _value(self, vocab: str):
        values = self.vocabs.get(vocab) or [None]
        return values[int(self.rng.integers(len(values)))]

    def request(self, n_candidates: int, k: int = 100) -> dict:
        user_features, behaviour = {}, []
        sequence = self.schema.sequence_feature
        for f in self.schema.user_features:
            if f is sequence:
                behaviour = self.item_ids[self.rng.integers(0, len(self.item_ids), f.max_len)].tolist()
            elif f.kind is Kind.CATEGORICAL:
                user_features[f.name] = self._value(f.vocab)
            elif f.is_bag:
                user_features[f.name] = [self._value(f.vocab) for _ in range(int(self.rng.integers(1, f.max_len + 1)))]
            else:
                # A raw value inside the range the scaler was fitted on.
                user_features[f.name] = f.scaler.lo + float(self.rng.random()) * (f.scaler.hi - f.scaler.lo)
        replace = n_candidates > len(self.item_ids)
        candidates = self.rng.choice(self.item_ids, size=n_candidates, replace=replace).tolist()
        return {"user_features": user_features, "behaviour": behaviour, "candidates": candidates, "k": k}


def reference_bytes_per_item(schema: Schema) -> int:
    """Item-state bytes of a default-configuration Two-Tower on the same schema (one dummy item)."""
    model = create_model(REFERENCE_MODEL, schema).eval()
    dummy = {}
    for f in schema.item_features:
        shape = (1, f.max_len) if f.is_bag else (1,)
        dummy[f.name] = torch.full(shape, OOV_INDEX, dtype=torch.long) if f.is_id else torch.zeros(shape)
    with torch.no_grad():
        state = model.encode_items(dummy)
    layout = state_layout({k: v.numpy() for k, v in state.items()})
    return sum(s["bytes_per_item"] for s in layout.values())


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def bench_serve(
    artifact: str | Path,
    sizes: tuple[int, ...] = (100, 1_000, 10_000),
    threads: int = 1,
    device: str = "cpu",
    repeats: int = 300,
    warmup: int = 30,
    k: int = 100,
    reference: str | Path | None = None,
    seed: int = 0,
    distinct_requests: int = 32,
) -> dict:
    torch.set_num_threads(threads)
    scorer = Scorer.load(artifact, device=device)
    manifest = scorer.manifest
    sampler = RequestSampler(scorer.schema, scorer.artifact.vocabs, scorer.artifact.item_ids, seed)
    cuda = scorer.device.type == "cuda"

    def now() -> float:
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    latency = []
    for n in sizes:
        pool = [sampler.request(n, k) for _ in range(distinct_requests)]

        def user_stage(i: int):
            r = pool[i % len(pool)]
            return scorer.user_state(r["user_features"], r["behaviour"])

        def candidate_stage(i: int, state) -> None:
            rows, _ = scorer.candidate_rows(pool[i % len(pool)]["candidates"])
            with torch.inference_mode():
                best = torch.topk(scorer.score_rows(state, rows), min(k, len(rows)))
            scorer.artifact.item_ids[rows[best.indices.cpu().numpy()]].tolist()

        timed = time_request_stages(user_stage, candidate_stage, repeats, warmup, now)
        latency.append({"candidates": n, "k": min(k, n), "sampled_with_replacement": n > manifest["item_count"],
                        **timed["wall"], "cpu_time": timed["cpu_time"]})

    if reference is not None:
        ref_bytes, ref_from = read_manifest(reference)["bytes_per_item"], str(reference)
    else:
        ref_bytes, ref_from = reference_bytes_per_item(scorer.schema), f"default-config {REFERENCE_MODEL} on the same schema"
    return {
        "model": manifest["model"],
        "version": manifest["version"],
        "dataset": manifest.get("dataset"),
        "protocol": manifest.get("protocol"),
        "decoupled": manifest["decoupled"],
        "is_ranker": manifest["is_ranker"],
        "num_parameters": manifest["num_parameters"],
        "item_count": manifest["item_count"],
        "storage": {
            "bytes_per_item": manifest["bytes_per_item"],
            "item_state": manifest["item_state"],
            "table_bytes": manifest["bytes_per_item"] * manifest["item_count"],
            "two_tower_bytes_per_item": ref_bytes,
            "relative_to_two_tower": manifest["bytes_per_item"] / ref_bytes if ref_bytes else None,
            "two_tower_reference": ref_from,
        },
        "latency": latency,
        "conditions": {
            "device": str(scorer.device),
            "torch_threads": torch.get_num_threads(),
            "cpu": cpu_name(),
            "cpu_count": os.cpu_count(),
            # A shared machine inflates the tail: the 1-minute load average when the run ended says how busy it was.
            "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            "gpu": torch.cuda.get_device_name(scorer.device) if cuda else None,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "repeats": repeats,
            "warmup": warmup,
            "distinct_requests": distinct_requests,
            "behaviour_length": scorer.sequence.max_len if scorer.sequence is not None else 0,
            "artifact": str(artifact),
        },
    }


LATENCY_HEADER = (
    "| N candidates | k | user stage p50 / p99 (ms) | candidate stage p50 / p99 (ms) | total p50 / p99 (ms) |",
    "|---:|---:|---:|---:|---:|",
)


def bench_markdown(result: dict) -> str:
    s, c = result["storage"], result["conditions"]
    lines = [
        f"# Serving cost: {result['model']} ({result['dataset']}, {result['protocol']} protocol)",
        "",
        f"Device {c['device']}{' (' + c['gpu'] + ')' if c['gpu'] else ''}, {c['torch_threads']} torch thread(s), "
        f"{c['cpu']}; torch {c['torch']}; {c['repeats']} timed requests per N after {c['warmup']} warm-up; "
        f"behaviour sequence of {c['behaviour_length']} items; one request (B = 1) at a time, no HTTP; "
        f"{c['cpu_count']} CPUs, 1-min load average {c.get('load_average_1min') or 0:.1f} at the end of the run.",
        "",
        "Wall clock (what a caller waits):",
        "",
        *LATENCY_HEADER,
    ]

    def table(get) -> list[str]:
        rows = []
        for row in result["latency"]:
            u, cand, t = get(row)["user_stage"], get(row)["candidate_stage"], get(row)["total"]
            note = " (sampled with replacement)" if row["sampled_with_replacement"] else ""
            rows.append(f"| {row['candidates']:,}{note} | {row['k']} | {u['p50_ms']:.3f} / {u['p99_ms']:.3f} | "
                        f"{cand['p50_ms']:.3f} / {cand['p99_ms']:.3f} | {t['p50_ms']:.3f} / {t['p99_ms']:.3f} |")
        return rows

    lines += table(lambda row: row)
    lines += ["", "CPU time of the process (the cost on a core of its own; excludes time spent descheduled on a busy machine):",
              "", *LATENCY_HEADER, *table(lambda row: row["cpu_time"])]
    rel = f"{s['relative_to_two_tower']:.2f}×" if s["relative_to_two_tower"] is not None else "–"
    layout = ", ".join(f"{name} {v['dtype']}{v['shape_per_item']}" for name, v in s["item_state"].items())
    lines += [
        "",
        f"- Item-state storage: **{s['bytes_per_item']:,} bytes per item** ({layout}); {rel} the "
        f"{s['two_tower_reference']} ({s['two_tower_bytes_per_item']:,} bytes); table of {result['item_count']:,} items "
        f"= {s['table_bytes'] / 2**20:.2f} MiB.",
        f"- Parameters: {result['num_parameters']:,}.",
        f"- Model version {result['version']}; decoupled: {result['decoupled']}; ranker: {result['is_ranker']}.",
    ]
    return "\n".join(lines) + "\n"


def write_summary(directory: Path) -> Path:
    """OUT/README.md: one row per model from every bench and load-test result in the folder."""
    rows = []
    for path in sorted(directory.glob("*.bench.json")):
        bench = json.loads(path.read_text())
        at = {row["candidates"]: row["total"] for row in bench["latency"]}
        load_path = path.with_name(path.name.replace(".bench.json", ".load.json"))
        load = json.loads(load_path.read_text()) if load_path.exists() else None
        cpu_at = {row["candidates"]: row["cpu_time"]["total"] for row in bench["latency"]}
        n1000, cpu1000 = at.get(1000), cpu_at.get(1000)
        rel = bench["storage"]["relative_to_two_tower"]
        load_avg = bench["conditions"].get("load_average_1min")
        rows.append(
            f"| {bench['model']} | {bench['dataset']} | {bench['conditions']['device']}, {bench['conditions']['torch_threads']} thr"
            + (f", load {load_avg:.1f} on {bench['conditions']['cpu_count']} CPUs" if load_avg is not None else "") + " | "
            + (f"{n1000['p50_ms']:.3f} / {n1000['p99_ms']:.3f}" if n1000 else "–") + " | "
            + (f"{cpu1000['p50_ms']:.3f} / {cpu1000['p99_ms']:.3f}" if cpu1000 else "–")
            + f" | {bench['storage']['bytes_per_item']:,} | {f'{rel:.2f}×' if rel is not None else '–'} | {bench['num_parameters']:,} | "
            + (f"{load['throughput_rps']:.0f} rps at concurrency {load['concurrency']}, {load['non_2xx']} non-2xx "
               f"({load['status_5xx']} 5xx), p99 {load['latency']['p99_ms']:.1f} ms" if load else "–")
            + " |"
        )
    text = "\n".join([
        "# Serving benchmarks",
        "",
        "Written by `prerank bench-serve ARTIFACT` and `prerank load-test ARTIFACT` (one file pair per model; "
        "see each model's .md for every N). Latency: one request, N = 1,000 candidates, user + candidate stage, no HTTP; "
        "wall clock includes time descheduled on a busy machine (see the load average), CPU time does not.",
        "",
        "| model | dataset | device | wall p50 / p99 at N = 1,000 (ms) | CPU-time p50 / p99 at N = 1,000 (ms) | bytes per item | vs Two-Tower | parameters | HTTP load test |",
        "|---|---|---|---:|---:|---:|---:|---:|---|",
        *rows,
    ]) + "\n"
    out = directory / "README.md"
    write_text_atomic(out, text)
    return out


def write_bench(result: dict, out_dir: Path) -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    json_path, md_path = out_dir / f"{result['model']}.bench.json", out_dir / f"{result['model']}.bench.md"
    write_text_atomic(json_path, json.dumps(result, indent=2))
    write_text_atomic(md_path, bench_markdown(result))
    write_summary(out_dir)
    return json_path, md_path
