"""Export and serving: `prerank export`, `serve`, `bench-serve`, `load-test`.

Imports stay inside the commands: `serve` must not load the trainer, and `prerank --help`
should not pay for FastAPI.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from prerank.cli.common import fail, user_errors

RESULTS = Path("benchmarks/results/serving")


def export(
    checkpoint: Path = typer.Option(..., help="a checkpoint.pt written by `prerank train`"),
    out: Path = typer.Option(..., help="artifact directory to write"),
    version: Optional[str] = typer.Option(None, help="model version in the manifest (default: weights checksum prefix)"),
    data_dir: Optional[Path] = typer.Option(None, help="override the data folder recorded in the checkpoint"),
    cache_dir: Optional[Path] = typer.Option(None),
    device: str = typer.Option("cpu", help="device that computes the item-state table"),
    overwrite: bool = typer.Option(False, help="replace an existing artifact"),
    onnx: bool = typer.Option(False, help="also write the user and candidate stages as ONNX graphs (needs prerank[onnx])"),
) -> None:
    """Write a serving artifact: weights, config, schema, vocabularies and the item-state table."""
    from prerank.data.datasets import load_recorded
    from prerank.models.checkpoint import load_checkpoint
    from prerank.serve.artifact import export_artifact

    with user_errors():
        model, payload = load_checkpoint(checkpoint)
        source = payload["extra"].get("data_source") or {}
        if not source:
            fail(f"{checkpoint}: no data source recorded; retrain with `prerank train`")
        data = load_recorded(source, data_dir, cache_dir)
        manifest = export_artifact(model.to(device), data, out, version=version, overwrite=overwrite, onnx=onnx,
                                   source={**source, "checkpoint": str(checkpoint), "epoch": payload["extra"].get("epoch")})
    if not manifest["decoupled"]:
        typer.secho(f"note: {manifest['model']} does not decouple: its item state is raw item features and all work is "
                    "in score", fg=typer.colors.YELLOW, err=True)
    if manifest["is_ranker"]:
        typer.secho(f"note: {manifest['model']} is a ranking model, not a pre-ranker", fg=typer.colors.YELLOW, err=True)
    typer.echo(f"wrote {out}: {manifest['model']} version {manifest['version']}, {manifest['item_count']:,} items, "
               f"{manifest['bytes_per_item']:,} bytes per item, checksum {manifest['checksum'][:16]}")


def serve(
    artifact: Path = typer.Argument(..., help="an artifact directory written by `prerank export`"),
    host: str = typer.Option("127.0.0.1", help="interface to listen on"),
    port: int = typer.Option(8000),
    threads: int = typer.Option(1, help="torch threads per process (0: torch's default)"),
    device: str = typer.Option("cpu"),
    verify: bool = typer.Option(True, help="check file checksums against the manifest on start"),
    max_candidates: int = typer.Option(100_000, help="reject requests with more candidates"),
    backend: str = typer.Option("torch", help="torch, or onnxruntime (an artifact exported with --onnx)"),
    max_body_bytes: int = typer.Option(4 << 20, min=1, help="answer 413 to a request body over this size, before parsing it"),
    api_key_file: Optional[Path] = typer.Option(None, help="a file holding the key clients send as 'Authorization: Bearer <key>'"),
    no_auth: bool = typer.Option(False, "--no-auth", help="serve a non-loopback --host without an API key"),
    docs: bool = typer.Option(False, help="serve the interactive /docs page (its scripts load from a CDN)"),
    request_timeout: float = typer.Option(30.0, min=0, help="answer 503 to a large request still scoring after this "
                                          "many seconds (0: wait)"),
    log_level: str = typer.Option("info"),
    workers: int = typer.Option(1, help="server processes (they share the memory-mapped item-state table)"),
) -> None:
    """Serve an artifact over HTTP: POST /v1/prerank, GET /v1/model, GET /healthz, GET /metrics (Prometheus)."""
    from prerank.serve.app import serve as run_server

    with user_errors():
        run_server(str(artifact), host, port, threads or None, device, verify, max_candidates, log_level, workers,
                   max_body_bytes, str(api_key_file) if api_key_file else None, no_auth, docs,
                   request_timeout or None, backend)


def bench_serve(
    artifact: Path = typer.Argument(..., help="an artifact directory written by `prerank export`"),
    sizes: str = typer.Option("100,1000,10000", help="candidate counts N, comma-separated"),
    threads: int = typer.Option(1, help="torch threads"),
    device: str = typer.Option("cpu"),
    repeats: int = typer.Option(300, help="timed requests per N"),
    warmup: int = typer.Option(30, help="untimed requests per N first"),
    k: int = typer.Option(100, help="top-k returned"),
    reference: Optional[Path] = typer.Option(None, help="a Two-Tower artifact for relative storage (default: a "
                                             "default-config Two-Tower on the same schema)"),
    out: Path = typer.Option(RESULTS, help="folder for MODEL.bench.json/.md and the README.md summary"),
    seed: int = typer.Option(0),
    backend: str = typer.Option("torch", help="torch, or onnxruntime (an artifact exported with --onnx)"),
) -> None:
    """Latency of one request (user and candidate stage, p50/p99) at each N; storage per item; parameters."""
    from prerank.serve.bench import bench_markdown, bench_serve as run_bench, write_bench

    with user_errors():
        n_values = tuple(int(n) for n in sizes.split(","))
        result = run_bench(artifact, n_values, threads, device, repeats, warmup, k, reference, seed, backend=backend)
    json_path, md_path = write_bench(result, out)
    typer.echo(bench_markdown(result))
    typer.echo(f"wrote {json_path} and {md_path}")


def load_test(
    artifact: Path = typer.Argument(..., help="the artifact to serve (and to draw requests from)"),
    url: Optional[str] = typer.Option(None, help="a running service on 127.0.0.1 (default: start one here)"),
    requests: int = typer.Option(2000, help="requests to send, after the warm-up"),
    concurrency: int = typer.Option(8, help="requests in flight at once"),
    candidates: int = typer.Option(1000, help="candidates per request"),
    k: int = typer.Option(100),
    threads: int = typer.Option(1, help="torch threads of the server it starts"),
    warmup: int = typer.Option(20, help="untimed requests first"),
    max_seconds: float = typer.Option(600.0, help="stop issuing requests after this long"),
    out: Path = typer.Option(RESULTS, help="folder for MODEL.load.json/.md and the README.md summary"),
    seed: int = typer.Option(0),
) -> None:
    """Bounded load test of POST /v1/prerank on 127.0.0.1: throughput, latency percentiles, non-2xx count."""
    from prerank.serve.loadtest import load_markdown, load_test as run_load, write_load

    with user_errors(RuntimeError):
        result = run_load(artifact, url, requests, concurrency, candidates, k, threads, warmup, max_seconds=max_seconds, seed=seed)
    json_path, md_path = write_load(result, out)
    typer.echo(load_markdown(result))
    typer.echo(f"wrote {json_path} and {md_path}")
    if result["status_5xx"]:
        raise typer.Exit(1)
