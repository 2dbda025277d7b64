"""The two online stages as ONNX graphs, and serving them with ONNX Runtime.

    ARTIFACT/onnx/user.onnx         encode_user: one request's user features -> the user state
    ARTIFACT/onnx/candidates.onnx   score: the user state and N gathered item states -> logits [1, N]

Inputs and outputs are named after the contract: the user stage takes each user feature by its
schema name ([1] ids or values, [1, S] bags and sequences) and returns "user.KEY" for every key of
the user state; the candidate stage takes those and "item.KEY" [1, N, ...] for every key of the
item state (N dynamic) and returns "logits" [1, N]. The item-state table stays the artifact's
memory-mapped arrays: the server gathers the candidates' rows and feeds them to the second graph.

Export uses PyTorch's TorchScript-based exporter (opset 17) on the model in its serving form
(`prepare_for_serving`). Models that export: everything whose operators ONNX has; PyTorch's fused
transformer fast path (LT-TTD) is switched off while exporting so that its plain operators are
traced. Requires the optional extra `prerank[onnx]` (onnx, onnxruntime).
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from prerank.models.base import PreRankModel, State, padding_inputs

ONNX_DIR = Path("onnx")
OPSET = 17


class OnnxUnavailable(ValueError):
    """The ONNX packages are missing, or the model has an operator ONNX lacks."""


def _require(module: str):
    try:
        return __import__(module)
    except ImportError:
        raise OnnxUnavailable(f"ONNX support needs the package {module!r}: pip install 'prerank[onnx]'") from None


class _UserStage(nn.Module):
    def __init__(self, model: PreRankModel, names: list[str]) -> None:
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *features: Tensor) -> tuple[Tensor, ...]:
        return tuple(self.model.encode_user(dict(zip(self.names, features))).values())


class _CandidateStage(nn.Module):
    def __init__(self, model: PreRankModel, user_keys: list[str], item_keys: list[str]) -> None:
        super().__init__()
        self.model, self.user_keys, self.item_keys = model, user_keys, item_keys

    def forward(self, *states: Tensor) -> Tensor:
        user = dict(zip(self.user_keys, states[: len(self.user_keys)]))
        items = dict(zip(self.item_keys, states[len(self.user_keys):]))
        return self.model.score(user, items)


@contextlib.contextmanager
def _plain_transformers():
    """Trace nn.TransformerEncoder's plain operators, not its fused fast path (no ONNX equivalent)."""
    was = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(was)


@torch.no_grad()
def export_onnx(model: PreRankModel, item_table: dict[str, np.ndarray], folder: Path) -> dict:
    """Write folder/user.onnx and folder/candidates.onnx for `model` (eval, serving form) and return
    their input and output names. `item_table` {key: [M, ...]} supplies example item states."""
    _require("onnx")
    folder.mkdir(parents=True, exist_ok=True)
    request = padding_inputs(model.schema.user_features)  # one request, as the scorer encodes it
    names = list(request)
    user_state = model.encode_user(request)
    user_keys, item_keys = list(user_state), list(item_table)
    items = {k: torch.from_numpy(np.ascontiguousarray(v[:2]))[None] for k, v in item_table.items()}  # [1, 2, ...]
    user_outputs = [f"user.{k}" for k in user_keys]
    item_inputs = [f"item.{k}" for k in item_keys]
    try:
        with _plain_transformers(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's notes on Python values it records as constants
            # The wrappers in eval mode: the exporter restores the mode it found, recursively, so a
            # wrapper left in training mode would put the model back into training after export.
            torch.onnx.export(_UserStage(model, names).eval(), tuple(request.values()), str(folder / "user.onnx"),
                              input_names=names, output_names=user_outputs, opset_version=OPSET, dynamo=False)
            torch.onnx.export(_CandidateStage(model, user_keys, item_keys).eval(), (*user_state.values(), *items.values()),
                              str(folder / "candidates.onnx"), input_names=user_outputs + item_inputs,
                              output_names=["logits"], opset_version=OPSET, dynamo=False,
                              dynamic_axes={**{name: {1: "candidates"} for name in item_inputs}, "logits": {1: "candidates"}})
    except Exception as err:  # the exporter raises several types for an operator it lacks
        raise OnnxUnavailable(f"{model.name} cannot be exported to ONNX: {str(err).splitlines()[0]}") from None
    spec = {"opset": OPSET, "user": {"inputs": names, "outputs": user_outputs},
            "candidates": {"inputs": user_outputs + item_inputs, "outputs": ["logits"]}}
    _check_against_torch(model, folder, spec, request, item_table)
    return spec


def _check_against_torch(model: PreRankModel, folder: Path, spec: dict, request: dict[str, Tensor],
                         item_table: dict[str, np.ndarray]) -> None:
    """Run both graphs on a candidate count other than the traced one and compare with PyTorch: a
    tracer that froze a shape (LT-TTD's attention reshapes) fails here, not in production."""
    count = min(5, len(next(iter(item_table.values()))))
    items = {k: torch.from_numpy(np.ascontiguousarray(v[:count]))[None] for k, v in item_table.items()}
    expected = model.score(model.encode_user(request), items)
    try:
        stages = OnnxStages(folder, spec)
        found = stages.score(stages.encode_user(request), items)
    except Exception as err:  # ONNX Runtime raises its own error types
        raise OnnxUnavailable(f"{model.name}'s ONNX graphs fail on {count} candidates (the export froze a shape): "
                              f"{str(err).splitlines()[0][:300]}") from None
    if found.shape != expected.shape or not torch.allclose(found, expected, atol=1e-4, rtol=1e-4):
        raise OnnxUnavailable(f"{model.name}'s ONNX graphs disagree with PyTorch on {count} candidates")


class OnnxStages:
    """`encode_user` and `score` of an artifact run by ONNX Runtime (one intra-op thread by default)."""

    def __init__(self, folder: Path, spec: dict, threads: int = 1) -> None:
        ort = _require("onnxruntime")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.user = ort.InferenceSession(str(folder / "user.onnx"), options, providers=["CPUExecutionProvider"])
        self.candidates = ort.InferenceSession(str(folder / "candidates.onnx"), options, providers=["CPUExecutionProvider"])
        self.spec = spec

    def encode_user(self, request: dict[str, Tensor]) -> State:
        """Encoded request {feature: [1] or [1, S]} -> user state {key: [1, ...]} (torch tensors)."""
        outputs = self.user.run(None, {name: request[name].numpy() for name in self.spec["user"]["inputs"]})
        return {name.removeprefix("user."): torch.from_numpy(value) for name, value in zip(self.spec["user"]["outputs"], outputs)}

    def score(self, user_state: State, item_state: State) -> Tensor:
        """User state {key: [1, ...]} and item state {key: [1, N, ...]} -> logits [1, N]."""
        feeds = {f"user.{k}": v.numpy() for k, v in user_state.items()}
        feeds.update({f"item.{k}": np.ascontiguousarray(v.numpy()) for k, v in item_state.items()})
        return torch.from_numpy(self.candidates.run(None, feeds)[0])
