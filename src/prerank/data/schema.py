"""The feature schema: the only description of the data that models ever read.

Every feature has a name, a side (user / item / context), a kind and, for id-valued kinds, a
vocabulary size and an embedding dimension; a dense feature carries the scaler that turns its raw
values into model inputs. Id-valued features reserve index 0 for padding (and missing values) and
index 1 for out-of-vocabulary ids; known values start at 2.

Embedding dimensions here are the data's defaults (32 unless a dataset description says
otherwise): a model's `embed_dim` option replaces them (`Schema.with_embed_dims`), so changing them
never re-runs preprocessing. The scaler is part of the data: it travels with the schema into the
preprocessing cache, checkpoints and serving artifacts, and serving applies it to raw request values.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from enum import Enum

import numpy as np

PAD_INDEX = 0
OOV_INDEX = 1
FIRST_KNOWN_INDEX = 2


class Side(str, Enum):
    USER = "user"
    ITEM = "item"
    CONTEXT = "context"


class Kind(str, Enum):
    CATEGORICAL = "categorical"  # one id per row: int [...]
    MULTI_CATEGORICAL = "multi_categorical"  # a padded bag of ids: int [..., max_len]
    SEQUENCE = "sequence"  # ordered item ids, oldest first, left-padded: int [..., max_len]
    DENSE = "dense"  # one float per row: float [...]


@dataclass(frozen=True)
class DenseScaler:
    """Min-max scaling of one dense feature, fitted on the rows the vocabularies come from.

        x -> (x - lo) / (hi - lo)    (hi == lo: x - lo);   missing (NaN, null) -> `missing`

    `missing` is 0.0, the scaled value of the lowest fitted value. The one function that turns
    raw dense values into model inputs: the data pipeline and serving both call `apply`.
    """

    lo: float = 0.0
    hi: float = 1.0
    missing: float = 0.0

    def __post_init__(self) -> None:
        for name in ("lo", "hi", "missing"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
                raise ValueError(f"DenseScaler.{name} must be a finite number, got {value!r}")
            object.__setattr__(self, name, float(value))
        if self.hi < self.lo:
            raise ValueError(f"DenseScaler: hi ({self.hi}) is below lo ({self.lo})")

    @classmethod
    def fit(cls, values: np.ndarray) -> DenseScaler:
        """lo and hi of the finite values (none: the identity)."""
        values = np.asarray(values, dtype=np.float64)
        finite = values[np.isfinite(values)]
        return cls(float(finite.min()), float(finite.max())) if len(finite) else cls()

    def apply(self, values) -> np.ndarray:
        """Raw values (any shape; NaN where missing) -> model inputs, float32 of the same shape."""
        values = np.asarray(values, dtype=np.float64)
        scale = self.hi - self.lo if self.hi > self.lo else 1.0
        return np.nan_to_num((values - self.lo) / scale, nan=self.missing).astype(np.float32)


@dataclass(frozen=True)
class Feature:
    name: str
    side: Side
    kind: Kind
    vocab_size: int = 0
    embed_dim: int = 0
    max_len: int = 1
    # Features naming the same `vocab` share one embedding table (a behaviour sequence of
    # movie ids shares the table of the item's own movie id). Defaults to the feature's name.
    vocab: str = ""
    # Dense features only, and required there: raw value -> model input.
    scaler: DenseScaler | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "side", Side(self.side))
        object.__setattr__(self, "kind", Kind(self.kind))
        if not self.vocab:
            object.__setattr__(self, "vocab", self.name)
        if isinstance(self.scaler, Mapping):
            object.__setattr__(self, "scaler", DenseScaler(**self.scaler))
        if self.kind is Kind.DENSE:
            if not isinstance(self.scaler, DenseScaler):
                raise ValueError(f"dense feature {self.name!r} has no scaler (raw value -> model input); a schema "
                                 "written before prerank recorded dense scalers lacks it: rebuild the data, retrain "
                                 "and re-export")
        elif self.scaler is not None:
            raise ValueError(f"feature {self.name!r}: only dense features take a scaler")
        if self.kind is not Kind.DENSE:
            if self.vocab_size < FIRST_KNOWN_INDEX:
                raise ValueError(f"feature {self.name!r}: vocab_size must be >= 2 (pad + OOV), got {self.vocab_size}")
            if self.embed_dim <= 0:
                raise ValueError(f"feature {self.name!r}: embed_dim must be positive, got {self.embed_dim}")
        if self.kind in (Kind.MULTI_CATEGORICAL, Kind.SEQUENCE) and self.max_len < 1:
            raise ValueError(f"feature {self.name!r}: max_len must be >= 1, got {self.max_len}")

    @property
    def is_id(self) -> bool:
        return self.kind is not Kind.DENSE

    @property
    def is_bag(self) -> bool:
        return self.kind in (Kind.MULTI_CATEGORICAL, Kind.SEQUENCE)


@dataclass(frozen=True)
class Schema:
    features: tuple[Feature, ...]
    # The item-side categorical feature that identifies an item (the key of the item-state table).
    item_id: str
    user_id: str
    label: str = "label"
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        names = [f.name for f in self.features]
        dupes = {n for n in names if names.count(n) > 1}
        if dupes:
            raise ValueError(f"duplicate feature names in schema: {sorted(dupes)}")
        for key, side in ((self.item_id, Side.ITEM), (self.user_id, Side.USER)):
            if key not in names:
                raise ValueError(f"schema names {key!r} as the {side.value} id but has no such feature")
            if self[key].side is not side or self[key].kind is not Kind.CATEGORICAL:
                raise ValueError(f"{key!r} must be a categorical {side.value}-side feature")
        tables: dict[str, Feature] = {}
        for f in self.features:
            if not f.is_id:
                continue
            other = tables.setdefault(f.vocab, f)
            if (other.vocab_size, other.embed_dim) != (f.vocab_size, f.embed_dim):
                raise ValueError(
                    f"features {other.name!r} and {f.name!r} share vocab {f.vocab!r} but differ in vocab_size/embed_dim"
                )

    def __getitem__(self, name: str) -> Feature:
        for f in self.features:
            if f.name == name:
                return f
        raise KeyError(f"no feature {name!r} in schema (have: {[f.name for f in self.features]})")

    def __contains__(self, name: str) -> bool:
        return any(f.name == name for f in self.features)

    def side(self, *sides: Side | str) -> tuple[Feature, ...]:
        wanted = {Side(s) for s in sides}
        return tuple(f for f in self.features if f.side in wanted)

    @property
    def user_features(self) -> tuple[Feature, ...]:
        """What `encode_user` may read: user and context features."""
        return self.side(Side.USER, Side.CONTEXT)

    @property
    def item_features(self) -> tuple[Feature, ...]:
        return self.side(Side.ITEM)

    @property
    def sequence_feature(self) -> Feature | None:
        seqs = [f for f in self.user_features if f.kind is Kind.SEQUENCE]
        return seqs[0] if seqs else None

    @property
    def embed_dims(self) -> dict[str, int]:
        """Embedding dim per table (vocabulary name)."""
        return {f.vocab: f.embed_dim for f in self.features if f.is_id}

    def with_embed_dims(self, dims: int | Mapping[str, int] | None) -> Schema:
        """This schema with a model's `embed_dim`: one int for every table, or a mapping from table
        (vocabulary) name, or from a feature name standing for its table, to a dim (tables not
        named keep theirs); None changes nothing."""
        if dims is None:
            return self
        tables = self.embed_dims
        if isinstance(dims, Mapping):
            wanted: dict[str, int] = {}
            for key, dim in dims.items():
                if key in tables:
                    vocab = key
                elif key in self and self[key].is_id:
                    vocab = self[key].vocab
                else:
                    raise ValueError(f"embed_dim: no embedding table {key!r}; tables: {sorted(tables)}")
                if wanted.setdefault(vocab, dim) != dim:
                    sharing = sorted(f.name for f in self.features if f.is_id and f.vocab == vocab)
                    raise ValueError(f"embed_dim: features {sharing} share the table {vocab!r} and so one dim, "
                                     f"got {wanted[vocab]} and {dim}")
        else:
            wanted = dict.fromkeys(tables, dims)
        for vocab, dim in wanted.items():
            if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0:
                raise ValueError(f"embed_dim: the dim of table {vocab!r} must be a positive integer, got {dim!r}")
        features = tuple(replace(f, embed_dim=wanted.get(f.vocab, f.embed_dim)) if f.is_id else f for f in self.features)
        return replace(self, features=features)

    def same_data(self, other: Schema) -> bool:
        """True when both describe the same encoded data: equal but perhaps for embedding dims."""
        if set(self.embed_dims) != set(other.embed_dims):
            return False
        return self == other.with_embed_dims(self.embed_dims)

    def to_dict(self) -> dict:
        return {
            "features": [{**asdict(f), "side": f.side.value, "kind": f.kind.value} for f in self.features],
            "item_id": self.item_id,
            "user_id": self.user_id,
            "label": self.label,
            "extra": self.extra,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Schema:
        return cls(
            features=tuple(Feature(**f) for f in d["features"]),
            item_id=d["item_id"],
            user_id=d["user_id"],
            label=d.get("label", "label"),
            extra=d.get("extra", {}),
        )
