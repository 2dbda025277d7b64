"""In-memory sample tables, the prepared-dataset bundle, and its atomic on-disk cache."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from prerank.data.schema import Schema

log = logging.getLogger(__name__)

# Part of every cache key: bump it when what a cache holds changes, so old caches are rebuilt
# rather than read. 2: dense features carry their scaler; embedding dims left the protocol.
# 3: sampled negatives are drawn by stable keys of the raw ids (route- and order-independent).
PREPARED_FORMAT = 3

# Columns every sample table carries beside the schema's features.
LABEL = "label"
TIMESTAMP = "timestamp"
GRADE = "grade"  # graded relevance (e.g. the star rating); -1 where unknown
ITEM_ROW = "item_row"  # the row's item in the catalogue (`PreparedData.items`); not a model feature


class DataError(ValueError):
    """Bad input data: the message names the file, the row and what is wrong."""


@dataclass
class SampleTable:
    """Column arrays of equal length keyed by feature name (plus label, timestamp, grade)."""

    columns: dict[str, np.ndarray]

    def __post_init__(self) -> None:
        lengths = {k: len(v) for k, v in self.columns.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"columns differ in length: {lengths}")

    def __len__(self) -> int:
        return len(next(iter(self.columns.values()))) if self.columns else 0

    def __getitem__(self, name: str) -> np.ndarray:
        return self.columns[name]

    def subset(self, rows: np.ndarray) -> SampleTable:
        return SampleTable({k: v[rows] for k, v in self.columns.items()})

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """Id columns become int64 (what nn.Embedding takes), everything else float32."""
        out = {}
        for k, v in self.columns.items():
            if np.issubdtype(v.dtype, np.integer):
                out[k] = torch.from_numpy(v.astype(np.int64, copy=False))
            else:
                out[k] = torch.from_numpy(v.astype(np.float32, copy=False))
        return out


@dataclass
class PreparedData:
    schema: Schema
    train: SampleTable
    valid: SampleTable
    test: SampleTable
    # The item catalogue: item-side feature columns, one row per catalogue item, and the raw ids.
    items: SampleTable
    item_raw_ids: np.ndarray
    # Raw values of each vocabulary; value at position p has index p + FIRST_KNOWN_INDEX.
    vocabs: dict[str, list] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    @property
    def splits(self) -> dict[str, SampleTable]:
        return {"train": self.train, "valid": self.valid, "test": self.test}

    def summary(self) -> dict:
        return {
            "dataset": self.meta.get("dataset_label", self.meta.get("dataset")),
            "protocol": self.meta.get("protocol"),
            **{f"{name}_rows": len(t) for name, t in self.splits.items()},
            **{f"{name}_positive_rate": round(float(t[LABEL].mean()), 4) for name, t in self.splits.items() if len(t)},
            "catalogue_items": len(self.item_raw_ids),
            "features": {side: [f.name for f in self.schema.side(side)] for side in ("user", "item", "context")},
        }


def cache_key(*parts) -> str:
    return hashlib.sha256(json.dumps((PREPARED_FORMAT, *parts), sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_fingerprint(path: Path) -> dict:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def save_prepared(data: PreparedData, directory: Path) -> None:
    """Write atomically: into a temporary sibling directory, then one rename."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(directory)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        arrays = {f"{split}/{k}": v for split, t in data.splits.items() for k, v in t.columns.items()}
        arrays.update({f"items/{k}": v for k, v in data.items.columns.items()})
        arrays["item_raw_ids"] = data.item_raw_ids
        np.savez(tmp / "arrays.npz", **arrays)
        with open(tmp / "meta.json", "w") as fh:
            json.dump({"schema": data.schema.to_dict(), "vocabs": data.vocabs, "meta": data.meta}, fh, default=str)
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# A temporary folder this old belongs to a writer that was killed (a live one finishes in minutes).
STALE_PARTIAL_SECONDS = 6 * 3600


def remove_stale_partials(directory: Path) -> None:
    """Delete the temporary siblings `.NAME.*` that killed writers of `directory` left behind."""
    now = time.time()
    for partial in directory.parent.glob(f".{directory.name}.*"):
        try:
            if partial.is_dir() and now - partial.stat().st_mtime > STALE_PARTIAL_SECONDS:
                shutil.rmtree(partial, ignore_errors=True)
                log.info("removed %s, left by an interrupted cache write", partial)
        except FileNotFoundError:  # another process removed it first
            pass


def load_prepared(directory: Path) -> PreparedData:
    directory = Path(directory)
    with open(directory / "meta.json") as fh:
        meta = json.load(fh)
    groups: dict[str, dict[str, np.ndarray]] = {"train": {}, "valid": {}, "test": {}, "items": {}}
    with np.load(directory / "arrays.npz", allow_pickle=False) as npz:
        for key in npz.files:
            if "/" in key:
                group, col = key.split("/", 1)
                groups[group][col] = npz[key]
        item_raw_ids = npz["item_raw_ids"]
    return PreparedData(
        schema=Schema.from_dict(meta["schema"]),
        train=SampleTable(groups["train"]),
        valid=SampleTable(groups["valid"]),
        test=SampleTable(groups["test"]),
        items=SampleTable(groups["items"]),
        item_raw_ids=item_raw_ids,
        vocabs=meta["vocabs"],
        meta=meta["meta"],
    )


def cached(cache_dir: Path | None, key: str, build) -> PreparedData:
    """Load `key` from the cache, or build it and store it there. No cache dir: just build."""
    if cache_dir is None:
        return build()
    directory = Path(cache_dir) / key
    if (directory / "meta.json").exists():
        log.info("reusing cached preprocessing at %s", directory)
        try:
            return load_prepared(directory)
        except (OSError, ValueError, KeyError, EOFError) as err:  # a damaged cache is rebuilt, not fatal
            log.warning("cached preprocessing at %s is unreadable (%s): rebuilding it", directory, err)
    log.info("preprocessing (cached at %s)", directory)
    data = build()
    save_prepared(data, directory)
    return data
