"""`prerank cold-select`: COLD's feature-group selection (Wang et al. 2020, §3.2) from a checkpoint.

Ranks the feature groups of a trained COLD model by their mean SE weight over a sample of the
validation split and, with `--top-k` and `--out`, retrains the same configuration keeping only
the top k groups (`groups=[...]`), writing OUT/metrics.json and OUT/checkpoint.pt.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from prerank.data.table import DataError


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
    from prerank.cli import _fail
    from prerank.data.datasets import default_cache_dir, load_dataset
    from prerank.data.pipeline import ProtocolConfig
    from prerank.models.base import config_to_dict
    from prerank.models.cold import rank_feature_groups, top_groups
    from prerank.train.checkpoint import load_checkpoint
    from prerank.train.run import run_training
    from prerank.train.trainer import TrainConfig

    try:
        model, payload = load_checkpoint(checkpoint)
        if payload["model"] != "cold":
            _fail(f"{checkpoint}: a {payload['model']!r} checkpoint; feature-group selection needs a COLD model")
        source = payload["extra"].get("data_source") or {}
        if not source:
            _fail(f"{checkpoint}: no data source recorded; retrain with `prerank train`")
        data = load_dataset(source["dataset"], data_dir or source["data_dir"], ProtocolConfig.from_recorded(source["protocol"]),
                            source.get("ratings_file"), cache_dir or default_cache_dir())
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
    except (DataError, ValueError, FileNotFoundError) as err:
        _fail(str(err))
    test = metrics["test"]
    typer.echo(f"cold with {top_k} groups: test AUC {test['auc']:.4f}  GAUC {test['gauc']:.4f}  logloss {test['logloss']:.4f}")
    typer.echo(f"wrote {out / 'metrics.json'} and {out / 'checkpoint.pt'}")
