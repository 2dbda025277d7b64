"""The feature schema: the only description of the data that models ever read.

Every feature has a name, a side (user / item / context), a kind and, for id-valued kinds, a
vocabulary size and an embedding dimension. Id-valued features reserve index 0 for padding
(and missing values) and index 1 for out-of-vocabulary ids; known values start at 2.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import Enum

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

    def __post_init__(self) -> None:
        object.__setattr__(self, "side", Side(self.side))
        object.__setattr__(self, "kind", Kind(self.kind))
        if not self.vocab:
            object.__setattr__(self, "vocab", self.name)
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
