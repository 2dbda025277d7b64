"""The serving artifact: everything the online scorer needs, in one directory written atomically.

    ARTIFACT/
      manifest.json        model name, version, item count, bytes per item, state layout, checksums
      model.json           model name, config and schema (rebuilds the module through the registry;
                           the schema holds each dense feature's scaler, applied to raw request values)
      weights.pt           the state dict (loaded with weights_only=True)
      vocabs.json          raw values of every vocabulary (value at position p has index p + 2)
      items/ids.npy        the raw id of each catalogue row
      items/state/*.npy    the item-state table: one array per state tensor, leading dim = item count

Each state tensor is a plain ``.npy`` file so that the table is memory-mapped on load
(`numpy.load(mmap_mode=...)`): a catalogue larger than RAM is paged in on demand and several
worker processes share one copy through the page cache. The table is `encode_catalogue` over the
whole catalogue, so it is whatever the model's contract calls an item state; nothing here knows a
model by name.

This module imports models and data only, never the trainer.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from prerank import __version__
from prerank.data.schema import Schema
from prerank.data.table import PreparedData
from prerank.models.base import PreRankModel, State, config_to_dict, create_model

ARTIFACT_FORMAT = 1
MANIFEST = "manifest.json"
STATE_DIR = Path("items") / "state"
IDS_FILE = Path("items") / "ids.npy"


class ArtifactError(ValueError):
    """A missing, corrupted or incompatible artifact: the message names the file and the problem."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def combined_checksum(files: dict[str, str]) -> str:
    """One checksum over every file's checksum, in path order: what the manifest calls the artifact's."""
    return hashlib.sha256("".join(f"{path}\0{files[path]}\n" for path in sorted(files)).encode()).hexdigest()


def state_layout(table: dict[str, np.ndarray]) -> dict[str, dict]:
    return {name: {"dtype": str(a.dtype), "shape_per_item": list(a.shape[1:]),
                   "bytes_per_item": int(a.dtype.itemsize * int(np.prod(a.shape[1:], dtype=np.int64)))}
            for name, a in table.items()}


def raw_ids_array(ids: np.ndarray) -> np.ndarray:
    """Raw ids as a numpy array that `np.save` writes without pickling (ints stay ints, the rest str)."""
    ids = np.asarray(ids)
    return ids if ids.dtype.kind in "iu" else ids.astype(str)


@torch.no_grad()
def compute_item_table(model: PreRankModel, items: dict[str, torch.Tensor], batch_size: int = 8192) -> dict[str, np.ndarray]:
    was_training = model.training
    model.eval()
    table = model.encode_catalogue(items, batch_size=batch_size)
    model.train(was_training)
    unsupported = sorted(name for name, tensor in table.items() if tensor.dtype == torch.bfloat16)
    if unsupported:
        raise ArtifactError(f"item state {unsupported} is bfloat16, which .npy cannot hold: return float32 or float16")
    return {name: tensor.detach().cpu().contiguous().numpy() for name, tensor in table.items()}


