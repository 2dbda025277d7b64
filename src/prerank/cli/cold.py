"""`prerank cold-select`: COLD's feature-group selection (Wang et al. 2020, §3.2) from a checkpoint.

Ranks the feature groups of a trained COLD model by their mean SE weight over a sample of the
validation split and, with `--top-k` and `--out`, retrains the same configuration keeping only
the top k groups (`groups=[...]`), writing OUT/metrics.json and OUT/checkpoint.pt. The model
file (`prerank.models.cold`) only exposes the SE weights (`COLD.group_weights`); the ranking and
the retraining, which need the trainer, live here with their command.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from prerank.cli.common import fail, user_errors


def rank_feature_groups(model, table, sample_rows: int = 20000, batch_size: int = 4096, seed: int = 0) -> list[tuple[str, float]]:
    """Feature groups by mean SE weight over a random sample of `table`'s rows, highest first (§3.2)."""
    import numpy as np
    import torch

    from prerank.models.cold import COLD
    from prerank.train.trainer import iterate_batches, model_columns, to_device_tensors

    if not isinstance(model, COLD):
        raise ValueError(f"feature-group ranking needs a COLD model, got {model.name!r}")
    rows = np.arange(len(table))
    if len(rows) > sample_rows:
        rows = np.sort(np.random.default_rng(seed).choice(rows, size=sample_rows, replace=False))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    tensors = to_device_tensors(table.subset(rows), model_columns(model), device)
    total = torch.zeros(len(model.group_names), dtype=torch.float64)
    with torch.no_grad():
        for batch in iterate_batches(tensors, batch_size):
            user_state = model.encode_user(model.user_inputs(batch))
            item_state = model.encode_item_lists(model.item_inputs(batch))
            total += model.group_weights(user_state, item_state).reshape(-1, len(model.group_names)).double().sum(0).cpu()
    model.train(was_training)
    means = (total / max(len(rows), 1)).tolist()
    return sorted(zip(model.group_names, means), key=lambda kv: -kv[1])


def top_groups(ranking: list[tuple[str, float]], k: int) -> list[str]:
    if not 1 <= k <= len(ranking):
        raise ValueError(f"top-k must lie in 1..{len(ranking)} (the number of feature groups), got {k}")
    return [name for name, _ in ranking[:k]]


def cold_select(
    checkpoint: Path = typer.Option(..., help="checkpoint.pt of a COLD model written by `prerank train`"),
    top_k: Optional[int] = typer.Option(None, help="keep the k groups of highest mean SE weight"),
    out: Optional[Path] = typer.Option(None, help="retrain with the top-k groups and write the run here"),
    sample_rows: int = typer.Option(20000, help="validation rows the SE weights are averaged over"),
    data_dir: Optional[Path] = typer.Option(None, help="override the data folder recorded in the checkpoint"),
    cache_dir: Optional[Path] = typer.Option(None),
    epochs: Optional[int] = typer.Option(None, help="retraining epochs (default: the checkpoint's)"),
) -> None:
    """Print COLD's feature groups ranked by mean SE weight; retrain with the top k."""
    from prerank.data.datasets import load_recorded
    from prerank.models.base import config_to_dict
    from prerank.models.checkpoint import load_checkpoint
    from prerank.train.run import run_training
    from prerank.train.trainer import TrainConfig

    with user_errors():
        model, payload = load_checkpoint(checkpoint)
        if payload["model"] != "cold":
            fail(f"{checkpoint}: a {payload['model']!r} checkpoint; feature-group selection needs a COLD model")
        source = payload["extra"].get("data_source") or {}
        if not source:
            fail(f"{checkpoint}: no data source recorded; retrain with `prerank train`")
        data = load_recorded(source, data_dir, cache_dir)
        ranking = rank_feature_groups(model, data.valid, sample_rows=sample_rows)
        typer.echo(f"feature groups by mean SE weight over {min(sample_rows, len(data.valid))} validation rows:")
        for rank, (group, weight) in enumerate(ranking, start=1):
            typer.echo(f"{rank:3d}  {weight:.4f}  {group}")
        if top_k is None:
            return
        keep = top_groups(ranking, top_k)
        typer.echo(f"top {top_k}: {json.dumps(keep)}")
        if out is None:
            typer.echo("(pass --out to retrain with these groups)")
            return
        overrides = {**config_to_dict(model.config), "groups": keep}
        saved = payload["extra"].get("train_config") or {}
        train_config = TrainConfig(**{**saved, "progress": False, **({"epochs": epochs} if epochs else {})})
        metrics = run_training(data, "cold", train_config, overrides, out, source)
    test = metrics["test"]
    typer.echo(f"cold with {top_k} groups: test AUC {test['auc']:.4f}  GAUC {test['gauc']:.4f}  logloss {test['logloss']:.4f}")
    typer.echo(f"wrote {out / 'metrics.json'} and {out / 'checkpoint.pt'}")
