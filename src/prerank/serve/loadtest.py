"""`prerank load-test`: a bounded load test of the HTTP service on the loopback interface.

A fixed number of POST /v1/prerank requests, `concurrency` of them in flight at a time (httpx's
async client), then it stops: throughput, latency percentiles, the status-code counts and the
number of non-2xx answers. Without `--url` it starts `prerank serve ARTIFACT` on a free
127.0.0.1 port in a child process, waits for /healthz and stops the child at the end. Only
loopback addresses are accepted: this is not a tool for loading other people's servers.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import httpx
import numpy as np

import prerank
from prerank.data.schema import Schema
from prerank.serve.artifact import IDS_FILE, read_manifest
from prerank.atomic import write_text_atomic
from prerank.latency import percentiles
from prerank.serve.bench import RequestSampler, write_summary

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def check_loopback(url: str) -> str:
    host = urlparse(url).hostname
    if host not in LOOPBACK:
        raise ValueError(f"load tests run against 127.0.0.1 only, got host {host!r} in {url!r}")
    return url.rstrip("/")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process (Linux /proc); None elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


@contextmanager
def local_server(artifact: str | Path, threads: int = 1, startup_timeout: float = 120.0):
    """`prerank serve` in a child process on a free loopback port; yields (base URL, child process)."""
    port = free_port()
    command = [sys.executable, "-m", "prerank", "serve", str(artifact), "--host", "127.0.0.1", "--port", str(port),
               "--threads", str(threads), "--log-level", "warning"]
    # The child runs the same prerank as this process, wherever it was imported from.
    source_root = str(Path(prerank.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [source_root, os.environ.get("PYTHONPATH")]))}
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if child.poll() is not None:
                raise RuntimeError(f"the server exited with code {child.returncode}: {child.stderr.read()[-2000:]}")
            try:
                if httpx.get(f"{url}/healthz", timeout=1.0).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server did not answer /healthz within {startup_timeout:.0f} s")
            time.sleep(0.2)
        yield url, child
    finally:
        child.terminate()
        try:
            child.wait(timeout=15)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


async def _fire(url: str, bodies: list[bytes], total: int, concurrency: int, timeout: float, max_seconds: float) -> dict:
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    transport_errors = 0
    issued = 0
    deadline = time.perf_counter() + max_seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    headers = {"content-type": "application/json"}

    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:
        async def worker() -> None:
            nonlocal issued, transport_errors
            while issued < total and time.perf_counter() < deadline:
                body = bodies[issued % len(bodies)]
                issued += 1
                started = time.perf_counter()
                try:
                    response = await client.post("/v1/prerank", content=body, headers=headers)
                    await response.aread()
                    statuses[str(response.status_code)] = statuses.get(str(response.status_code), 0) + 1
                except httpx.TransportError:
                    transport_errors += 1
                latencies.append((time.perf_counter() - started) * 1e3)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    non_2xx = sum(n for code, n in statuses.items() if not code.startswith("2")) + transport_errors
    return {
        "requests": len(latencies),
        "requested": total,
        "stopped_early": len(latencies) < total,
        "wall_seconds": wall,
        "throughput_rps": len(latencies) / wall if wall > 0 else 0.0,
        "latency": percentiles(latencies) if latencies else {},
        "status_counts": statuses,
        "transport_errors": transport_errors,
        "non_2xx": non_2xx,
        "status_5xx": sum(n for code, n in statuses.items() if code.startswith("5")),
    }


def load_test(
    artifact: str | Path,
    url: str | None = None,
    requests: int = 2000,
    concurrency: int = 8,
    candidates: int = 1000,
    k: int = 100,
    threads: int = 1,
    warmup: int = 20,
    timeout: float = 30.0,
    max_seconds: float = 600.0,
    seed: int = 0,
    distinct_requests: int = 64,
) -> dict:
    if requests < 1 or concurrency < 1 or candidates < 1:
        raise ValueError("requests, concurrency and candidates must be >= 1")
    artifact = Path(artifact)
    manifest = read_manifest(artifact)
    schema = Schema.from_dict(json.loads((artifact / "model.json").read_text())["schema"])
    vocabs = json.loads((artifact / "vocabs.json").read_text())
    sampler = RequestSampler(schema, vocabs, np.load(artifact / IDS_FILE, allow_pickle=False), seed)
    bodies = [json.dumps(sampler.request(candidates, k)).encode() for _ in range(distinct_requests)]

    def run(base: str, server_cpu=lambda: None) -> dict:
        if warmup:
            asyncio.run(_fire(base, bodies, warmup, min(concurrency, warmup), timeout, max_seconds))
        server_before, client_before = server_cpu(), time.process_time()
        report = asyncio.run(_fire(base, bodies, requests, concurrency, timeout, max_seconds))
        server_after, done = server_cpu(), max(report["requests"], 1)
        report["client_cpu_ms_per_request"] = (time.process_time() - client_before) * 1e3 / done
        if server_before is not None and server_after is not None:
            report["server_cpu_ms_per_request"] = (server_after - server_before) * 1e3 / done
        return report

    if url is not None:
        report = run(check_loopback(url))
        server = {"url": url, "started_here": False}
    else:
        with local_server(artifact, threads) as (base, child):
            report = run(base, lambda: process_cpu_seconds(child.pid))
        server = {"url": "127.0.0.1 (child process)", "started_here": True, "torch_threads": threads}
    return {
        "model": manifest["model"],
        "version": manifest["version"],
        "dataset": manifest.get("dataset"),
        "concurrency": concurrency,
        "candidates_per_request": candidates,
        "k": k,
        "warmup_requests": warmup,
        "server": server,
        **report,
    }


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def load_markdown(result: dict) -> str:
    lat = result["latency"]
    return "\n".join([
        f"# HTTP load test: {result['model']} ({result['dataset']})",
        "",
        f"{result['requests']:,} POST /v1/prerank requests ({result['candidates_per_request']:,} candidates, top {result['k']}) "
        f"at concurrency {result['concurrency']} against {result['server']['url']}"
        f"{', server on ' + str(result['server'].get('torch_threads')) + ' torch thread(s)' if result['server'].get('torch_threads') else ''}; "
        f"client and server on the same machine, after {result['warmup_requests']} warm-up requests.",
        "",
        "| throughput (req/s) | p50 (ms) | p90 (ms) | p99 (ms) | max (ms) | non-2xx | 5xx | status counts | server CPU / req (ms) | client CPU / req (ms) |",
        "|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|",
        f"| {result['throughput_rps']:.1f} | {lat.get('p50_ms', float('nan')):.2f} | {lat.get('p90_ms', float('nan')):.2f} | "
        f"{lat.get('p99_ms', float('nan')):.2f} | {lat.get('max_ms', float('nan')):.2f} | {result['non_2xx']} | {result['status_5xx']} | "
        f"{json.dumps(result['status_counts'])} | {_ms(result.get('server_cpu_ms_per_request'))} | "
        f"{_ms(result.get('client_cpu_ms_per_request'))} |",
        "",
        *(["Stopped early at the time limit."] if result["stopped_early"] else []),
    ]) + "\n"


def write_load(result: dict, out_dir: Path) -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    json_path, md_path = out_dir / f"{result['model']}.load.json", out_dir / f"{result['model']}.load.md"
    write_text_atomic(json_path, json.dumps(result, indent=2))
    write_text_atomic(md_path, load_markdown(result))
    write_summary(out_dir)
    return json_path, md_path
