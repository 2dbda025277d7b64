"""Named experiments: one YAML file holds a whole training run (`prerank train --config run.yaml`).

    dataset:  {name: ml-1m, data_dir: ../data/ml-1m, ratings_file: null}
    protocol: {name: temporal, seq_len: 50, negatives: null, valid_fraction: 0.1, test_fraction: 0.1, seed: 2022}
    model:
      name: two_tower
      options: {hidden: [256, 128], embed_dim: 32}      # the model's config keys
    training: {epochs: 10, batch_size: 2048, lr: 0.001, weight_decay: 0.0, patience: 3, seed: 2022,
               num_threads: null, eval_batch_size: 16384, max_grad_norm: null, eval_candidates: dataset}
    cascade: null      # a `prerank cascade build` file: train on its request lists with the hybrid loss
    hybrid: {}         # hybrid-loss options (needs cascade), e.g. {distill_weight: 0.5}

Each section holds the keys of the configuration it feeds (`ProtocolConfig`, the model's `Config`,
`TrainConfig` but for `device` and `progress`, `HybridLossConfig`), checked by it: unknown keys and
bad values fail with the key path (`run.yaml: model.options.hiden: unknown key; known keys: ...`).
A key left out keeps its default. Relative paths (`dataset.data_dir`, `cascade`, an own-data
`dataset.name` YAML) are read from the file's folder; `dataset.ratings_file` is relative to
`data_dir`, as on the command line. Where a run runs (`--device`, `--cache-dir`, `--out`) is not
part of the experiment and stays on the command line.

Variants are run configs shipped with the package under `prerank/configs/<folder>/<model>@<tag>.yaml`
(also `configs/` at the repository root): `configs/ml-1m/` holds the settings of the published
ML-1M tables' code (`inttower@paper`, ...), `configs/ablations/` the papers' ablations
(`fit@no_mqm`, ...). `prerank train --model inttower@paper` reads the variant's file;
`prerank benchmark --models inttower@paper` reads its model and `protocol.seq_len` (the benchmark's
data and budget are the same for every model). A file's comment says where its settings come from.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic_core import to_jsonable_python

from prerank.atomic import write_text_atomic
from prerank.config import ConfigError, NonEmptyStr, config_dataclass
from prerank.data.pipeline import ProtocolConfig
from prerank.data.readers import read_yaml_mapping

CONFIGS = Path(__file__).parent / "configs"
VARIANT_NAME = re.compile(r"[\w.-]+@[\w.-]+")
SECTIONS = ("dataset", "protocol", "model", "training", "cascade", "hybrid")
DEFAULT_MODEL = "two_tower"
# Where a run runs, not what it is: these `TrainConfig` fields are the command line's only.
COMMAND_LINE_ONLY = {"device": "--device", "progress": "--progress/--no-progress", "resume": "--resume"}
PATH_KEYS = (("dataset", "data_dir"), ("cascade",))


class RunConfigError(ValueError):
    """A run config that cannot be used; the message names the file (or the command line) and each key path."""


@config_dataclass(frozen=True)
class DatasetSource:
    """Which data: a dataset name (or an own-data YAML) and where its files are."""

    name: NonEmptyStr = "ml-1m"
    data_dir: str | None = None
    ratings_file: str | None = None  # relative to data_dir, or absolute


@dataclass(frozen=True)
class RunConfig:
    """A checked run config (`validate` builds it): each part is the configuration the code takes."""

    dataset: DatasetSource
    protocol: ProtocolConfig
    model: str
    model_options: dict  # as given; `model_config` is them with the model's defaults filled in
    model_config: Any
    training: Any  # TrainConfig; its device and progress come from the command line
    cascade: str | None = None
    hybrid: Any = None  # HybridLossConfig, or None: the default hybrid loss (or a model's own list losses)

    def train_config(self, device: str = "cpu", progress: bool = True):
        return dataclasses.replace(self.training, device=device, progress=progress)

    def data_source(self) -> dict:
        """How a checkpoint records its data (`prerank.data.datasets.load_recorded` reloads it)."""
        return {"dataset": self.dataset.name, "data_dir": self.dataset.data_dir, "ratings_file": self.dataset.ratings_file,
                "protocol": dataclasses.asdict(self.protocol)}

    def as_dict(self, absolute_paths: bool = False) -> dict:
        """Every key, defaults included (a later change of a default does not change a rerun)."""
        training = {k: v for k, v in dataclasses.asdict(self.training).items() if k not in COMMAND_LINE_ONLY}
        raw = to_jsonable_python({
            "dataset": dataclasses.asdict(self.dataset), "protocol": dataclasses.asdict(self.protocol),
            "model": {"name": self.model, "options": dataclasses.asdict(self.model_config)}, "training": training,
            "cascade": self.cascade, "hybrid": dataclasses.asdict(self.hybrid) if self.hybrid else {},
        })
        if absolute_paths:
            _resolve_paths(raw, Path.cwd())
        return raw

    def to_yaml(self, absolute_paths: bool = False) -> str:
        return yaml.safe_dump(self.as_dict(absolute_paths), sort_keys=False, default_flow_style=None, width=110)

    def write(self, path: Path, comment: str = "") -> None:
        """OUT/run.yaml of a finished run: `prerank train --config` it to rerun the run (paths absolute)."""
        header = "".join(f"# {line}\n" for line in comment.splitlines())
        write_text_atomic(path, header + self.to_yaml(absolute_paths=True))


# -- reading ------------------------------------------------------------------------------------------
def read_run_file(path: str | Path) -> dict:
    """The keys a run-config file sets (checked; relative paths made absolute from its folder)."""
    path = Path(path)
    raw = read_yaml_mapping(path, RunConfigError, "a mapping (dataset, protocol, model, training, ...)")
    validate(raw, str(path))
    _resolve_paths(raw, path.parent)
    return raw


def merge(*layers: dict) -> dict:
    """Later layers win key by key; a layer naming another model replaces the model section (the
    earlier options belong to the other model), one naming the same model adds to its options."""
    merged: dict = {}
    for layer in layers:
        for section, value in layer.items():
            if section == "model":
                earlier = merged.get("model", {})
                same = value.get("name", earlier.get("name", DEFAULT_MODEL)) == earlier.get("name", DEFAULT_MODEL)
                base = earlier if same else {}
                merged["model"] = {**base, **value, "options": {**(base.get("options") or {}), **(value.get("options") or {})}}
            elif isinstance(value, dict) and isinstance(merged.get(section), dict):
                merged[section] = {**merged[section], **value}
            else:
                merged[section] = value
    return merged


def validate(raw: dict, source: str) -> RunConfig:
    """`raw` checked against the configurations it feeds: every problem, each with its key path."""
    from prerank.models.base import get_model_class, make_config
    from prerank.train.losses import HybridLossConfig
    from prerank.train.trainer import TrainConfig

    problems = [f"{key}: unknown key; known keys: {', '.join(SECTIONS)}" for key in raw if key not in SECTIONS]

    def section(name: str) -> dict:
        value = raw.get(name) or {}
        if isinstance(value, dict):
            return value
        problems.append(f"{name}: expected a mapping (got {value!r})")
        return {}

    def build(name: str, make, values: dict):
        try:
            return make(**values)
        except ConfigError as err:
            # "key: what" becomes "section.key: what"; a check across keys keeps "section: what".
            problems.extend(f"{name}.{p}" if re.match(r"[\w.\[\]]+: ", p) else f"{name}: {p}" for p in err.problems)
        except (TypeError, ValueError) as err:
            problems.append(f"{name}: {err}")
        return None

    dataset = build("dataset", DatasetSource, section("dataset"))
    protocol = build("protocol", ProtocolConfig, section("protocol"))
    model = section("model")
    problems.extend(f"model.{key}: unknown key; known keys: name, options" for key in model if key not in ("name", "options"))
    name, options = model.get("name", DEFAULT_MODEL), model.get("options") or {}
    model_config = None
    if not isinstance(options, dict):
        problems.append(f"model.options: expected a mapping (got {options!r})")
    elif not isinstance(name, str):
        problems.append(f"model.name: expected a model name (got {name!r})")
    else:
        try:
            get_model_class(name)
        except ValueError as err:
            problems.append(f"model.name: {err}" + (f" (a variant? pass --model {name})" if "@" in name else ""))
        else:
            model_config = build("model.options", lambda **given: make_config(name, given), options)
    training = section("training")
    problems.extend(f"training.{key}: set on the command line ({flag}), not in a run config"
                    for key, flag in COMMAND_LINE_ONLY.items() if key in training)
    train = build("training", TrainConfig, {k: v for k, v in training.items() if k not in COMMAND_LINE_ONLY})
    cascade = raw.get("cascade")
    if cascade is not None and not isinstance(cascade, str):
        problems.append(f"cascade: expected a file path (got {cascade!r})")
    hybrid = section("hybrid")
    hybrid_config = build("hybrid", HybridLossConfig, hybrid) if hybrid else None
    if hybrid and cascade is None:
        problems.append("hybrid: sets the loss of cascade training; give cascade (--cascade) too")
    if problems:
        raise RunConfigError(f"{source}: " + "; ".join(problems))
    return RunConfig(dataset, protocol, name, dict(options), model_config, train, cascade, hybrid_config)


def _resolve_paths(raw: dict, folder: Path) -> None:
    """Relative paths of `raw` (data_dir, cascade, an own-data dataset YAML) made absolute from `folder`."""
    dataset = raw.get("dataset")
    keys = [*PATH_KEYS, *([("dataset", "name")] if isinstance(dataset, dict) and str(dataset.get("name", "")).endswith((".yaml", ".yml")) else [])]
    for path in keys:
        node = raw
        for key in path[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict) and isinstance(node.get(path[-1]), str):
            node[path[-1]] = str((folder / Path(node[path[-1]]).expanduser()).resolve())


# -- variants -------------------------------------------------------------------------------------------
def variant_names() -> list[str]:
    return sorted(path.stem for path in CONFIGS.glob("*/*@*.yaml"))


def variant_file(name: str) -> Path:
    found = sorted(CONFIGS.glob(f"*/{name}.yaml")) if VARIANT_NAME.fullmatch(name) else []
    if not found:
        raise RunConfigError(f"unknown variant {name!r}; known: {variant_names()} (files under {CONFIGS})")
    if len(found) > 1:
        raise RunConfigError(f"variant {name!r} is defined twice: {[str(p) for p in found]}")
    return found[0]


def read_variant(name: str) -> dict:
    """A variant's file (`model@tag`), which must name its model: `model`."""
    path = variant_file(name)
    given = read_run_file(path)
    model = name.partition("@")[0]
    if given.get("model", {}).get("name") != model:
        raise RunConfigError(f"{path}: a variant of {model!r} must set model.name: {model}")
    return given
