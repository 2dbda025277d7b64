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
    backend: str = "torch",
) -> dict:
    torch.set_num_threads(threads)
    scorer = Scorer.load(artifact, device=device, backend=backend, threads=threads)
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
        "backend": backend,
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
        f"# Serving cost: {result['model']} on {_backend(result)} ({result['dataset']}, {result['protocol']} protocol)",
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


def _backend(bench: dict) -> str:
    return bench.get("backend", "torch")


def write_summary(directory: Path, targets: dict[str, float] | None = None, published_ms: dict[str, dict[str, float]] | None = None) -> Path:
    """OUT/README.md and OUT/latency_vs_candidates.png from every bench and load-test result in the folder.

    One row per model and backend: CPU-time p50 / p99 of the whole request at each N, the candidate
    stage's CPU time per candidate at the largest N (linear growth keeps it flat), the ratio of the
    model's CPU-time p50 at N = 1,000 to the reference model's on the same backend, and, where
    given, `targets` {model: CPU p99 ms at N = 1,000} and `published_ms` {model: {source: ms}}
    (a paper's latencies, shown as ratios to its reference-model figure)."""
    benches = [json.loads(p.read_text()) for p in sorted(directory.glob("*.bench.json"))]
    sizes = sorted({row["candidates"] for b in benches for row in b["latency"]})
    cpu_total = {(b["model"], _backend(b)): {row["candidates"]: row["cpu_time"]["total"] for row in b["latency"]} for b in benches}
    reference_p50 = {backend: at[1000]["p50_ms"] for (model, backend), at in cpu_total.items() if model == REFERENCE_MODEL and 1000 in at}
    published_ref = (published_ms or {}).get(REFERENCE_MODEL, {})

    header = ("| model | backend | " + " | ".join(f"CPU p50 / p99 at N = {n:,} (ms)" for n in sizes)
              + " | target p99 at 1,000 | candidate stage per candidate at the largest N (µs) | vs Two-Tower (CPU p50, N = 1,000) "
              "| paper's ratio to Two-Tower | bytes per item | parameters | conditions |")
    rows = [header, "|---|---|" + "---:|" * len(sizes) + "---:|---:|---:|---|---:|---:|---|"]
    for b in sorted(benches, key=lambda b: (b["model"], _backend(b))):
        model, backend, at = b["model"], _backend(b), cpu_total[(b["model"], _backend(b))]
        cells = [f"{at[n]['p50_ms']:.3f} / {at[n]['p99_ms']:.3f}" if n in at else "–" for n in sizes]
        target = (targets or {}).get(model)
        target_cell = "–" if target is None or 1000 not in at else f"{target:g} ms ({'met' if at[1000]['p99_ms'] <= target else 'missed'})"
        largest = max(b["latency"], key=lambda row: row["candidates"])
        per_candidate = largest["cpu_time"]["candidate_stage"]["p50_ms"] * 1e3 / largest["candidates"]
        ratio = f"{at[1000]['p50_ms'] / reference_p50[backend]:.2f}×" if 1000 in at and backend in reference_p50 else "–"
        paper = ", ".join(f"{source} {ms / published_ref[source]:.2f}×" for source, ms in (published_ms or {}).get(model, {}).items()
                          if source in published_ref) or "–"
        c = b["conditions"]
        load = c.get("load_average_1min")
        conditions = f"{c['device']}, {c['torch_threads']} thr" + (f", load {load:.1f} on {c['cpu_count']} CPUs" if load is not None else "")
        rows.append(f"| {model} | {backend} | " + " | ".join(cells) + f" | {target_cell} | {per_candidate:.3f} | {ratio} | {paper} | "
                    f"{b['storage']['bytes_per_item']:,} | {b['num_parameters']:,} | {conditions} |")

    loads = []
    for path in sorted(directory.glob("*.load.json")):
        load = json.loads(path.read_text())
        loads.append(f"- {path.name}: {load['throughput_rps']:.0f} requests/s at concurrency {load['concurrency']}, "
                     f"{load['non_2xx']} non-2xx ({load['status_5xx']} 5xx), p99 {load['latency']['p99_ms']:.1f} ms.")
    datasets = sorted({str(b["dataset"]) for b in benches})
    text = "\n".join([
        "# Serving benchmarks",
        "",
        "Written by `prerank bench-serve ARTIFACT` (one file pair per model and backend; each model's .md has wall "
        "clock and every stage). One request (B = 1) at a time, user + candidate stage (candidate rows, gathering "
        "the item states, `score`, the top-k), no HTTP. CPU time of the process: the cost on a core of its own. "
        f"Dataset: {', '.join(datasets)}.",
        "",
        *rows,
        "",
        *(["HTTP (`prerank load-test`):", "", *loads, ""] if loads else []),
        "![CPU-time p50 per request against the candidate count](latency_vs_candidates.png)",
    ]) + "\n"
    out = directory / "README.md"
    write_text_atomic(out, text)
    if cpu_total:
        plot_latency(cpu_total, directory / "latency_vs_candidates.png")
    return out


def plot_latency(cpu_total: dict[tuple[str, str], dict[int, dict]], out: Path) -> None:
    """Log-log CPU-time p50 (whole request) against N, one line per model and backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for (model, backend), at in sorted(cpu_total.items()):
        sizes = sorted(at)
        ax.plot(sizes, [at[n]["p50_ms"] for n in sizes], marker="o", linestyle="-" if backend == "torch" else "--",
                label=f"{model} ({backend})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("candidates per request (N)")
    ax.set_ylabel("CPU time p50 per request (ms), one thread")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    tmp = out.with_name(out.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(out)


def write_bench(result: dict, out_dir: Path) -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    stem = result["model"] if _backend(result) == "torch" else f"{result['model']}.{_backend(result)}"
    json_path, md_path = out_dir / f"{stem}.bench.json", out_dir / f"{stem}.bench.md"
    write_text_atomic(json_path, json.dumps(result, indent=2))
    write_text_atomic(md_path, bench_markdown(result))
    write_summary(out_dir)
    return json_path, md_path
