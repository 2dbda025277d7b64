"""Every public method of every built-in model states its shapes (`[B, N]`, `[M, H, D]`).

What is walked: the module of every registered built-in model (`prerank.models.*`) and the shared
modules the models are built from (`base`, `layers`, `list_losses`, `scoring`). In each, every
public function and every public method of every public class *defined in that module* (own
definitions only: an inherited method is checked where it is defined; an override is checked
again, because its states are its own).

The rule:
- Exempt: names with a leading underscore (private helpers and classes), dunder methods
  (`__init__`, `__post_init__`: a config's fields are documented where they are declared) and
  properties.
- Every other function or method needs a docstring of its own (an override does not borrow its
  base method's: `inspect.getdoc` would, so `__doc__` is read).
- If it takes or returns tensors, the docstring names at least one shape in brackets, in the
  house notation (B requests, N candidates, M items, D/d widths, H heads, L/K codebook levels and
  size, F fields, S sequence length; `[]` for a scalar). "Takes or returns tensors" is read from
  the annotations: one that mentions `Tensor`, `State`, `Fields`, `ModelOutput` or `ndarray`, or
  a parameter without an annotation (it may be anything). Trivial helpers whose annotations name
  no tensor (`register`, `make_config`, `training_phases`, `num_parameters`, ...) need a
  docstring but no shape. A shape names a dim by a letter, so an interval ("[-1, 1]") or a typing
  subscript ("dict[str, Tensor]") does not count.
- `EXEMPT` names the few walked functions held to no rule, each with its reason.
"""

from __future__ import annotations

import importlib
import inspect
import re
from types import ModuleType

import prerank.models  # noqa: F401  (registers the built-in models)
from prerank.models import REGISTRY

SHARED = ("base", "layers", "list_losses", "scoring")
# A shape in brackets that names a dim by a letter ([B, N], [..., d], [M, L·K]), or `[]` (a scalar).
# The look-behind keeps typing subscripts (`dict[str, Tensor]`) from counting, the letter keeps
# intervals ("[-1, 1]") from counting.
_DIMS = r"[\w·×…., +*/()'-]"
SHAPE = re.compile(rf"(?<![\w\]])\[(?:\]|{_DIMS}*[A-Za-z]{_DIMS}*\])")
TENSOR_TYPES = re.compile(r"\b(Tensor|State|Fields|ModelOutput|ndarray)\b")
# Walked but not held to the rule, each with its reason.
EXEMPT = {
    # Unannotated parameter, but a config in and a dict out: no tensor to give a shape.
    "prerank.models.base.config_to_dict": "no tensors",
}


def walked_modules() -> list[ModuleType]:
    names = {f"prerank.models.{name}" for name in SHARED}
    names |= {cls.__module__ for cls in REGISTRY.values() if cls.__module__.startswith("prerank.models.")}
    return [importlib.import_module(name) for name in sorted(names)]


def handles_tensors(func) -> bool:
    try:
        signature = inspect.signature(func)
    except (TypeError, ValueError):
        return True
    annotations = [signature.return_annotation]
    for name, parameter in signature.parameters.items():
        if name in ("self", "cls"):
            continue
        if parameter.annotation is inspect.Parameter.empty:
            return True
        annotations.append(parameter.annotation)
    return any(TENSOR_TYPES.search(a if isinstance(a, str) else repr(a)) for a in annotations
               if a is not inspect.Signature.empty)


def public_callables(module: ModuleType):
    """(qualified name, function) of every checked function and method of `module`."""
    for name, obj in vars(module).items():
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isfunction(obj):
            yield f"{module.__name__}.{name}", obj
        elif inspect.isclass(obj):
            for attr, member in vars(obj).items():
                if attr.startswith("_") or isinstance(member, property):
                    continue
                if isinstance(member, (staticmethod, classmethod)):
                    member = member.__func__
                if inspect.isfunction(member):
                    yield f"{module.__name__}.{name}.{attr}", member


def test_the_walk_reaches_every_model_and_the_shared_layers():
    walked = {m.__name__ for m in walked_modules()}
    for cls in REGISTRY.values():
        if cls.__module__.startswith("prerank.models."):
            assert cls.__module__ in walked
    checked = {name for m in walked_modules() for name, _ in public_callables(m)}
    # A sample of what must be among the checked: the contract, hooks, helper modules' forwards.
    for expected in ("prerank.models.two_tower.TwoTower.score", "prerank.models.base.PreRankModel.batch_states",
                     "prerank.models.layers.TargetAttention.forward", "prerank.models.tarq.Tarq.approximate_attention",
                     "prerank.models.lttd.LTTD.coarse_score", "prerank.models.scoring.iter_request_scores"):
        assert expected in checked


def test_every_public_method_states_its_shapes():
    offenders = []
    for module in walked_modules():
        for name, func in public_callables(module):
            if name in EXEMPT:
                continue
            doc = func.__doc__
            if not doc or not doc.strip():
                offenders.append(f"{name}: no docstring")
            elif handles_tensors(func) and not SHAPE.search(doc):
                offenders.append(f"{name}: the docstring names no shape in brackets ([B, N], [M, D], ...)")
    assert not offenders, f"{len(offenders)} public functions and methods need documenting:\n" + "\n".join(offenders)


def test_the_shape_pattern():
    assert SHAPE.search("user state [B, D] -> logits [B, N]")
    assert SHAPE.search('{"vector": [B, N, D]}')
    assert SHAPE.search("the scale, a scalar []")
    assert SHAPE.search("queries [(B,) K, H, e]")
    assert SHAPE.search("rows [B·N, L]")
    assert SHAPE.search("x [..., in_dim]")
    assert not SHAPE.search("identity on [-1, 1], sign(x) outside")
    assert not SHAPE.search("items: dict[str, Tensor] -> list[TrainingPhase]")
    assert not SHAPE.search("an item state, keyed by name")
