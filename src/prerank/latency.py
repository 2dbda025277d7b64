"""The one latency harness: a request timed as its two online stages, wall clock and CPU time.

    user stage       everything done once per request (the request's own encoding and `encode_user`)
    candidate stage  everything done per candidate (candidate rows, gathering N item states, one
                     `score`, and whatever selection the caller includes, e.g. the top-k)
    total            the two together

Wall time is what a caller waits; CPU time (`time.process_time`, the whole process) is what the
request costs on a core of its own, free of the time a busy machine keeps it descheduled. The
first `warmup` requests are run and dropped. `prerank benchmark` and `prerank bench-serve` both
time through `time_request_stages`.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable

import numpy as np

STAGES = ("user_stage", "candidate_stage", "total")


def percentiles(samples_ms: list[float]) -> dict[str, float]:
    a = np.asarray(samples_ms, dtype=float)
    return {"p50_ms": float(np.percentile(a, 50)), "p90_ms": float(np.percentile(a, 90)),
            "p99_ms": float(np.percentile(a, 99)), "mean_ms": float(a.mean()), "max_ms": float(a.max())}


def time_request_stages(user_stage: Callable[[int], Any], candidate_stage: Callable[[int, Any], Any], repeats: int,
                        warmup: int, clock: Callable[[], float] = time.perf_counter) -> dict:
    """Time `repeats` requests after `warmup` untimed ones. `user_stage(i)` runs request i's user
    stage and returns what `candidate_stage(i, that)` needs. `clock` is the wall clock (a device
    synchronising one on a GPU). Returns {"wall": {stage: percentiles}, "cpu_time": {...}} with the
    stages of `STAGES`, and the 1-minute load average when the timing ended."""
    wall: dict[str, list[float]] = {s: [] for s in STAGES}
    cpu: dict[str, list[float]] = {s: [] for s in STAGES}
    for i in range(warmup + repeats):
        t0, c0 = clock(), time.process_time()
        state = user_stage(i)
        t1, c1 = clock(), time.process_time()
        candidate_stage(i, state)
        t2, c2 = clock(), time.process_time()
        if i >= warmup:
            for record, (a, b, c) in ((wall, (t0, t1, t2)), (cpu, (c0, c1, c2))):
                record["user_stage"].append((b - a) * 1e3)
                record["candidate_stage"].append((c - b) * 1e3)
                record["total"].append((c - a) * 1e3)
    return {"wall": {s: percentiles(v) for s, v in wall.items()},
            "cpu_time": {s: percentiles(v) for s, v in cpu.items()},
            "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
