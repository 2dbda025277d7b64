"""The one validated base of every configuration (models, training, data protocol, cascade, hybrid
loss, benchmark), and the value ranges they share.

A configuration is a dataclass checked by pydantic when it is built (and when a field is assigned):
an unknown key, a wrong type or a value out of range raises `ConfigError`, a `ValueError` whose
message names the configuration and every bad field, e.g.

    bad TrainConfig: epochs: Input should be greater than or equal to 1 (got 0)

Ranges are pydantic constraints on the field types (`PositiveFloat`, `DropoutRate`, ...); checks
that relate two fields stay in the class's `__post_init__` and name the fields in their message.
This module imports nothing from the package, so every layer (data, models, train) can use it.
"""

from __future__ import annotations

import functools
from typing import Annotated, Any

import pydantic
from pydantic import Field

PositiveInt = Annotated[int, Field(ge=1)]
NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
NonNegativeFloat = Annotated[float, Field(ge=0)]
# An open fraction, e.g. the share of rows a split holds.
Fraction = Annotated[float, Field(gt=0, lt=1)]
# A dropout probability: 1 would zero every activation.
DropoutRate = Annotated[float, Field(ge=0, lt=1)]
# Widths of an MLP's layers; may be empty where a model then uses a single linear layer.
LayerSizes = tuple[PositiveInt, ...]
# numpy's seeds are 32-bit unsigned.
Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]
NonEmptyStr = Annotated[str, Field(min_length=1)]


class ConfigError(ValueError):
    """A configuration that failed validation; `problems` lists "field: what is wrong" per field."""

    def __init__(self, config: str, problems: list[str]) -> None:
        self.config = config
        self.problems = problems
        super().__init__(f"bad {config}: {'; '.join(problems)}")


def describe_problems(err: pydantic.ValidationError, known: list[str]) -> list[str]:
    """One "field: message (got value)" line per pydantic error; `known` names the valid keys."""
    problems = []
    errors = err.errors(include_url=False)
    item_errors = {e["loc"][:-1] for e in errors if e["loc"] and isinstance(e["loc"][-1], int)}
    for e in errors:
        if e["type"] == "too_short" and e["loc"] in item_errors:
            continue  # pydantic counts only the valid items, so `[0]` is also "too short": say it once
        where = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in e["loc"]).lstrip(".")
        if e["type"] == "unexpected_keyword_argument":
            problems.append(f"{where}: unknown key; known keys: {', '.join(known)}")
        elif not e["loc"]:  # a check of `__post_init__` that relates several fields
            problems.append(e["msg"].removeprefix("Value error, "))
        else:
            problems.append(f"{where}: {e['msg']} (got {e['input']!r})")
    return problems


def config_dataclass(cls: type | None = None, *, frozen: bool = False) -> Any:
    """Make `cls` a validated configuration: a pydantic dataclass where unknown keys fail and
    validation errors are `ConfigError`s naming the class and the fields. A subclass of a
    configuration is decorated again, so it inherits the fields (flat keys) and their ranges."""

    def wrap(cls: type) -> type:
        validated = pydantic.dataclasses.dataclass(
            cls, frozen=frozen, config=pydantic.ConfigDict(extra="forbid", validate_assignment=True)
        )
        build, assign = validated.__init__, validated.__setattr__

        def fail(self: Any, err: pydantic.ValidationError) -> ConfigError:
            return ConfigError(type(self).__name__, describe_problems(err, list(validated.__dataclass_fields__)))

        @functools.wraps(build)
        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            try:
                build(self, *args, **kwargs)
            except pydantic.ValidationError as err:
                raise fail(self, err) from None

        def __setattr__(self: Any, name: str, value: Any) -> None:
            try:
                assign(self, name, value)
            except pydantic.ValidationError as err:
                raise fail(self, err) from None

        validated.__init__ = __init__
        validated.__setattr__ = __setattr__
        return validated

    return wrap if cls is None else wrap(cls)
