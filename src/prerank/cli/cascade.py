"""`prerank cascade ...`: build the simulated cascade from a trained ranking teacher."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from prerank.cli.common import fail, user_errors

app = typer.Typer(add_completion=False, no_args_is_help=True, help="The simulated cascade (full-stage samples).")


@app.command()
def build(
    teacher: Path = typer.Option(..., help="checkpoint.pt of a trained ranker (`prerank train --model din`)"),
    out: Path = typer.Option(..., help="output parquet file"),
    retriever: Optional[Path] = typer.Option(None, help="checkpoint.pt of a trained two-tower to retrieve with (default: item co-occurrence)"),
    data_dir: Optional[Path] = typer.Option(None, help="override the data folder recorded in the teacher checkpoint"),
    retrieval_size: int = typer.Option(500, help="N0: items retrieved per request"),
    random_items: int = typer.Option(50, help="random catalogue items added per request"),
    prerank_size: int = typer.Option(100, help="N1: teacher top-N1 pass pre-ranking"),
    exposure_size: int = typer.Option(10, help="N2: teacher top-N2 are exposed"),
    window: int = typer.Option(20, help="events per request"),
    train_requests_per_user: int = typer.Option(2),
    eval_requests_per_user: int = typer.Option(1),
    max_users: Optional[int] = typer.Option(None, help="build for a seeded sample of this many users (default: all)"),
    seed: int = typer.Option(2022),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads"),
    cache_dir: Optional[Path] = typer.Option(None),
) -> None:
    """Simulate retrieval, pre-ranking and exposure for every request on the teacher's data; write OUT."""
    import torch

    from prerank.cascade import CascadeConfig, build_cascade, save_cascade
    from prerank.data.datasets import load_recorded
    from prerank.models.checkpoint import load_checkpoint

    if threads:
        torch.set_num_threads(threads)
    with user_errors():
        config = CascadeConfig(retriever="model" if retriever else "itemcf", retrieval_size=retrieval_size,
                               random_items=random_items, prerank_size=prerank_size, exposure_size=exposure_size,
                               window=window, train_requests_per_user=train_requests_per_user,
                               eval_requests_per_user=eval_requests_per_user, max_users=max_users, seed=seed)
        teacher_model, payload = load_checkpoint(teacher)
        source = payload["extra"].get("data_source") or {}
        if not source:
            fail(f"{teacher}: no data source recorded; retrain with `prerank train`")
        data = load_recorded(source, data_dir, cache_dir)
        retriever_model = load_checkpoint(retriever)[0] if retriever else None
        cascade = build_cascade(data, teacher_model, config, retriever_model, progress=typer.echo)
        cascade.meta.update(teacher_checkpoint=str(teacher), retriever_checkpoint=str(retriever) if retriever else None,
                            data_source=source)
        save_cascade(cascade, out)
    typer.echo(json.dumps(cascade.summary(), indent=2))
    typer.echo(f"wrote {out} in {cascade.meta['seconds']} s")
