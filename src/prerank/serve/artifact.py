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

import copy
import datetime as _dt
import hashlib
import json
import os
import pickle
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from prerank import __version__
from prerank.data.schema import Schema
from prerank.data.table import PreparedData
from prerank.models.base import PreRankModel, State, config_to_dict, create_model, padding_inputs

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
    broken = sorted(name for name, tensor in table.items() if tensor.is_floating_point() and not torch.isfinite(tensor).all())
    if broken:
        raise ArtifactError(f"item state {broken} holds NaN or infinite values: the model is broken (retrain it)")
    return {name: tensor.detach().cpu().contiguous().numpy() for name, tensor in table.items()}


def export_artifact(
    model: PreRankModel,
    data: PreparedData,
    out: str | Path,
    version: str | None = None,
    source: dict | None = None,
    overwrite: bool = False,
    batch_size: int = 8192,
    onnx: bool = False,
) -> dict:
    """Write `model` and the item-state table of `data`'s catalogue to the directory `out`.

    Everything goes to a temporary sibling directory first and is renamed into place, so a reader
    never sees a half-written artifact. `version` defaults to the first 12 hex digits of the
    weights' checksum (the same weights give the same version). With `onnx`, the user and candidate
    stages are also written as ONNX graphs (`prerank.serve.onnx`), from a copy of the model in its
    serving form. Returns the manifest."""
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
        onnx_spec = None
        if onnx:
            from prerank.serve.onnx import ONNX_DIR, export_onnx

            serving_copy = copy.deepcopy(model).cpu()
            serving_copy.prepare_for_serving()
            onnx_spec = export_onnx(serving_copy, table, tmp / ONNX_DIR)
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
            **({"onnx": onnx_spec} if onnx_spec else {}),
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


MANIFEST_KEYS = {"format_version": int, "model": str, "version": str, "item_count": int, "item_state": dict,
                 "files": dict, "checksum": str}


class UnverifiedArtifactWarning(UserWarning):
    """An artifact loaded without checking its checksums: edited files serve silently."""


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise ArtifactError(f"{path}: missing")
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ArtifactError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise ArtifactError(f"{path}: expected a JSON object")
    return value


def read_manifest(path: str | Path) -> dict:
    """The manifest, checked: valid JSON, the known format, every key it must have with its type,
    and a checksum that matches its own file list."""
    path = Path(path)
    if not (path / MANIFEST).exists():
        raise ArtifactError(f"{path}: not an artifact ({MANIFEST} not found); write one with `prerank export`")
    manifest = _read_json(path / MANIFEST)
    if manifest.get("format_version") != ARTIFACT_FORMAT:
        raise ArtifactError(f"{path / MANIFEST}: unsupported artifact format {manifest.get('format_version')!r}")
    for key, kind in MANIFEST_KEYS.items():
        if not isinstance(manifest.get(key), kind) or isinstance(manifest.get(key), bool):
            raise ArtifactError(f"{path / MANIFEST}: {key!r} is missing or not a {kind.__name__}")
    layout_ok = all(isinstance(v, dict) and isinstance(v.get("dtype"), str) and isinstance(v.get("shape_per_item"), list)
                    for v in manifest["item_state"].values())
    if not manifest["item_state"] or not layout_ok:
        raise ArtifactError(f"{path / MANIFEST}: 'item_state' must map each state name to its dtype and shape_per_item")
    if combined_checksum(manifest["files"]) != manifest["checksum"]:
        raise ArtifactError(f"{path / MANIFEST}: the artifact checksum does not match its file list")
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


@torch.no_grad()
def _expected_item_state(model: PreRankModel) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """{state name: (shape per item, dtype)} of what `encode_items` makes of one padding item."""
    state = model.encode_items(padding_inputs(model.schema.item_features))
    return {name: (tuple(t.shape[1:]), torch.empty(0, dtype=t.dtype).numpy().dtype) for name, t in state.items()}


def load_artifact(path: str | Path, device: str = "cpu", verify: bool = True, mmap: bool = True) -> Artifact:
    """Rebuild the model through the registry and open the item-state table (memory-mapped on CPU).

    `verify` checks every file against the manifest's checksums first (it reads the whole table
    once; skip it for very large catalogues that are verified elsewhere)."""
    path = Path(path)
    manifest = read_manifest(path)
    if verify:
        verify_artifact(path, manifest)
    else:
        warnings.warn(f"{path}: loaded without checking checksums (--no-verify): an edited file would serve silently",
                      UnverifiedArtifactWarning, stacklevel=2)
    spec = _read_json(path / "model.json")
    try:
        schema = Schema.from_dict(spec["schema"])
        model = create_model(spec["model"], schema, spec["model_config"])
    except (KeyError, TypeError, ValueError) as err:
        problem = err if isinstance(err, ValueError) else f"malformed, cannot rebuild the model ({type(err).__name__}: {err})"
        raise ArtifactError(f"{path / 'model.json'}: {problem}") from None
    try:
        weights = torch.load(path / "weights.pt", map_location="cpu", weights_only=True)
        model.load_state_dict(weights)
    except (RuntimeError, OSError, EOFError, ValueError, KeyError, pickle.UnpicklingError) as err:
        raise ArtifactError(f"{path / 'weights.pt'}: cannot load the weights into {spec['model']} ({str(err).splitlines()[0]})") from None
    model.to(device).prepare_for_serving()
    # Copy-on-write mapping: pages are read from the file on demand and never written back; the
    # arrays are writable in memory, which torch.from_numpy wants.
    mode = "c" if mmap else None
    expected = _expected_item_state(model)
    if set(expected) != set(manifest["item_state"]):
        raise ArtifactError(f"{path / MANIFEST}: item state {sorted(manifest['item_state'])}, but {spec['model']} "
                            f"encodes {sorted(expected)}")
    table = {}
    for name in manifest["item_state"]:
        file = path / STATE_DIR / f"{name}.npy"
        try:
            array = np.load(file, mmap_mode=mode, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise ArtifactError(f"{file}: cannot read ({err})") from None
        shape, dtype = expected[name]
        if array.ndim != len(shape) + 1 or tuple(array.shape[1:]) != shape or array.dtype != dtype:
            raise ArtifactError(f"{file}: {array.dtype} rows of shape {list(array.shape[1:])}, but {spec['model']} "
                                f"encodes {dtype} rows of shape {list(shape)}")
        if array.shape[0] != manifest["item_count"]:
            raise ArtifactError(f"{file}: {array.shape[0]:,} rows for {manifest['item_count']:,} catalogue items")
        if verify and array.dtype.kind == "f" and not np.isfinite(array).all():
            row = int(np.flatnonzero(~np.isfinite(array.reshape(len(array), -1)).all(1))[0])
            raise ArtifactError(f"{file}: row {row} is not finite (NaN or infinite item state)")
        table[name] = torch.from_numpy(array).to(device)
    try:
        item_ids = np.load(path / IDS_FILE, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise ArtifactError(f"{path / IDS_FILE}: cannot read ({err})") from None
    if len(item_ids) != manifest["item_count"]:
        raise ArtifactError(f"{path / IDS_FILE}: {len(item_ids):,} ids for {manifest['item_count']:,} catalogue items")
    vocabs = _read_json(path / "vocabs.json")
    return Artifact(path, manifest, model, table, item_ids, vocabs)
