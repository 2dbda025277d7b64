"""The registry of models by name: the built-in models, and models that other packages add.

A built-in model registers itself by existing (`prerank.models` imports every module of the
package, and each model class carries `@register`). A model from another package is a Python
entry point in the group `prerank.models`, named as the model:

    [project.entry-points."prerank.models"]
    my_model = "my_package.my_model:MyModel"

Entry points are read on first need, once: when a name is asked for that no built-in model has,
or when the registry is listed. A plugin that fails to import, is not a `PreRankModel`, breaks the
contract's shape (a `forward` of its own, a `Config` that is not a dataclass), or takes a name that
is already registered is not registered; its problem, naming the entry point and the distribution
it came from, is reported by `problems()` and `prerank models`, and raised when its name is asked
for. It never stops the built-in models (or the other plugins) from working.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from importlib.metadata import EntryPoint, entry_points

ENTRY_POINT_GROUP = "prerank.models"
NOT_FOUND_HINT = (f"A model from another package is found once that package is installed (it declares a "
                  f"{ENTRY_POINT_GROUP!r} entry point)")


def distribution_of(entry_point: EntryPoint) -> str:
    dist = entry_point.dist
    return f"{dist.name} {dist.version}" if dist is not None else "unknown"


def describe_entry_point(entry_point: EntryPoint) -> str:
    return (f"entry point '{entry_point.name} = {entry_point.value}' (group {ENTRY_POINT_GROUP!r}) of distribution "
            f"{distribution_of(entry_point)}")


class ModelRegistry(Mapping):
    """Model classes by name. Listing it (iterating, `len`) or asking for a name that no built-in
    model has loads the plugins first, so every listing includes them."""

    def __init__(self, base: type) -> None:
        self._base = base
        self._models: dict[str, type] = {}
        self._origins: dict[str, str] = {}  # plugin model name -> "distribution version"
        self._problems: dict[str, str] = {}  # plugin name -> why it is not registered
        self._plugins_read = False

    # -- registration -------------------------------------------------------------------------
    def add(self, cls: type) -> type:
        if not cls.name:
            raise ValueError(f"{cls.__name__} has no name")
        self._check_forward(cls)
        taken = self._models.get(cls.name)
        if taken is not None and taken is not cls:
            raise ValueError(f"model name {cls.name!r} is already registered by {taken.__module__}.{taken.__qualname__}")
        self._models[cls.name] = cls
        return cls

    def load_plugins(self) -> None:
        """Register the models of the `prerank.models` entry points (once; later calls do nothing)."""
        if self._plugins_read:
            return
        self._plugins_read = True
        import prerank.models  # noqa: F401  (the built-in models first: a plugin may not take their names)

        by_name: dict[str, list[EntryPoint]] = {}
        for entry_point in entry_points(group=ENTRY_POINT_GROUP):
            by_name.setdefault(entry_point.name, []).append(entry_point)
        for name, found in sorted(by_name.items()):
            if len(found) > 1:
                self._problems[name] = (f"model plugin {name!r} is declared more than once: "
                                        + "; ".join(describe_entry_point(e) for e in found)
                                        + ". Uninstall all but one of them")
            elif name in self._models:
                taken = self._models[name]
                self._problems[name] = (f"model plugin {name!r} ({describe_entry_point(found[0])}) takes the name of the "
                                        f"built-in model {taken.__module__}.{taken.__qualname__}; it is not registered. "
                                        "Rename its entry point and its class's `name`")
            else:
                self._load_one(found[0])

    def _load_one(self, entry_point: EntryPoint) -> None:
        before = dict(self._models)
        try:
            cls = entry_point.load()
            self._check_plugin(entry_point.name, cls)
        except Exception as err:  # noqa: BLE001  (any failure of third-party code becomes one clear message)
            self._models = before  # a plugin module that called `register` itself before failing
            self._problems[entry_point.name] = (f"model plugin {entry_point.name!r} ({describe_entry_point(entry_point)}) "
                                                f"failed to load: {type(err).__name__}: {err}")
            return
        self._models[entry_point.name] = cls
        self._origins[entry_point.name] = distribution_of(entry_point)

    def _check_plugin(self, name: str, cls) -> None:
        base = self._base
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise TypeError(f"it names {cls!r}, not a subclass of {base.__module__}.{base.__qualname__}")
        if cls.name != name:
            raise ValueError(f"its class says name = {cls.name!r}; the entry point's name must be the model's `name` "
                             "(checkpoints and artifacts record the model by that name)")
        self._check_forward(cls)
        if not dataclasses.is_dataclass(cls.Config):
            raise TypeError(f"{cls.__qualname__}.Config is not a dataclass (decorate it with "
                            "prerank.models.base.config_dataclass)")

    def _check_forward(self, cls: type) -> None:
        if cls.forward is not self._base.forward:
            raise TypeError(f"{cls.__qualname__} defines `forward`; a model implements encode_items, encode_user and "
                            "score (and the training hooks), and the base class builds `forward` from them")

    # -- lookup ---------------------------------------------------------------------------------
    def lookup(self, name: str) -> type:
        """The model class registered as `name`; a ValueError that says why where there is none."""
        if name not in self._models:
            self.load_plugins()
        if name in self._models:
            return self._models[name]
        if name in self._problems:
            raise ValueError(self._problems[name])
        message = f"unknown model {name!r}; registered: {sorted(self._models)}"
        if self._problems:
            message += f"; model plugins that failed to load: {sorted(self._problems)} (see `prerank models`)"
        raise ValueError(f"{message}. {NOT_FOUND_HINT}")

    def origin(self, name: str) -> str | None:
        """'distribution version' of a plugin model; None for a built-in one."""
        return self._origins.get(name)

    def problems(self) -> dict[str, str]:
        """Plugin name -> why it is not registered (after reading the plugins)."""
        self.load_plugins()
        return dict(self._problems)

    def __getitem__(self, name: str) -> type:
        if name not in self._models:
            self.load_plugins()
        return self._models[name]

    def __iter__(self) -> Iterator[str]:
        self.load_plugins()
        return iter(list(self._models))

    def __len__(self) -> int:
        self.load_plugins()
        return len(self._models)
