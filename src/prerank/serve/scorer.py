"""The online scorer: raw user features and raw candidate ids in, scores and top-k raw ids out.

One request runs `encode_user` once (B = 1) and one vectorised `score` over all N candidates,
whose item states are gathered from the artifact's item-state table. It uses only the model
contract, so every registered model is served by the same code.

Raw values become indices with the artifact's vocabularies exactly as the data pipeline encoded
them for training: an unknown or missing (null) categorical value is the out-of-vocabulary index
(the pipeline maps values unseen in train, and missing values, to OOV); bags keep their first
`max_len` values, right-padded; the behaviour sequence is oldest first, keeps its last `max_len`
items and is left-padded. Dense features arrive raw (a price, not a scaled price) and go through
the scaler stored with the feature in the schema, the one the pipeline applied: null is a missing
value (the scaler's `missing`); NaN, infinities, strings and booleans are rejected.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from prerank.data.schema import FIRST_KNOWN_INDEX, OOV_INDEX, PAD_INDEX, Feature, Kind
from prerank.models.base import State, gather_items
from prerank.serve.artifact import Artifact, ArtifactError, load_artifact

OnUnknown = Literal["error", "skip"]


# How far outside its training range [lo, hi] a raw dense value may lie, in units of hi - lo.
DENSE_RANGE_SLACK = 1000.0


class RequestError(ValueError):
    """A request the scorer cannot answer: the message names the feature or ids at fault."""


class UnknownItemsError(RequestError):
    def __init__(self, ids: list, shown: int = 20) -> None:
        self.ids = ids
        listed = ", ".join(map(repr, ids[:shown])) + (f" … ({len(ids) - shown} more)" if len(ids) > shown else "")
        super().__init__(f"{len(ids)} candidate id(s) not in the item catalogue: {listed}")


class ValueIndex:
    """Raw value -> index. A value also matches by its string form, so JSON clients may send the
    id 7 as 7 or "7" whatever type the vocabulary holds.

    `indices` maps a whole list at once: a list of plain integers against an integer vocabulary
    goes through a lookup array (ids no larger than a few times the vocabulary) or a binary search,
    without a Python step per value; anything else takes the per-value dictionary."""

    # A lookup array spans ids 0..max: built only while it costs at most this many entries per value.
    DENSE_SPAN_PER_VALUE = 8

    def __init__(self, values: Sequence, offset: int = 0) -> None:
        self.lookup: dict = {}
        for position, value in enumerate(values):
            self.lookup.setdefault(value, position + offset)
            self.lookup.setdefault(str(value), position + offset)
        self.dense: np.ndarray | None = None
        self.sorted_ids: np.ndarray | None = None
        ids = np.asarray(values) if len(values) else np.zeros(0, dtype=object)
        if ids.dtype.kind in "iu" and ids.ndim == 1 and len(ids):
            # The first position of each id, as the dictionary keeps it.
            unique, first = np.unique(ids, return_index=True)
            if unique[0] >= 0 and unique[-1] < self.DENSE_SPAN_PER_VALUE * len(ids) + 1024:
                self.dense = np.full(int(unique[-1]) + 1, -1, dtype=np.int64)
                self.dense[unique] = first + offset
            else:
                self.sorted_ids, self.sorted_index = unique, first + offset

    def get(self, value) -> int | None:
        try:
            found = self.lookup.get(value)
        except TypeError:  # unhashable (a list or an object): no id can match it
            return None
        return found if found is not None or isinstance(value, str) else self.lookup.get(str(value))

    def indices(self, values: Sequence | np.ndarray) -> np.ndarray:
        """Index per value [n] (int64), -1 where unknown."""
        if (self.dense is not None or self.sorted_ids is not None) and len(values):
            array = values if isinstance(values, np.ndarray) else np.array(values)
            if array.dtype.kind in "iu" and array.ndim == 1:
                if self.dense is not None:
                    inside = (array >= 0) & (array < len(self.dense))
                    return np.where(inside, self.dense[np.where(inside, array, 0)], -1)
                at = np.searchsorted(self.sorted_ids, array).clip(max=len(self.sorted_ids) - 1)
                return np.where(self.sorted_ids[at] == array, self.sorted_index[at], -1)
        return np.fromiter((-1 if (found := self.get(v)) is None else found for v in values), dtype=np.int64, count=len(values))


@dataclass
class ScoreResult:
    item_ids: list  # raw ids, in the order of `scores`
    scores: np.ndarray  # the model's logits (higher ranks first)
    unknown: list = field(default_factory=list)  # candidate ids skipped as not in the catalogue


Backend = Literal["torch", "onnxruntime"]


class Scorer:
    def __init__(self, artifact: Artifact, backend: Backend = "torch", threads: int = 1) -> None:
        self.artifact = artifact
        self.model = artifact.model
        self.backend = backend
        # What runs the two online stages: the model itself, or its ONNX graphs in ONNX Runtime.
        self.stages = self.model
        if backend == "onnxruntime":
            from prerank.serve.onnx import ONNX_DIR, OnnxStages

            if "onnx" not in artifact.manifest:
                raise ArtifactError(f"{artifact.path}: exported without ONNX graphs; re-export with `prerank export --onnx`")
            self.stages = OnnxStages(artifact.path / ONNX_DIR, artifact.manifest["onnx"], threads)
        elif backend != "torch":
            raise ValueError(f"backend must be 'torch' or 'onnxruntime', got {backend!r}")
        self.schema = artifact.schema
        self.device = next(iter(artifact.item_table.values())).device
        self.items = ValueIndex(artifact.item_ids.tolist())
        self.sequence = self.schema.sequence_feature
        self.user_features = self.schema.user_features
        self.user_feature_names = {f.name for f in self.user_features}
        self.item_feature_names = {f.name for f in self.schema.item_features}
        self.on_cpu = self.device.type == "cpu"
        missing = sorted({f.vocab for f in self.user_features if f.is_id} - set(artifact.vocabs))
        if missing:
            raise ArtifactError(f"{artifact.path / 'vocabs.json'}: lacks the vocabularies {missing}")
        self.vocab_index = {f.vocab: ValueIndex(artifact.vocabs[f.vocab], FIRST_KNOWN_INDEX) for f in self.user_features if f.is_id}

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu", verify: bool = True, backend: Backend = "torch",
             threads: int = 1) -> Scorer:
        """The artifact at `path`, served by `backend` ("onnxruntime" needs an artifact exported with
        `--onnx`, on the CPU; `threads` is its intra-op thread count)."""
        if backend == "onnxruntime" and device != "cpu":
            raise ValueError("the onnxruntime backend serves on the CPU")
        return cls(load_artifact(path, device=device, verify=verify), backend, threads)

    @property
    def manifest(self) -> dict:
        return self.artifact.manifest

    # -- request encoding ---------------------------------------------------------------------
    def _index(self, feature: Feature, value) -> int:
        if value is None:
            return OOV_INDEX
        if isinstance(value, (list, tuple, dict)):
            raise RequestError(f"user feature {feature.name!r} takes one value, got {type(value).__name__} {value!r}")
        found = self.vocab_index[feature.vocab].get(value)
        return OOV_INDEX if found is None else found

    @staticmethod
    def _dense(feature: Feature, value) -> float:
        """A raw dense value as a float; null is missing (NaN, which the scaler maps to its `missing`)."""
        if value is None:
            return float("nan")
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise RequestError(f"dense user feature {feature.name!r} takes a number (or null), got {value!r}")
        if not np.isfinite(value):
            raise RequestError(f"dense user feature {feature.name!r} is not finite: {value!r} (send null for a missing value)")
        scaler = feature.scaler
        if scaler is not None:
            span = max(scaler.hi - scaler.lo, 1.0)
            # Far outside the fitted range the scaled input saturates every unit: all scores equal.
            if not scaler.lo - DENSE_RANGE_SLACK * span <= value <= scaler.hi + DENSE_RANGE_SLACK * span:
                raise RequestError(f"dense user feature {feature.name!r} = {value!r} is more than {DENSE_RANGE_SLACK:g} "
                                   f"training ranges outside the values the model was trained on "
                                   f"[{scaler.lo:g}, {scaler.hi:g}]")
        return float(value)

    def _bag(self, feature: Feature, values, keep_last: bool) -> np.ndarray:
        if values is None:
            values = []
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
            raise RequestError(f"user feature {feature.name!r} takes a list of values, got {values!r}")
        values = values[-feature.max_len :] if keep_last else values[: feature.max_len]
        try:
            array = np.array(values) if len(values) else np.zeros(0, dtype=np.int64)
        except ValueError:  # ragged nesting
            array = None
        nested = array is None or array.ndim != 1
        if not nested and array.dtype == object:
            nested = any(isinstance(v, (list, tuple, dict)) for v in values)
        if nested:
            raise RequestError(f"user feature {feature.name!r} takes a list of single values, got a nested list {values!r}")
        codes = self.vocab_index[feature.vocab].indices(array if array.dtype.kind in "iu" else values)
        codes[codes < 0] = OOV_INDEX
        out = np.full(feature.max_len, PAD_INDEX, dtype=np.int64)
        if len(codes):
            if keep_last:  # sequences: oldest first, left-padded, most recent last
                out[feature.max_len - len(codes) :] = codes
            else:  # bags: right-padded, as the pipeline encodes them
                out[: len(codes)] = codes
        return out

    def encode_request(self, user_features: Mapping[str, Any], behaviour: Sequence | None = None) -> dict[str, Tensor]:
        """Raw user/context features (and the raw behaviour sequence) -> model inputs with B = 1."""
        if not isinstance(user_features, Mapping):
            raise RequestError(f"user_features must be an object of feature name -> value, got {type(user_features).__name__}")
        known = self.user_feature_names
        item_side = sorted(set(user_features) & self.item_feature_names)
        if item_side:
            raise RequestError(f"{item_side} are item-side features: they come from the item-state table, not the request")
        unexpected = sorted(set(user_features) - known)
        if unexpected:
            raise RequestError(f"unknown user feature(s) {unexpected}; this model takes {sorted(known)}")
        if self.sequence is not None and self.sequence.name in user_features and behaviour:
            raise RequestError(f"the behaviour sequence came twice: as `behaviour` and as feature {self.sequence.name!r}")
        if behaviour and self.sequence is None:
            raise RequestError("this model has no behaviour-sequence feature: send an empty behaviour")
        optional = {self.sequence.name} if self.sequence is not None else set()
        missing = sorted(known - set(user_features) - optional)
        if missing:
            raise RequestError(f"missing user feature(s) {missing} (null means unknown)")

        inputs: dict[str, Tensor] = {}
        for f in self.user_features:
            value = user_features.get(f.name)
            if f is self.sequence and f.name not in user_features:
                value = behaviour or []
            if f.kind is Kind.CATEGORICAL:
                array = np.array([self._index(f, value)], dtype=np.int64)
            elif f.kind is Kind.SEQUENCE:
                array = self._bag(f, value, keep_last=True)[None, :]
            elif f.kind is Kind.MULTI_CATEGORICAL:
                array = self._bag(f, value, keep_last=False)[None, :]
            else:
                array = f.scaler.apply([self._dense(f, value)])
            inputs[f.name] = torch.from_numpy(array) if self.on_cpu else torch.from_numpy(array).to(self.device)
        return inputs

    def candidate_rows(self, candidate_ids: Sequence, on_unknown: OnUnknown = "error") -> tuple[np.ndarray, list]:
        """Catalogue rows of the known candidates, and the unknown ids (raises on them unless skipping)."""
        if on_unknown not in ("error", "skip"):
            raise RequestError(f"on_unknown must be 'error' or 'skip', got {on_unknown!r}")
        if isinstance(candidate_ids, (str, bytes)) or not isinstance(candidate_ids, (Sequence, np.ndarray)):
            raise RequestError(f"candidate ids must be a list, got {type(candidate_ids).__name__}")
        rows = self.items.indices(candidate_ids)
        unknown_at = np.flatnonzero(rows < 0)
        if len(unknown_at) == 0:
            return rows, []
        unknown = [candidate_ids[i] for i in unknown_at]
        unknown = [u.item() if hasattr(u, "item") else u for u in unknown]
        if on_unknown == "error":
            raise UnknownItemsError(unknown)
        return rows[rows >= 0], unknown

    # -- the two online stages ----------------------------------------------------------------
    @torch.inference_mode()
    def user_state(self, user_features: Mapping[str, Any], behaviour: Sequence | None = None) -> State:
        """The per-request stage: encode the raw request and run `encode_user` once."""
        return self.stages.encode_user(self.encode_request(user_features, behaviour))

    @torch.inference_mode()
    def score_rows(self, user_state: State, rows: np.ndarray) -> Tensor:
        """The per-candidate stage: gather N item states and one vectorised `score` -> logits [N]."""
        index = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.int64)).to(self.device)
        return self.stages.score(user_state, gather_items(self.artifact.item_table, index[None, :]))[0]

    # -- the API ------------------------------------------------------------------------------
    def score(
        self,
        user_features: Mapping[str, Any],
        candidate_ids: Sequence,
        behaviour: Sequence | None = None,
        on_unknown: OnUnknown = "error",
    ) -> ScoreResult:
        """Logits for every known candidate, in request order."""
        rows, unknown = self.candidate_rows(candidate_ids, on_unknown)
        state = self.user_state(user_features, behaviour)
        if len(rows) == 0:
            return ScoreResult([], np.zeros(0, dtype=np.float32), unknown)
        logits = self.score_rows(state, rows)
        return ScoreResult(self.artifact.item_ids[rows].tolist(), logits.float().cpu().numpy(), unknown)

    def topk(
        self,
        user_features: Mapping[str, Any],
        candidate_ids: Sequence,
        k: int,
        behaviour: Sequence | None = None,
        on_unknown: OnUnknown = "error",
    ) -> ScoreResult:
        """The k best candidates, best first."""
        if k < 1:
            raise RequestError(f"k must be >= 1, got {k}")
        rows, unknown = self.candidate_rows(candidate_ids, on_unknown)
        state = self.user_state(user_features, behaviour)
        if len(rows) == 0:
            return ScoreResult([], np.zeros(0, dtype=np.float32), unknown)
        with torch.inference_mode():
            logits = self.score_rows(state, rows)
            best = torch.topk(logits, min(k, len(rows)))
        at = best.indices.cpu().numpy()
        return ScoreResult(self.artifact.item_ids[rows[at]].tolist(), best.values.float().cpu().numpy(), unknown)

    def info(self) -> dict:
        m = self.manifest
        return {
            "model": m["model"],
            "version": m["version"],
            "item_count": m["item_count"],
            "bytes_per_item": m["bytes_per_item"],
            "item_state": m["item_state"],
            "num_parameters": m["num_parameters"],
            "decoupled": m["decoupled"],
            "is_ranker": m["is_ranker"],
            "listwise": m["listwise"],
            "dataset": m.get("dataset"),
            "protocol": m.get("protocol"),
            "checksum": m["checksum"],
            "device": str(self.device),
            "user_features": [
                {"name": f.name, "kind": f.kind.value, "side": f.side.value, **({"max_len": f.max_len} if f.is_bag else {}),
                 **({"scaler": asdict(f.scaler)} if f.scaler is not None else {})}
                for f in self.user_features
            ],
            "behaviour_feature": self.sequence.name if self.sequence is not None else None,
        }
