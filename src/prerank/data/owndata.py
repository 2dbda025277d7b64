"""Your own data: a YAML description over CSV or parquet files.

    name: shop                      # a label for reports
    files:
      log: interactions.csv         # one row per event (paths relative to the YAML file)
      users: users.csv              # optional: one row per user (user-side attributes)
      items: items.csv              # optional: one row per item (item-side attributes)
      separator: ","
      encoding: utf-8               # of the CSV files (latin-1, cp1252, ...)
    columns:
      user_id: user_id
      item_id: item_id
      timestamp: ts                 # integers (Unix seconds, ms, or sequence positions) or date-times:
                                    # only their order is used
      label: clicked                # 0/1; omit for implicit feedback (every row a positive)
      label_threshold: null         # numeric label column: positive if value >= threshold
      grade: null                   # optional graded relevance (integers)
    embed_dim: null                 # default embedding dim of every id feature (null: 32; a model's
                                    # embed_dim option overrides it)
    features:
      - {name: age, side: user, kind: categorical, vocab: {min_count: 2}}
      - {name: tags, side: item, kind: multi_categorical, separator: "|"}
      - {name: price, side: item, kind: dense}
      - {name: device, side: context, kind: categorical}
    sequence: {source: log}         # build from the log, or {source: column, column: hist, separator: "|"}, or {source: none}
    negatives: null                 # sampled negatives per positive (implicit default 4)
    evaluation: {ks: [10, 20], candidates: [full, 100]}   # top-K evaluation (implicit default)
    duplicates: keep                # log rows equal in every column: keep (with a warning) or drop

Where features come from: user-side features from the users file when it has the column, else
from the log (then they must be constant per user); item-side likewise; context features from
the log, per row. Embedding dims here are defaults that a model's `embed_dim` option overrides
(`prerank train --set embed_dim=16` reuses the preprocessing cache). A feature's own `embed_dim`
must equal that of the other features of its side (user + context, or item): the models stack a
side's embeddings as fields. Dense values are min-max scaled on the fitted rows; the scaler is
stored with the schema, so a served model takes raw values. Ids are read as strings. Ids, attribute values and sequence items never seen in
the fitted rows map to the out-of-vocabulary index, as do users/items missing from their files
(counted in `prerank data check`). Every protocol applies (`--protocol`); the behaviour-sequence
length is `--seq-len`.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Literal, Optional, Union

import numpy as np
import pandas as pd
import pydantic
from pydantic import BaseModel, ConfigDict, Field

from prerank.data.pipeline import (
    ITEM, RANKING_EVAL, USER, FeatureSpec, ProtocolConfig, build_samples, implicit_protocol,
)
from prerank.data.readers import Located, read_frame, read_yaml_mapping, split_lists, to_numbers, to_timestamps
from prerank.data.schema import Kind, Side
from prerank.data.table import GRADE, LABEL, TIMESTAMP, DataError, PreparedData, cache_key, cached, file_fingerprint

LOADER_VERSION = 1
SEQUENCE_COLUMN = "__sequence"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class VocabPolicy(_Strict):
    # Rarer values map to OOV; counted over train users/items for user/item attributes, rows for context.
    min_count: int = Field(1, ge=1)


class FeatureConfig(_Strict):
    name: str = Field(min_length=1)
    side: Literal["user", "item", "context"]
    kind: Literal["categorical", "multi_categorical", "dense"]
    column: Optional[str] = None  # defaults to `name`
    embed_dim: Optional[int] = Field(None, gt=0)
    vocab: VocabPolicy = VocabPolicy()
    separator: str = "|"  # multi_categorical in text files
    max_len: int = Field(0, ge=0)  # multi_categorical: 0 means the longest bag seen

    @property
    def source(self) -> str:
        return self.column or self.name


class FilesConfig(_Strict):
    log: str
    users: Optional[str] = None
    items: Optional[str] = None
    separator: str = ","
    encoding: str = "utf-8"  # of the CSV files (e.g. latin-1, cp1252)


class ColumnsConfig(_Strict):
    user_id: str
    item_id: str
    timestamp: str
    label: Optional[str] = None
    label_threshold: Optional[float] = None
    grade: Optional[str] = None


class SequenceConfig(_Strict):
    source: Literal["log", "column", "none"] = "log"
    column: Optional[str] = None
    separator: str = "|"

    @pydantic.model_validator(mode="after")
    def _column_given(self):
        if self.source == "column" and not self.column:
            raise ValueError("sequence.source 'column' needs sequence.column")
        return self


class EvaluationConfig(_Strict):
    ks: list[int] = Field(default_factory=lambda: list(RANKING_EVAL["ks"]))
    candidates: list[Union[Literal["full"], int]] = Field(default_factory=lambda: list(RANKING_EVAL["candidates"]))


class OwnDataConfig(_Strict):
    name: str = "own data"
    files: FilesConfig
    columns: ColumnsConfig
    embed_dim: Optional[int] = Field(None, gt=0)
    features: list[FeatureConfig] = Field(default_factory=list)
    sequence: SequenceConfig = SequenceConfig()
    negatives: Optional[int] = Field(None, ge=0)
    evaluation: Optional[EvaluationConfig] = None
    # Log rows equal in every column: "keep" them with a warning, or "drop" all but the first.
    duplicates: Literal["keep", "drop"] = "keep"

    @pydantic.model_validator(mode="after")
    def _names_unique(self):
        names = [f.name for f in self.features]
        reserved = {"user_id", "item_id", "hist_items", LABEL, TIMESTAMP, GRADE, "item_row"}
        clash = sorted({n for n in names if names.count(n) > 1} | (set(names) & reserved))
        if clash:
            raise ValueError(f"feature names must be unique and not one of {sorted(reserved)}: {clash}")
        for sides in (("user", "context"), ("item",)):
            dims = {f.embed_dim or self.embed_dim for f in self.features if f.side in sides} | {self.embed_dim}
            if len(dims) > 1:
                shown = sorted("default" if d is None else str(d) for d in dims)
                raise ValueError(f"{'/'.join(sides)} features must share one embedding dim (the models stack them as "
                                 f"fields), got {shown}; set embed_dim at the top level instead")
        return self

    @property
    def implicit(self) -> bool:
        return self.columns.label is None


def read_config(path: str | Path) -> OwnDataConfig:
    path = Path(path)
    raw = read_yaml_mapping(path)
    try:
        return OwnDataConfig(**raw)
    except pydantic.ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'top level'}: {e['msg']}" for e in err.errors())
        raise DataError(f"{path}: {problems}") from None


def _resolve(base: Path, name: str) -> Path:
    p = Path(name)
    return p if p.is_absolute() else base / p


def _files(config: OwnDataConfig, base: Path) -> list[Path]:
    return [_resolve(base, f) for f in (config.files.log, config.files.users, config.files.items) if f]


class OwnTables:
    """The parsed, validated tables, ready for `build_samples`, plus what `data check` reports."""

    def __init__(self, log, users, items, specs, sequence_column, notes, config) -> None:
        self.log, self.users, self.items, self.specs = log, users, items, specs
        self.sequence_column, self.notes, self.config = sequence_column, notes, config


def _constant_per_key(located: Located, key_values: pd.Series, column: str, what: str) -> None:
    """A user (item) attribute read from the log must not change from row to row."""
    frame = pd.DataFrame({"key": key_values.to_numpy(), "value": located.frame[column].fillna("").astype(str).to_numpy()})
    first = frame.groupby("key")["value"].transform("first")
    bad = np.flatnonzero((first != frame["value"]).to_numpy())
    if len(bad):
        row = int(bad[0])
        raise DataError(f"{located.where(row)}: column {column!r} of {what} {frame['key'].iloc[row]!r} is "
                        f"{frame['value'].iloc[row]!r} here but {first.iloc[row]!r} on an earlier row; {what}-side "
                        f"features must be constant per {what} (declare it as a context feature if it varies)")


def _attribute_table(side: str, keys: pd.Series, log: Located, own: Located | None, own_key: str | None,
                     features: list[FeatureConfig], notes: list[str]) -> pd.DataFrame:
    index = pd.Index(pd.unique(keys), name=USER if side == "user" else ITEM)
    table = pd.DataFrame(index=index)
    if own is not None:
        own_keys = own.frame[own_key].astype(str)
        dupes = own_keys.duplicated()
        if dupes.any():
            row = int(np.flatnonzero(dupes.to_numpy())[0])
            raise DataError(f"{own.where(row)}: {side} id {own_keys.iloc[row]!r} appears twice in column {own_key!r}")
        missing = ~index.isin(own_keys)
        if missing.any():
            notes.append(f"{int(missing.sum())} {side}s of the log are not in {own.path.name}: their {side} features are "
                         f"out of vocabulary")
        own_frame = own.frame.set_index(own_keys)
        extra = own_frame.index.difference(index)
        table = pd.DataFrame(index=index.append(pd.Index(extra)).rename(index.name))
    for feature in features:
        if own is not None and feature.source in own.frame.columns:
            values = own_frame[feature.source].reindex(table.index)
            located = own
        elif feature.source in log.frame.columns:
            _constant_per_key(log, keys, feature.source, side)
            values = pd.Series(log.frame[feature.source].to_numpy(), index=keys.to_numpy())
            values = values[~values.index.duplicated()].reindex(table.index)
            located = log
        else:
            where = f"{own.path.name} or {log.path.name}" if own is not None else log.path.name
            raise DataError(f"feature {feature.name!r}: column {feature.source!r} is in neither {where}")
        table[feature.name] = _feature_values(values, feature, located)
    return table


class DuplicateRowsWarning(UserWarning):
    """The log repeats rows in every column (kept; `duplicates: drop` drops them)."""


def _feature_values(values: pd.Series, feature: FeatureConfig, located: Located) -> pd.Series:
    if feature.kind == "multi_categorical":
        return split_lists(values, feature.separator)
    if feature.kind == "dense":
        numbers = pd.to_numeric(values, errors="coerce")
        # An infinite value would make the min-max scaling zero the whole feature.
        bad = (numbers.isna() & values.notna()) | np.isinf(numbers)
        if bad.any():
            key = values.index[np.flatnonzero(bad.to_numpy())[0]]
            raw = located.frame[feature.source]
            row = int(np.flatnonzero((raw.astype(str) == str(values[key])).to_numpy())[0])
            raise DataError(f"{located.where(row)}: column {feature.source!r} (dense feature {feature.name!r}) is not "
                            f"a finite number: {values[key]!r}")
        return numbers.astype(np.float64)
    return values.astype(object).where(values.notna(), None).map(lambda v: None if v is None else str(v))


def read_own_tables(config_path: str | Path) -> OwnTables:
    config_path = Path(config_path)
    config = read_config(config_path)
    base = config_path.parent
    c = config.columns
    required = [c.user_id, c.item_id, c.timestamp] + ([c.label] if c.label else [])
    log_located = read_frame(_resolve(base, config.files.log), sep=config.files.separator, required=tuple(required),
                             encoding=config.files.encoding)
    frame = log_located.frame
    if len(frame) == 0:
        raise DataError(f"{log_located.path}: no rows")
    notes: list[str] = []
    log = pd.DataFrame({USER: frame[c.user_id].astype(str).to_numpy(), ITEM: frame[c.item_id].astype(str).to_numpy(),
                        TIMESTAMP: to_timestamps(log_located, c.timestamp)})
    if c.label is None:
        log[LABEL] = np.float32(1.0)
    elif c.label_threshold is not None:
        log[LABEL] = (to_numbers(log_located, c.label, integer=False) >= c.label_threshold).astype(np.float32)
    else:
        raw = frame[c.label].astype(str).str.strip().str.lower()
        mapping = {"0": 0.0, "1": 1.0, "0.0": 0.0, "1.0": 1.0, "false": 0.0, "true": 1.0}
        bad = ~raw.isin(list(mapping))
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise DataError(f"{log_located.where(row)}: label column {c.label!r} must be 0/1 (or set "
                            f"columns.label_threshold), found {frame[c.label].iloc[row]!r}")
        log[LABEL] = raw.map(mapping).astype(np.float32).to_numpy()
    if c.grade:
        log[GRADE] = to_numbers(log_located, c.grade).astype(np.int16)
    by_side = {side: [f for f in config.features if f.side == side] for side in ("user", "item", "context")}
    for feature in by_side["context"]:
        if feature.source not in frame.columns:
            raise DataError(f"feature {feature.name!r}: context column {feature.source!r} is not in {log_located.path.name}")
        log[feature.name] = _feature_values(frame[feature.source], feature, log_located).to_numpy()
    keep = ~frame.duplicated(keep="first").to_numpy()
    if not keep.all():
        first = log_located.where(int(np.flatnonzero(~keep)[0]))
        message = f"{log_located.path}: {int((~keep).sum()):,} rows repeat an earlier row in every column (first at {first.rsplit(', ', 1)[-1]})"
        if config.duplicates == "drop":
            notes.append(f"{message}; dropped (duplicates: drop)")
            log = log[keep].reset_index(drop=True)
        else:
            warnings.warn(f"{message}; kept (duplicates: drop drops them)", DuplicateRowsWarning, stacklevel=2)
            notes.append(f"{message}; kept")
    own = {}
    for side, name, key in (("user", config.files.users, c.user_id), ("item", config.files.items, c.item_id)):
        own[side] = (read_frame(_resolve(base, name), sep=config.files.separator, required=(key,), encoding=config.files.encoding)
                      if name else None)
    users = _attribute_table("user", log[USER], log_located, own["user"], c.user_id, by_side["user"], notes)
    items = _attribute_table("item", log[ITEM], log_located, own["item"], c.item_id, by_side["item"], notes)
    sequence_column = None
    if config.sequence.source == "column":
        if config.sequence.column not in frame.columns:
            raise DataError(f"sequence column {config.sequence.column!r} is not in {log_located.path.name}")
        log[SEQUENCE_COLUMN] = split_lists(frame[config.sequence.column], config.sequence.separator).to_numpy()[
            keep if config.duplicates == "drop" else slice(None)]
        sequence_column = SEQUENCE_COLUMN
    id_dim = config.embed_dim
    specs = [FeatureSpec("user_id", Side.USER, Kind.CATEGORICAL, embed_dim=id_dim),
             *[_spec(f, id_dim) for f in by_side["user"]], *[_spec(f, id_dim) for f in by_side["context"]],
             FeatureSpec("item_id", Side.ITEM, Kind.CATEGORICAL, embed_dim=id_dim),
             *[_spec(f, id_dim) for f in by_side["item"]]]
    return OwnTables(log, users, items, specs, sequence_column, notes, config)


def _spec(f: FeatureConfig, default_dim: int | None) -> FeatureSpec:
    # The attribute tables hold each feature under its own name (the source column is read above).
    return FeatureSpec(f.name, Side(f.side), Kind(f.kind), embed_dim=f.embed_dim or default_dim, max_len=f.max_len,
                       min_count=f.vocab.min_count)


def _protocol(config: OwnDataConfig, protocol: ProtocolConfig | None) -> ProtocolConfig:
    from dataclasses import replace

    protocol = protocol or ProtocolConfig()
    if protocol.negatives is None and config.negatives is not None:
        protocol = replace(protocol, negatives=config.negatives)
    if config.sequence.source == "none":
        protocol = replace(protocol, seq_len=0)
    if config.implicit:
        return implicit_protocol(protocol, config.name)
    return replace(protocol, negatives=protocol.negatives or 0)


def load_own_data(config_path: str | Path, protocol: ProtocolConfig | None = None,
                  cache_dir: str | Path | None = None) -> PreparedData:
    config_path = Path(config_path)
    config = read_config(config_path)
    protocol = _protocol(config, protocol)
    fingerprints = [file_fingerprint(config_path)] + [file_fingerprint(p) for p in _files(config, config_path.parent) if p.exists()]
    key = "own-" + cache_key(LOADER_VERSION, fingerprints, protocol.__dict__)

    def build() -> PreparedData:
        tables = read_own_tables(config_path)
        ranking = config.evaluation or (EvaluationConfig() if config.implicit else None)
        meta = {"dataset_label": config.name, "config": str(config_path.resolve()), "implicit": config.implicit,
                "notes": tables.notes}
        if ranking is not None:
            meta["ranking_eval"] = ranking.model_dump()
        return build_samples(tables.log, tables.users, tables.items, tables.specs, protocol, dataset=config.name,
                             sequence_column=tables.sequence_column, meta=meta)

    return cached(Path(cache_dir) if cache_dir else None, key, build)


def history_lengths(log: pd.DataFrame) -> np.ndarray:
    """Per row: how many positives the same user has strictly earlier (the unclipped built sequence)."""
    frame = log[[USER, TIMESTAMP]].assign(pos=(log[LABEL] > 0).astype(np.int64))
    per_slot = frame.groupby([USER, TIMESTAMP], sort=True)["pos"].sum()
    before = per_slot.groupby(level=0).cumsum() - per_slot
    return before.reindex(pd.MultiIndex.from_frame(frame[[USER, TIMESTAMP]])).to_numpy()


def check_own_data(config_path: str | Path) -> dict:
    """Validate every file the YAML names and summarise them (raises DataError on the first problem)."""
    tables = read_own_tables(config_path)
    log, config = tables.log, tables.config
    if tables.sequence_column:
        lengths = log[tables.sequence_column].map(len).to_numpy()
        sequence = {"source": f"column {config.sequence.column!r}"}
    elif config.sequence.source == "log":
        lengths = history_lengths(log)
        sequence = {"source": "built from the log (positives strictly earlier), before clipping to --seq-len"}
    else:
        lengths, sequence = None, {"source": "none"}
    if lengths is not None:
        sequence.update(mean=round(float(np.mean(lengths)), 2), median=float(np.median(lengths)), max=int(np.max(lengths)),
                        empty_fraction=round(float(np.mean(lengths == 0)), 4))
    features = {side: [{"name": f.name, "kind": f.kind, **({"embed_dim": f.embed_dim} if f.embed_dim else {})}
                       for f in config.features if f.side == side] for side in ("user", "item", "context")}
    features["user"].insert(0, {"name": "user_id", "kind": "categorical"})
    features["item"].insert(0, {"name": "item_id", "kind": "categorical"})
    if config.sequence.source != "none":
        features["user"].append({"name": "hist_items", "kind": "sequence"})
    for side, table in (("user", tables.users), ("item", tables.items)):
        for entry in features[side][1:]:
            if entry["name"] in table.columns and entry["kind"] != "dense":
                values = table[entry["name"]]
                flat = [v for bag in values for v in bag] if entry["kind"] == "multi_categorical" else values.dropna()
                entry["distinct_values"] = int(pd.Series(flat, dtype=object).nunique())
    summary = {
        "dataset": config.name,
        "rows": len(log),
        "users": int(log[USER].nunique()),
        "items": int(log[ITEM].nunique()),
        "catalogue_items": len(tables.items),
        "positives": int((log[LABEL] > 0).sum()),
        "feedback": "implicit (every row a positive; negatives sampled at training)" if config.implicit else "explicit",
        "positive_rate": round(float((log[LABEL] > 0).mean()), 4),
        "time_range": [int(log[TIMESTAMP].min()), int(log[TIMESTAMP].max())],
        "sequence_lengths": sequence,
        "features": features,
        "notes": tables.notes,
    }
    if GRADE in log.columns:
        summary["grades"] = {int(k): int(v) for k, v in log[GRADE].value_counts().sort_index().items()}
    return summary
