"""Training and comparing: `prerank train`, `evaluate`, `models`, `benchmark`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from prerank.cli.common import data_parallel, fail, parse_overrides, user_errors
from prerank.data.datasets import DATASETS, default_cache_dir, load_dataset, load_recorded
from prerank.data.pipeline import ProtocolConfig


@data_parallel  # under torchrun: joins the process group, trains with DDP, rank 0 writes
def train(
    model: str = typer.Option("two_tower", help="registered model name (see `prerank models`)"),
    dataset: str = typer.Option("ml-1m", help=f"one of {DATASETS}"),
    data_dir: Optional[Path] = typer.Option(None, help="dataset folder (ML-1M: users.dat, movies.dat, ratings)"),
    ratings_file: Optional[str] = typer.Option(None, help="ratings file, relative to --data-dir or absolute"),
    protocol: str = typer.Option("temporal", help="temporal (leakage-free), leave_last_out, or inttower (paper protocol, leaks labels)"),
    seq_len: int = typer.Option(50, help="behaviour sequence length; 0 drops the feature"),
    embed_dim: Optional[int] = typer.Option(None, help="embedding dim of every id table: the model option embed_dim "
                                            "(same as --set embed_dim=N); default: the dataset's (32)"),
    negatives: Optional[int] = typer.Option(None, help="sampled negatives per positive (implicit data default 4)"),
    epochs: int = typer.Option(10),
    batch_size: int = typer.Option(2048),
    lr: float = typer.Option(1e-3),
    patience: int = typer.Option(3, help="early-stopping patience on validation AUC"),
    seed: int = typer.Option(2022),
    device: str = typer.Option("cpu", help="cpu or cuda"),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads"),
    set_: list[str] = typer.Option([], "--set", help="model config override key=value (repeatable)"),
    cache_dir: Optional[Path] = typer.Option(None, help="preprocessing cache (default ~/.cache/prerank)"),
    cascade: Optional[Path] = typer.Option(None, help="cascade parquet (`prerank cascade build`): train on its request lists with the hybrid loss"),
    hybrid: list[str] = typer.Option([], "--hybrid", help="hybrid-loss override key=value, e.g. distill_weight=0 (with --cascade)"),
    out: Path = typer.Option(Path("runs/latest"), help="output folder: metrics.json, checkpoint.pt, history.json"),
    progress: bool = typer.Option(True, help="show progress bars"),
) -> None:
    """Train one model and write OUT/metrics.json and OUT/checkpoint.pt.

    With --cascade, --batch-size counts requests (lists), not rows."""
    from prerank.train.run import run_training
    from prerank.train.trainer import TrainConfig

    with user_errors():
        protocol_config = ProtocolConfig(name=protocol, seq_len=seq_len, negatives=negatives)
        model_overrides = parse_overrides(set_)
        if embed_dim is not None:
            if model_overrides.get("embed_dim", embed_dim) != embed_dim:
                raise ValueError("--embed-dim and --set embed_dim=... disagree; give one")
            model_overrides["embed_dim"] = embed_dim
        train_config = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, patience=patience, seed=seed,
                                   device=device, num_threads=threads, progress=progress)
        source = {"dataset": dataset, "data_dir": str(data_dir) if data_dir else None, "ratings_file": ratings_file,
                  "protocol": protocol_config.__dict__}
        data = load_dataset(dataset, data_dir, protocol_config, ratings_file, cache_dir or default_cache_dir())
        if data.meta.get("leaks_labels"):
            typer.secho(f"note: {data.meta['note']}", fg=typer.colors.YELLOW, err=True)
        lists, loss = None, None
        if cascade is not None:
            from prerank.cascade import load_cascade
            from prerank.train.losses import HybridLossConfig

            loss_overrides = parse_overrides(hybrid, "--hybrid")
            unknown = sorted(set(loss_overrides) - set(HybridLossConfig.__dataclass_fields__))
            if unknown:
                raise ValueError(f"--hybrid: unknown key(s) {unknown}; known: {sorted(HybridLossConfig.__dataclass_fields__)}")
            # No --hybrid: the default hybrid loss, or a model's own list losses (lttd).
            lists, loss = load_cascade(cascade), (HybridLossConfig(**loss_overrides) if loss_overrides else None)
        elif hybrid:
            raise ValueError("--hybrid sets the hybrid loss of --cascade training; give --cascade too")
        metrics = run_training(data, model, train_config, model_overrides, out, source, lists, loss)
    from prerank.train.distributed import context as distributed_context

    if not distributed_context().is_main:
        return
    test = metrics["test"]
    typer.echo(
        f"{metrics['model']} on {metrics['dataset_label']} [{metrics['protocol']}]: test AUC {test['auc']:.4f}  "
        f"GAUC {test['gauc']:.4f}  logloss {test['logloss']:.4f}  ({metrics['seconds_per_epoch']:.1f} s/epoch)"
    )
    for report in metrics.get("test_ranking", {}).values():
        typer.echo(f"  test top-K over {report['candidates']}: " + "  ".join(f"{k} {v:.4f}" for k, v in report.items() if "@" in k))
    if "test_lists" in metrics:
        typer.echo("  test cascade lists: " + "  ".join(f"{k} {v:.4f}" for k, v in metrics["test_lists"].items() if "@" in k and "teacher" not in k))
    typer.echo(f"wrote {out / 'metrics.json'} and {out / 'checkpoint.pt'}")


def evaluate(
    checkpoint: Path = typer.Option(..., help="a checkpoint.pt written by `prerank train`"),
    data_dir: Optional[Path] = typer.Option(None, help="override the data folder recorded in the checkpoint"),
    split: str = typer.Option("test", help="train, valid or test"),
    cache_dir: Optional[Path] = typer.Option(None),
) -> None:
    """Re-score a saved model on the split it was trained with; prints the metrics as JSON."""
    from prerank.models.checkpoint import load_checkpoint
    from prerank.train.trainer import evaluate as evaluate_table

    with user_errors():
        model, payload = load_checkpoint(checkpoint)
        data = load_recorded(payload["extra"].get("data_source") or {}, data_dir, cache_dir)
        if split not in data.splits:
            fail(f"unknown split {split!r}; choose train, valid or test")
        report = evaluate_table(model, data.splits[split])
    typer.echo(json.dumps({"model": payload["model"], "split": split, "protocol": data.meta.get("protocol"), **report}, indent=2))


def models() -> None:
    """List the registered models, those of installed plugin packages included."""
    from prerank.models.base import REGISTRY

    for name, cls in sorted(REGISTRY.items()):
        kind = "ranker" if cls.is_ranker else ("pre-ranker" if cls.decoupled else "pre-ranker, not decoupled")
        if REGISTRY.origin(name):
            kind += f", plugin {REGISTRY.origin(name)}"
        doc = cls.__doc__ or sys.modules[cls.__module__].__doc__ or ""
        typer.echo(f"{name:14s} {kind}: {(doc.strip().splitlines() or [''])[0]}")
    problems = REGISTRY.problems()
    if problems:
        fail("\n".join(problems[name] for name in sorted(problems)))


def benchmark(
    dataset: str = typer.Option("ml-1m", help=f"one of {DATASETS}"),
    data_dir: Optional[Path] = typer.Option(None),
    ratings_file: Optional[str] = typer.Option(None),
    protocol: str = typer.Option("temporal", help="temporal or inttower (leaks labels; for published comparisons)"),
    models: str = typer.Option("all", help="comma-separated models or variants (e.g. two_tower@paper), or 'all'"),
    seeds: int = typer.Option(3),
    epochs: int = typer.Option(10),
    patience: int = typer.Option(2),
    batch_size: int = typer.Option(2048),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads for training"),
    candidates: int = typer.Option(1000, help="candidates per request for the serving latency"),
    cache_dir: Optional[Path] = typer.Option(None),
    quick: bool = typer.Option(False, help="generated data, 2 epochs, 1 seed: a smoke run for CI"),
    cascade: Optional[Path] = typer.Option(None, help="cascade file of the same data (`prerank cascade build`): adds Recall/NDCG@K on its test requests"),
    out: Path = typer.Option(Path("runs/benchmark")),
    progress: bool = typer.Option(True),
) -> None:
    """Train and compare models with one budget; write quality and cost tables, plots, CSV and JSON to OUT."""
    from prerank.benchmark import BenchmarkConfig, run_benchmark

    if quick:
        dataset, epochs, seeds = "synthetic", min(epochs, 2), 1 if seeds == 3 else seeds
    with user_errors():
        config = BenchmarkConfig(
            dataset=dataset, data_dir=str(data_dir) if data_dir else None, ratings_file=ratings_file, protocol=protocol,
            models=tuple(m.strip() for m in models.split(",") if m.strip()), seeds=seeds, epochs=epochs, patience=patience,
            batch_size=batch_size if not quick else 256, threads=threads, candidates=candidates,
            latency_repeats=30 if quick else 200, cache_dir=str(cache_dir or default_cache_dir()),
            cascade=str(cascade) if cascade else None,
        )
        run_benchmark(config, out, progress=progress)
    typer.echo(f"wrote {out / 'benchmark.md'} (+ quality.csv, cost.csv, results.json, PNG plots)")