def export_artifact(
    model: PreRankModel,
    data: PreparedData,
    out: str | Path,
    version: str | None = None,
    source: dict | None = None,
    overwrite: bool = False,
    batch_size: int = 8192,
) -> dict:
    """Write `model` and the item-state table of `data`'s catalogue to the directory `out`.

    Everything goes to a temporary sibling directory first and is renamed into place, so a reader
    never sees a half-written artifact. `version` defaults to the first 12 hex digits of the
    weights' checksum (the same weights give the same version). Returns the manifest."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise ArtifactError(f"{out}: already exists (pass overwrite=True / --overwrite to replace it)")
    if not model.schema.same_data(data.schema):
        raise ArtifactError("the model's schema differs from the data's: export with the data it was trained on")
    missing = [f.name for f in model.schema.item_features if f.name not in data.items.columns]
    if missing:
        raise ArtifactError(f"the item catalogue lacks item features the model needs: {missing}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it owner-only; a serving user may differ from the exporting one
        catalogue = data.items.to_tensors()
        device = next(model.parameters()).device
        items = {f.name: catalogue[f.name].to(device) for f in model.schema.item_features}
        table = compute_item_table(model, items, batch_size)
        item_count = len(data.item_raw_ids)
        (tmp / STATE_DIR).mkdir(parents=True)
        for name, array in table.items():
            if array.shape[0] != item_count:
                raise ArtifactError(f"item state {name!r} has {array.shape[0]} rows for {item_count} catalogue items")
            np.save(tmp / STATE_DIR / f"{name}.npy", array, allow_pickle=False)
        np.save(tmp / IDS_FILE, raw_ids_array(data.item_raw_ids), allow_pickle=False)
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp / "weights.pt")
        model_spec = {"model": model.name, "model_config": config_to_dict(model.config), "schema": model.schema.to_dict()}
        (tmp / "model.json").write_text(json.dumps(model_spec, indent=2, default=str))
        (tmp / "vocabs.json").write_text(json.dumps(data.vocabs, default=str))

        files = {p.relative_to(tmp).as_posix(): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        layout = state_layout(table)
        manifest = {
            "format_version": ARTIFACT_FORMAT,
            "model": model.name,
            "version": version or files["weights.pt"][:12],
            "item_count": item_count,
            "bytes_per_item": sum(s["bytes_per_item"] for s in layout.values()),
            "item_state": layout,
            "num_parameters": model.num_parameters(),
            "decoupled": type(model).decoupled,
            "is_ranker": type(model).is_ranker,
            "listwise": type(model).listwise,
            "dataset": data.meta.get("dataset_label", data.meta.get("dataset")),
            "protocol": data.meta.get("protocol"),
            "source": source or {},
            "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "prerank_version": __version__,
            "torch_version": torch.__version__,
            "files": files,
            "checksum": combined_checksum(files),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        if out.exists():
            # Rename the old artifact aside first, so the new one appears with a single rename.
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
        return manifest
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@dataclass
class Artifact:
    """A loaded artifact: the model (eval mode), its item-state table and what maps raw values to indices."""

    path: Path
    manifest: dict
    model: PreRankModel
    item_table: State  # leading dim = item count, on the model's device
    item_ids: np.ndarray  # raw id of each catalogue row
    vocabs: dict[str, list] = field(default_factory=dict)

    @property
    def schema(self) -> Schema:
        return self.model.schema


def read_manifest(path: str | Path) -> dict:
    path = Path(path)
    if not (path / MANIFEST).exists():
        raise ArtifactError(f"{path}: not an artifact ({MANIFEST} not found); write one with `prerank export`")
    manifest = json.loads((path / MANIFEST).read_text())
    if manifest.get("format_version") != ARTIFACT_FORMAT:
        raise ArtifactError(f"{path / MANIFEST}: unsupported artifact format {manifest.get('format_version')!r}")
    return manifest


def verify_artifact(path: str | Path, manifest: dict | None = None) -> None:
    """Recompute every file's checksum against the manifest; raise ArtifactError naming the first mismatch."""
    path = Path(path)
    manifest = manifest or read_manifest(path)
    for name, expected in manifest["files"].items():
        if not (path / name).exists():
            raise ArtifactError(f"{path / name}: missing (listed in the manifest)")
        if sha256_file(path / name) != expected:
            raise ArtifactError(f"{path / name}: checksum mismatch (the file changed after export)")
    if combined_checksum(manifest["files"]) != manifest["checksum"]:
        raise ArtifactError(f"{path / MANIFEST}: the artifact checksum does not match its file list")


def load_artifact(path: str | Path, device: str = "cpu", verify: bool = True, mmap: bool = True) -> Artifact:
    """Rebuild the model through the registry and open the item-state table (memory-mapped on CPU).

    `verify` checks every file against the manifest's checksums first (it reads the whole table
    once; skip it for very large catalogues that are verified elsewhere)."""
    path = Path(path)
    manifest = read_manifest(path)
    if verify:
        verify_artifact(path, manifest)
    spec = json.loads((path / "model.json").read_text())
    try:
        schema = Schema.from_dict(spec["schema"])
    except ValueError as err:
        raise ArtifactError(f"{path / 'model.json'}: {err}") from None
    model = create_model(spec["model"], schema, spec["model_config"])
    model.load_state_dict(torch.load(path / "weights.pt", map_location="cpu", weights_only=True))
    model.to(device).prepare_for_serving()
    # Copy-on-write mapping: pages are read from the file on demand and never written back; the
    # arrays are writable in memory, which torch.from_numpy wants.
    mode = "c" if mmap else None
    table = {}
    for name in manifest["item_state"]:
        array = np.load(path / STATE_DIR / f"{name}.npy", mmap_mode=mode, allow_pickle=False)
        table[name] = torch.from_numpy(array).to(device)
    item_ids = np.load(path / IDS_FILE, allow_pickle=False)
    vocabs = json.loads((path / "vocabs.json").read_text())
    return Artifact(path, manifest, model, table, item_ids, vocabs)
