"""Training and comparing: `prerank train`, `evaluate`, `models`, `benchmark`."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Optional

import typer

from prerank.cli.common import data_parallel, fail, parse_overrides, user_errors
from prerank.data.datasets import DATASETS, default_cache_dir, load_dataset, load_recorded


# Each flag of `prerank train` and the run-config key it sets; a flag given overrides the --config file.
FLAG_KEYS = {
    "dataset": ("dataset", "name"), "data_dir": ("dataset", "data_dir"), "ratings_file": ("dataset", "ratings_file"),
    "protocol": ("protocol", "name"), "seq_len": ("protocol", "seq_len"), "negatives": ("protocol", "negatives"),
    "model": ("model", "name"), "embed_dim": ("model", "options", "embed_dim"),
    "epochs": ("training", "epochs"), "batch_size": ("training", "batch_size"), "lr": ("training", "lr"),
    "patience": ("training", "patience"), "seed": ("training", "seed"), "threads": ("training", "num_threads"),
    "eval_candidates": ("training", "eval_candidates"), "cascade": ("cascade",),
}


def given_on_command_line(ctx: typer.Context, name: str) -> bool:
    # By the source's name: typer may bring its own copy of click, whose ParameterSource is another enum.
    source = ctx.get_parameter_source(name)
    return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")


def flag_layer(given: dict, options: dict, hybrid: dict) -> dict:
    """The run-config keys the command line sets: the flags given, `--set` and `--hybrid` pairs."""
    layer: dict = {}
    for flag, value in given.items():
        *sections, key = FLAG_KEYS[flag]
        node = layer
        for section in sections:
            node = node.setdefault(section, {})
        node[key] = str(value) if isinstance(value, Path) else value
    if options:
        if options.get("embed_dim", given.get("embed_dim")) != given.get("embed_dim", options.get("embed_dim")):
            raise ValueError("--embed-dim and --set embed_dim=... disagree; give one")
        layer.setdefault("model", {}).setdefault("options", {}).update(options)
    if hybrid:
        layer["hybrid"] = hybrid
    return layer


@data_parallel  # under torchrun: joins the process group, trains with DDP, rank 0 writes
def train(
    ctx: typer.Context,
    config: Optional[Path] = typer.Option(None, "--config", help="a run YAML (README, 'Named experiments'); flags given here override it"),
    model: str = typer.Option("two_tower", help="registered model (`prerank models`) or variant model@tag (a file under configs/)"),
    dataset: str = typer.Option("ml-1m", help=f"one of {DATASETS}"),
    data_dir: Optional[Path] = typer.Option(None, help="dataset folder (ML-1M: users.dat, movies.dat, ratings)"),
    ratings_file: Optional[str] = typer.Option(None, help="ratings file, relative to --data-dir or absolute"),
    protocol: str = typer.Option("temporal", help="temporal (per-user split, leakage-free), global_time (one time cutoff for all users), leave_last_out, or inttower (paper protocol, leaks labels)"),
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
    out: Path = typer.Option(Path("runs/latest"), help="output folder: metrics.json, checkpoint.pt, run.yaml"),
    overwrite: bool = typer.Option(False, help="replace an existing --out run (only once the new one is complete)"),
    resume: Optional[Path] = typer.Option(None, help="continue the run that was interrupted writing this --out folder, "
                                          "from its last completed epoch (the run as it was recorded: no other run flags)"),
    progress: bool = typer.Option(True, help="show progress bars"),
    eval_candidates: str = typer.Option("dataset", help="top-K test ranking of implicit datasets: full (the catalogue), "
                                        "sampled (the dataset's 100 sampled items), sampled:N, none, or dataset (both)"),
    print_config: bool = typer.Option(False, "--print-config", help="print the run config (YAML) this would train and exit"),
) -> None:
    """Train one model and write OUT/metrics.json, OUT/checkpoint.pt and OUT/run.yaml (which reruns it).

    With --cascade, --batch-size counts requests (lists), not rows."""
    from prerank.atomic import staged_directory
    from prerank.run_config import merge, read_run_file, read_variant, validate
    from prerank.train.distributed import context as distributed_context
    from prerank.train.run import run_training
    from prerank.train.trainer import RESUME_FILE

    with user_errors():
        if resume is not None:
            out = resume
            config = resume.with_name(resume.name + ".partial") / "run.yaml"
            if not config.exists():
                raise ValueError(f"{config.parent}: no interrupted run to resume (its run.yaml is missing)")
        layers = [read_run_file(config)] if config is not None else []
        flags = dict(dataset=dataset, data_dir=data_dir, ratings_file=ratings_file, protocol=protocol, seq_len=seq_len,
                     negatives=negatives, model=model, embed_dim=embed_dim, epochs=epochs, batch_size=batch_size, lr=lr,
                     patience=patience, seed=seed, threads=threads, eval_candidates=eval_candidates, cascade=cascade)
        given = {flag: value for flag, value in flags.items() if given_on_command_line(ctx, flag)}
        if resume is not None and (given or set_ or hybrid):
            raise ValueError(f"--resume continues the run as it was recorded in {config}: drop "
                             f"{sorted(['--' + f.replace('_', '-') for f in given] + (['--set'] if set_ else []) + (['--hybrid'] if hybrid else []))}")
        if "@" in given.get("model", ""):
            layers.append(read_variant(given.pop("model")))
        layers.append(flag_layer(given, parse_overrides(set_), parse_overrides(hybrid, "--hybrid")))
        run = validate(merge(*layers), "command line")
        if print_config:
            typer.echo(run.to_yaml(), nl=False)
            return
        data = load_dataset(run.dataset.name, run.dataset.data_dir, run.protocol, run.dataset.ratings_file,
                            cache_dir or default_cache_dir())
        if data.meta.get("leaks_labels"):
            typer.secho(f"note: {data.meta['note']}", fg=typer.colors.YELLOW, err=True)
        lists = None
        if run.cascade is not None:
            from prerank.cascade import load_cascade

            lists = load_cascade(Path(run.cascade))
        # No hybrid options: the default hybrid loss, or a model's own list losses (lttd).
        source = run.data_source()
        if str(data.meta.get("dataset", "")).startswith(f"{run.dataset.name}:"):
            # `s3rec` resolved to the folder's one `s3rec:NAME`: reloading must not depend on the folder staying so.
            source["dataset"] = data.meta["dataset"]
        main = distributed_context().is_main
        # Written to OUT.partial and renamed when complete: a killed run never leaves OUT mixing two runs.
        with staged_directory(out, overwrite or resume is not None, enabled=main, resume=resume is not None) as stage:
            if main:  # first, so that an interrupted run can be resumed from its folder
                run.write(stage / "run.yaml", f"The run in this folder, written by `prerank train`; rerun it with\n"
                                              f"  prerank train --config {out / 'run.yaml'} --out DIR")
            train_config = dataclasses.replace(run.train_config(device, progress), resume=resume is not None)
            try:
                metrics = run_training(data, run.model, train_config, run.model_options, stage, source, lists, run.hybrid)
            except KeyboardInterrupt:
                typer.secho(f"interrupted: {out} is untouched; what the run wrote so far is in {stage}; continue it "
                            f"with\n  prerank train --resume {out}", fg=typer.colors.YELLOW, err=True)
                raise typer.Exit(130) from None
            if main:  # complete: the resume states (a few times the model's size) have served
                for state in stage.rglob(RESUME_FILE):
                    state.unlink()
    if not main:
        return
    test = metrics["test"]
    typer.echo(
        f"{metrics['model']} on {metrics['dataset_label']} [{metrics['protocol']}]: test AUC {test['auc']:.4f}  "
        f"GAUC {test['gauc']:.4f}  logloss {test['logloss']:.4f}  ({metrics['seconds_per_epoch']:.1f} s/epoch)"
    )
    for report in metrics.get("test_ranking", {}).values():
        typer.echo(f"  test top-K over {report['candidates']}: " + "  ".join(f"{k} {v:.4f}" for k, v in report.items() if "@" in k))
    if "ranking_eval_seconds" in metrics:
        typer.echo(f"  test ranking of {next(iter(metrics['test_ranking'].values()))['requests']:,} users: "
                   f"{metrics['ranking_eval_seconds']:.1f} s ({metrics['ranking_eval_cpu_seconds']:.1f} s CPU)")
    if "test_lists" in metrics:
        typer.echo("  test cascade lists: " + "  ".join(f"{k} {v:.4f}" for k, v in metrics["test_lists"].items() if "@" in k and "teacher" not in k))
    typer.echo(f"wrote {out / 'metrics.json'}, {out / 'checkpoint.pt'} and {out / 'run.yaml'}")


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
    typer.echo(json.dumps({"model": payload["model"], "split": split, "protocol": data.meta.get("protocol"),
                           "leaks_labels": data.meta.get("leaks_labels", False), **report}, indent=2))


def models() -> None:
    """List the registered models, those of installed plugin packages included, and the variants
    (model@tag files under configs/)."""
    from prerank.models.base import REGISTRY
    from prerank.run_config import CONFIGS, variant_file, variant_names

    for name, cls in sorted(REGISTRY.items()):
        kind = "ranker" if cls.is_ranker else ("pre-ranker" if cls.decoupled else "pre-ranker, not decoupled")
        if REGISTRY.origin(name):
            kind += f", plugin {REGISTRY.origin(name)}"
        doc = cls.__doc__ or sys.modules[cls.__module__].__doc__ or ""
        typer.echo(f"{name:14s} {kind}: {(doc.strip().splitlines() or [''])[0]}")
    typer.echo(f"\nvariants (--model NAME, files under {CONFIGS}):")
    for name in variant_names():
        typer.echo(f"{name:18s} {variant_file(name).relative_to(CONFIGS)}")
    problems = REGISTRY.problems()
    if problems:
        fail("\n".join(problems[name] for name in sorted(problems)))


def benchmark(
    dataset: str = typer.Option("ml-1m", help=f"one of {DATASETS}"),
    data_dir: Optional[Path] = typer.Option(None),
    ratings_file: Optional[str] = typer.Option(None),
    protocol: str = typer.Option("temporal", help="temporal, global_time, leave_last_out, or inttower (leaks labels; for published comparisons)"),
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
