"""Checkpoints: weights plus everything needed to rebuild the model (name, config, schema)."""

from __future__ import annotations

from pathlib import Path

import torch

from prerank.atomic import atomic_path
from prerank.data.schema import Schema
from prerank.models.base import PreRankModel, config_to_dict, create_model

# 2: embedding dims and dense scalers in the schema, shared layer names (issue 15); 1 does not load.
FORMAT_VERSION = 2


def atomic_torch_save(obj, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def save_checkpoint(path: Path, model: PreRankModel, extra: dict | None = None) -> None:
    atomic_torch_save(
        {
            "format_version": FORMAT_VERSION,
            "model": model.name,
            "model_config": config_to_dict(model.config),
            "schema": model.schema.to_dict(),
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "extra": extra or {},
        },
        path,
    )


def load_checkpoint(path: Path) -> tuple[PreRankModel, dict]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if payload.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: checkpoint format {payload.get('format_version')!r}, this prerank reads format "
                         f"{FORMAT_VERSION}; retrain the model with this version")
    model = create_model(payload["model"], Schema.from_dict(payload["schema"]), payload["model_config"])
    model.load_state_dict(payload["state_dict"])
    model.eval()
    return model, payload
