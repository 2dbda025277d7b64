"""From an interaction log to model-ready samples, under a named evaluation protocol.

Any dataset reaches the models through `build_samples`: a log (user, item, timestamp, label,
optional grade), a user table and an item table of raw attributes, and a list of `FeatureSpec`s.
The protocol decides the split, where vocabularies and statistics come from, and which
label-derived features exist:

- ``temporal`` (default, leakage-free): each user's events sorted by time; the last
  ``test_fraction`` of them form test and the ``valid_fraction`` before that validation.
  Vocabularies and statistics come from train rows only. The behaviour sequence of an event holds
  only that user's positive events strictly before it.
- ``inttower`` (paper protocol, for comparison with published tables only): the preprocessing of
  the IntTower official ML-1M script. A random 80/20 split, the last 20% of the shuffled train as
  validation, vocabularies fitted on all data, users with no positive dropped, and two dense
  features, user and item mean of the binary label, computed *on each split from its own labels*
  (so every evaluated row's features contain its own label). **This leaks labels into features**;
  it exists only to reproduce the published numbers. Its behaviour sequence (the official script
  feeds none) holds only train-split positives, so that no row's sequence carries a test label.
- ``global_time`` (how a pre-ranker is deployed: trained on days 1..T, serving day T+1): one
  cutoff for all users, the last ``test_fraction`` of events by time are test and the
  ``valid_fraction`` before them validation (events sharing a timestamp share a split); no model
  trains on any event later than the earliest evaluated one. Vocabularies and statistics from
  train rows only; the behaviour sequence holds the user's positives strictly before the row.
- ``leave_last_out`` (sequential recommendation, e.g. S3-Rec on Amazon Beauty): each user's last
  event is test, the one before it validation, the rest train (users with fewer than 3 events stay
  in train). Vocabularies and statistics from train rows only, as under ``temporal``.

Implicit feedback (a log of positives only) gets ``negatives`` sampled negatives per positive:
items drawn uniformly from the catalogue among those the user never interacted with, each a
label-0 row with its positive's timestamp, context and split (so a negative never enters a
behaviour sequence and never moves between splits). A catalogue item drawn as a train negative
counts as seen in train for the vocabularies (the catalogue is known at training time).

Context features whose column is in the log are read per row from it; a pre-built
behaviour-sequence column in the log can replace the one built from the log (`sequence_column`).

Dense features are min-max scaled with a `DenseScaler` fitted on the fitted rows (train, or all
rows under ``inttower``); a missing value becomes 0. The scaler is stored in the schema, so serving
scales raw request values the same way. Embedding dims are not protocol: the schema gets each
spec's own dim or `DEFAULT_EMBED_DIM`, and a model's `embed_dim` option replaces them.
"""

from __future__ import annotations

import hashlib

from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import pandas as pd

from prerank.config import Fraction, NonNegativeInt, Seed, config_dataclass
from prerank.data.schema import FIRST_KNOWN_INDEX, OOV_INDEX, PAD_INDEX, DenseScaler, Feature, Kind, Schema, Side
from prerank.data.table import GRADE, ITEM_ROW, LABEL, TIMESTAMP, PreparedData, SampleTable

ProtocolName = Literal["temporal", "global_time", "inttower", "leave_last_out"]
PROTOCOLS = get_args(ProtocolName)
LEAKAGE_NOTE = (
    "protocol 'inttower' reproduces the IntTower official preprocessing, whose mean-rating features "
    "are computed from the labels of the split they are used in: it leaks labels and exists only for "
    "comparison with published tables"
)

# Log columns after a loader has renamed its own.
USER, ITEM = "user", "item"
# The schema's embedding dim of an id feature whose spec sets none (a model's `embed_dim` overrides it).
DEFAULT_EMBED_DIM = 32


@dataclass(frozen=True)
class FeatureSpec:
    """A raw attribute column turned into a schema feature."""

    name: str
    side: Side
    kind: Kind
    column: str = ""  # column in the user or item table; defaults to `name`
    embed_dim: int | None = None  # the schema's default dim for this table; None: DEFAULT_EMBED_DIM
    max_len: int = 0  # bags: 0 means the longest bag seen
    # Values seen fewer times map to OOV; counted over fitted events for the user/item ids and
    # context features, over fitted users/items for user/item attributes.
    min_count: int = 1

    def source(self) -> str:
        return self.column or self.name


@config_dataclass(frozen=True)
class ProtocolConfig:
    name: ProtocolName = "temporal"
    valid_fraction: Fraction = 0.1
    test_fraction: Fraction = 0.1
    seq_len: NonNegativeInt = 50  # 0: no behaviour-sequence feature
    seed: Seed = 2022  # the inttower protocol's random split and the negative draw
    # Sampled negatives per positive (implicit feedback). None: the dataset's default (0 for
    # explicit logs); the draw is seeded by `seed`.
    negatives: NonNegativeInt | None = None
    # `global_time` only: explicit cutoffs (timestamps; events at or after `test_from` are test,
    # those from `valid_from` on validation) instead of the fractions.
    valid_from: int | None = None
    test_from: int | None = None

    def __post_init__(self) -> None:
        if (self.valid_from is not None or self.test_from is not None) and self.name != "global_time":
            raise ValueError(f"valid_from / test_from are cutoffs of protocol global_time, not {self.name}")
        if (self.valid_from is None) != (self.test_from is None):
            raise ValueError("give both valid_from and test_from, or neither")
        if self.valid_from is not None and self.valid_from > self.test_from:
            raise ValueError(f"valid_from ({self.valid_from}) must not be after test_from ({self.test_from})")
        if self.valid_fraction + self.test_fraction >= 1:
            raise ValueError(f"valid_fraction + test_fraction must be < 1, got {self.valid_fraction} + {self.test_fraction}")

    @classmethod
    def from_recorded(cls, recorded: dict) -> ProtocolConfig:
        """The protocol a checkpoint or result recorded. Runs before embedding dims became model
        options recorded `embed_dim` here; the model's schema holds those dims, so it is dropped."""
        return cls(**{k: v for k, v in recorded.items() if k != "embed_dim"})


@dataclass
class Vocab:
    values: list

    def __post_init__(self) -> None:
        self._lookup = pd.Index(self.values)

    @classmethod
    def fit(cls, values, min_count: int = 1) -> Vocab:
        series = pd.Series(values).dropna()
        if min_count > 1:
            counts = series.value_counts()
            series = pd.Series(counts.index[counts.to_numpy() >= min_count])
        uniq = pd.unique(series)
        try:
            uniq = np.sort(uniq)
        except TypeError:
            pass
        return cls(list(uniq))

    def __len__(self) -> int:
        return len(self.values) + FIRST_KNOWN_INDEX

    def encode(self, values) -> np.ndarray:
        pos = self._lookup.get_indexer(pd.Index(values))
        return np.where(pos >= 0, pos + FIRST_KNOWN_INDEX, OOV_INDEX).astype(np.int32)


def split_temporal(user: np.ndarray, valid_fraction: float, test_fraction: float) -> np.ndarray:
    """Rows already sorted by (user, time). Returns 0 train, 1 valid, 2 test per row."""
    starts = np.r_[0, np.flatnonzero(user[1:] != user[:-1]) + 1]
    counts = np.diff(np.r_[starts, len(user)])
    per_row_count = np.repeat(counts, counts)
    position = np.arange(len(user)) - np.repeat(starts, counts)
    # Users with fewer than 3 events cannot give one event to each split: they stay in train.
    eligible = per_row_count >= 3
    n_test = np.where(eligible, np.maximum(1, np.floor(per_row_count * test_fraction)), 0)
    n_valid = np.where(eligible, np.maximum(1, np.floor(per_row_count * valid_fraction)), 0)
    split = np.zeros(len(user), dtype=np.int8)
    split[position >= per_row_count - n_test - n_valid] = 1
    split[position >= per_row_count - n_test] = 2
    return split


def split_global_time(timestamp: np.ndarray, valid_fraction: float, test_fraction: float,
                      valid_from: int | None = None, test_from: int | None = None) -> np.ndarray:
    """One cutoff for every user: 0 train, 1 valid, 2 test per row. Test is every event at or after
    `test_from`, valid every other one at or after `valid_from`; without them the cutoffs are the
    times of the events at quantiles 1 - test_fraction and 1 - test_fraction - valid_fraction of
    all events by time. Events sharing a timestamp share a split, so nothing of a cutoff's moment
    is both trained on and evaluated."""
    ordered = np.sort(timestamp, kind="stable")
    n = len(ordered)

    def cutoff(fraction: float):
        at = min(n - 1, int(np.ceil(n * (1 - fraction))))
        return ordered[at] if fraction > 0 and n else np.inf

    if test_from is None:
        valid_from, test_from = cutoff(test_fraction + valid_fraction), cutoff(test_fraction)
    split = np.zeros(n, dtype=np.int8)
    split[timestamp >= valid_from] = 1
    split[timestamp >= test_from] = 2
    return split


def split_leave_last_out(user: np.ndarray) -> np.ndarray:
    """Rows sorted by (user, time): each user's last row test, the one before valid, the rest train."""
    starts = np.r_[0, np.flatnonzero(user[1:] != user[:-1]) + 1]
    counts = np.diff(np.r_[starts, len(user)])
    from_end = np.repeat(starts + counts, counts) - np.arange(len(user))  # 1 for a user's last row
    eligible = np.repeat(counts, counts) >= 3
    split = np.zeros(len(user), dtype=np.int8)
    split[eligible & (from_end == 2)] = 1
    split[eligible & (from_end == 1)] = 2
    return split


def stable_keys(values) -> np.ndarray:
    """A 64-bit key per value [n] (uint64) from its text form, the same whatever type or order the
    ids arrive in (7 and "7" share a key): what negative sampling orders catalogues and users by."""
    codes, uniques = pd.factorize(pd.Series(values), sort=False)
    keys = np.fromiter((int.from_bytes(hashlib.blake2b(str(v).encode(), digest_size=8).digest(), "little") for v in uniques),
                       dtype=np.uint64, count=len(uniques))
    return keys[codes]


def sample_negatives(log: pd.DataFrame, split: np.ndarray, catalogue: pd.Index, per_positive: int, seed: int
                     ) -> tuple[pd.DataFrame, np.ndarray]:
    """Append `per_positive` label-0 rows per positive row of `log` (sorted by user, time).

    Each negative copies its positive's row (user, timestamp, context, split) with an item drawn
    uniformly from `catalogue` among those the user has no logged event with; a draw that hits
    one is redrawn. Users who interacted with the whole catalogue get no negatives.

    The draw does not depend on how ids are represented or ordered: the catalogue is put in the
    order of its ids' `stable_keys`, and positives are visited by (user key, timestamp, item key),
    so the same events under the same seed get the same negatives whether ids were read as
    numbers or as strings, and whatever order the vocabulary has.
    """
    rng = np.random.default_rng(seed)
    n_items = len(catalogue)
    canonical = np.argsort(stable_keys(catalogue.to_numpy()), kind="stable")  # canonical position -> catalogue position
    user_code = pd.factorize(log[USER])[0].astype(np.int64)
    item_code = catalogue.get_indexer(log[ITEM]).astype(np.int64)
    seen = np.unique(user_code * n_items + item_code)
    positive = np.flatnonzero(log[LABEL].to_numpy() > 0)
    visit = np.lexsort((stable_keys(log[ITEM].to_numpy()[positive]), log[TIMESTAMP].to_numpy()[positive],
                        stable_keys(log[USER].to_numpy()[positive])))
    source = np.repeat(positive[visit], per_positive)
    drawn = canonical[rng.integers(0, n_items, size=len(source))]
    clash = np.isin(user_code[source] * n_items + drawn, seen)
    for _ in range(100):
        if not clash.any():
            break
        drawn[clash] = canonical[rng.integers(0, n_items, size=int(clash.sum()))]
        clash = np.isin(user_code[source] * n_items + drawn, seen)
    source, drawn = source[~clash], drawn[~clash]
    negatives = log.iloc[source].copy()
    negatives[ITEM] = catalogue.to_numpy()[drawn]
    negatives[LABEL] = 0.0
    if GRADE in negatives.columns:
        negatives[GRADE] = 0
    combined = pd.concat([log, negatives], ignore_index=True)
    combined_split = np.r_[split, split[source]]
    order = np.lexsort((combined[TIMESTAMP].to_numpy(), user_code[np.r_[np.arange(len(log)), source]]))
    return combined.iloc[order].reset_index(drop=True), combined_split[order]


def encode_sequences(lists: pd.Series, vocab: Vocab, max_len: int) -> np.ndarray:
    """Pre-built sequences of raw ids (oldest first): the last `max_len`, left-padded."""
    out = np.full((len(lists), max_len), PAD_INDEX, dtype=np.int32)
    for row, values in enumerate(lists):
        if isinstance(values, (list, tuple, np.ndarray)) and len(values):
            codes = vocab.encode(list(values)[-max_len:])
            out[row, max_len - len(codes):] = codes
    return out


def split_inttower(n: int, seed: int) -> np.ndarray:
    """sklearn train_test_split(test_size=0.2) then Keras validation_split=0.2 (the tail of train)."""
    from sklearn.model_selection import train_test_split

    train_rows, test_rows = train_test_split(np.arange(n), test_size=0.2, random_state=seed)
    split_at = int(len(train_rows) * (1 - 0.2))  # Keras: the first 80% train, the rest validate
    split = np.zeros(n, dtype=np.int8)
    split[train_rows[split_at:]] = 1
    split[test_rows] = 2
    return split


def behaviour_sequences(
    user: np.ndarray, timestamp: np.ndarray, positive: np.ndarray, item_index: np.ndarray, max_len: int
) -> np.ndarray:
    """For each row, the item indices of the same user's positive events strictly earlier in time.

    Rows must be sorted by (user, timestamp). Oldest first, most recent last, left-padded with
    PAD_INDEX, at most `max_len` long. Events sharing a timestamp never see each other.
    """
    n = len(user)
    _, user_code = np.unique(user, return_inverse=True)
    _, time_rank = np.unique(timestamp, return_inverse=True)
    key = user_code.astype(np.int64) * (n + 1) + time_rank
    pos_rows = np.flatnonzero(positive)
    pos_key = key[pos_rows]
    pos_items = item_index[pos_rows]
    end = np.searchsorted(pos_key, key, side="left")  # exclusive: strictly earlier positives
    first = np.searchsorted(user_code[pos_rows], user_code, side="left")  # this user's first positive
    begin = np.maximum(first, end - max_len)
    gather = end[:, None] - max_len + np.arange(max_len)[None, :]
    keep = gather >= begin[:, None]
    if len(pos_items) == 0:
        return np.full((n, max_len), PAD_INDEX, dtype=np.int32)
    seq = pos_items[np.clip(gather, 0, len(pos_items) - 1)]
    return np.where(keep, seq, PAD_INDEX).astype(np.int32)


def _encode_bag(lists: pd.Series, vocab: Vocab, max_len: int) -> np.ndarray:
    out = np.full((len(lists), max_len), PAD_INDEX, dtype=np.int32)
    for row, values in enumerate(lists):
        if isinstance(values, (list, tuple, np.ndarray)) and len(values):
            codes = vocab.encode(list(values)[:max_len])
            out[row, : len(codes)] = codes
    return out


def build_samples(
    log: pd.DataFrame,
    users: pd.DataFrame,
    items: pd.DataFrame,
    features: list[FeatureSpec],
    protocol: ProtocolConfig,
    dataset: str,
    sequence_name: str = "hist_items",
    meta: dict | None = None,
    sequence_column: str | None = None,
) -> PreparedData:
    """`log` has columns user, item, timestamp, label (0/1) and optionally grade; `users` and
    `items` are indexed by the raw ids. The first user-side spec must be the user id and the
    first item-side spec the item id (both categorical, the raw id itself). Context specs whose
    column is in `log` are read per row from it. `sequence_column`: a log column of raw item-id
    lists (oldest first) used as the behaviour sequence instead of building it from the log."""
    for col in (USER, ITEM, TIMESTAMP, LABEL):
        if col not in log.columns:
            raise ValueError(f"interaction log lacks column {col!r}")
    user_specs = [f for f in features if f.side is not Side.ITEM]
    item_specs = [f for f in features if f.side is Side.ITEM]
    user_id_spec, item_id_spec = user_specs[0], item_specs[0]

    log = log.sort_values([USER, TIMESTAMP], kind="stable").reset_index(drop=True)
    if protocol.name == "inttower":
        # The official script's inner join with the positive-history table drops users with no positive.
        has_positive = log.groupby(USER)[LABEL].transform("max") > 0
        log = log[has_positive].reset_index(drop=True)
        split = split_inttower(len(log), protocol.seed)
    elif protocol.name == "leave_last_out":
        split = split_leave_last_out(log[USER].to_numpy())
    elif protocol.name == "global_time":
        split = split_global_time(log[TIMESTAMP].to_numpy(), protocol.valid_fraction, protocol.test_fraction,
                                  protocol.valid_from, protocol.test_from)
    else:
        split = split_temporal(log[USER].to_numpy(), protocol.valid_fraction, protocol.test_fraction)
    for key, table in ((ITEM, items), (USER, users)):
        missing = ~log[key].isin(table.index)
        if missing.any():
            raise ValueError(f"{int(missing.sum())} log rows name a {key} missing from the {key} table, "
                             f"e.g. {log[key][missing].iloc[0]!r}")
    if protocol.negatives:
        log, split = sample_negatives(log, split, items.index, protocol.negatives, protocol.seed)
    fit_rows = split == 0 if protocol.name != "inttower" else np.ones(len(log), dtype=bool)

    item_row = items.index.get_indexer(log[ITEM])
    user_row = users.index.get_indexer(log[USER])
    seen_items = items.iloc[np.unique(item_row[fit_rows])]
    seen_users = users.iloc[np.unique(user_row[fit_rows])]

    vocabs: dict[str, Vocab] = {}
    schema_features: list[Feature] = []
    columns: dict[str, np.ndarray] = {}
    catalogue: dict[str, np.ndarray] = {}
    for spec in features:
        table, seen, rows = (items, seen_items, item_row) if spec.side is Side.ITEM else (users, seen_users, user_row)
        if spec.side is Side.CONTEXT and spec.source() in log.columns:
            table, seen, rows = log, log[fit_rows], np.arange(len(log))
        dim = spec.embed_dim or DEFAULT_EMBED_DIM
        if spec is user_id_spec or spec is item_id_spec:
            raw = seen.index.to_numpy()
            vocabs[spec.name] = Vocab.fit(raw) if spec.min_count <= 1 else Vocab.fit(table.index[rows[fit_rows]], spec.min_count)
            encoded = vocabs[spec.name].encode(table.index.to_numpy())
            schema_features.append(Feature(spec.name, spec.side, Kind.CATEGORICAL, len(vocabs[spec.name]), dim))
        elif spec.kind is Kind.CATEGORICAL:
            vocabs[spec.name] = Vocab.fit(seen[spec.source()], spec.min_count)
            encoded = vocabs[spec.name].encode(table[spec.source()].to_numpy())
            schema_features.append(Feature(spec.name, spec.side, spec.kind, len(vocabs[spec.name]), dim))
        elif spec.kind is Kind.MULTI_CATEGORICAL:
            bags = table[spec.source()]
            vocabs[spec.name] = Vocab.fit([v for bag in seen[spec.source()] for v in bag], spec.min_count)
            max_len = spec.max_len or max(1, int(bags.map(len).max()))
            encoded = _encode_bag(bags, vocabs[spec.name], max_len)
            schema_features.append(Feature(spec.name, spec.side, spec.kind, len(vocabs[spec.name]), dim, max_len))
        elif spec.kind is Kind.DENSE:
            scaler = DenseScaler.fit(seen[spec.source()].to_numpy(dtype=np.float64))
            encoded = scaler.apply(table[spec.source()].to_numpy(dtype=np.float64))
            schema_features.append(Feature(spec.name, spec.side, spec.kind, scaler=scaler))
        else:
            raise ValueError(f"feature {spec.name!r}: kind {spec.kind.value} cannot come from an attribute table")
        columns[spec.name] = encoded[rows]
        if spec.side is Side.ITEM:
            catalogue[spec.name] = encoded

    item_id_feature = schema_features[[f.name for f in schema_features].index(item_id_spec.name)]
    if protocol.seq_len > 0:
        if sequence_column is not None:
            columns[sequence_name] = encode_sequences(log[sequence_column], vocabs[item_id_spec.name], protocol.seq_len)
        else:
            # Under `inttower` the split is random: a sequence over every split would put the
            # positives of test rows (their labels) into earlier train rows' features.
            history = (log[LABEL].to_numpy() > 0) & ((split == 0) if protocol.name == "inttower" else True)
            columns[sequence_name] = behaviour_sequences(
                log[USER].to_numpy(),
                log[TIMESTAMP].to_numpy(),
                history,
                columns[item_id_spec.name],
                protocol.seq_len,
            )
        schema_features.append(
            Feature(
                sequence_name,
                Side.USER,
                Kind.SEQUENCE,
                item_id_feature.vocab_size,
                item_id_feature.embed_dim,
                protocol.seq_len,
                vocab=item_id_feature.vocab,
            )
        )

    label = log[LABEL].to_numpy(dtype=np.float32)
    if protocol.name == "inttower":
        for side_name, key in (("user_mean_rating", USER), ("item_mean_rating", ITEM)):
            values = np.zeros(len(log), dtype=np.float32)
            # Train statistics cover train + validation rows (the script splits validation off later).
            # Each split is scaled by its own min and max, as the script does; the schema keeps the
            # train split's scaler, which serving applies to a raw mean sent in a request.
            for rows in (split == 2, split != 2):
                means = log.loc[rows, [key, LABEL]].groupby(key)[LABEL].transform("mean").to_numpy()
                scaler = DenseScaler.fit(means)
                values[rows] = scaler.apply(means)
            columns[side_name] = values
            side = Side.USER if key == USER else Side.ITEM
            schema_features.append(Feature(side_name, side, Kind.DENSE, scaler=scaler))
        # For the catalogue (serving), each item's mean label over the train split.
        train_means = log.loc[split != 2].groupby(ITEM)[LABEL].mean()
        per_item = train_means.reindex(items.index).fillna(train_means.mean()).to_numpy()
        catalogue["item_mean_rating"] = DenseScaler.fit(train_means.to_numpy()).apply(per_item)

    columns[LABEL] = label
    columns[ITEM_ROW] = item_row.astype(np.int32)
    columns[TIMESTAMP] = log[TIMESTAMP].to_numpy(dtype=np.int64)
    columns[GRADE] = log[GRADE].to_numpy(dtype=np.int16) if GRADE in log.columns else np.full(len(log), -1, np.int16)
    table = SampleTable(columns)
    schema = Schema(tuple(schema_features), item_id=item_id_spec.name, user_id=user_id_spec.name)
    raw_ids = items.index.to_numpy()
    if raw_ids.dtype == object:
        raw_ids = raw_ids.astype(str)
    all_meta = {
        "dataset": dataset,
        "protocol": protocol.name,
        "protocol_config": protocol.__dict__,
        "leaks_labels": protocol.name == "inttower",
        **({"note": LEAKAGE_NOTE} if protocol.name == "inttower" else {}),
        **(meta or {}),
    }
    return PreparedData(
        schema=schema,
        train=table.subset(np.flatnonzero(split == 0)),
        valid=table.subset(np.flatnonzero(split == 1)),
        test=table.subset(np.flatnonzero(split == 2)),
        items=SampleTable(catalogue),
        item_raw_ids=raw_ids,
        vocabs={name: [v.item() if hasattr(v, "item") else v for v in vocab.values] for name, vocab in vocabs.items()},
        meta=all_meta,
    )


IMPLICIT_NEGATIVES = 4  # sampled negatives per positive when an implicit dataset's config leaves it unset
RANKING_EVAL = {"ks": [10, 20], "candidates": ["full", 100]}  # top-K evaluation of implicit datasets


def implicit_protocol(protocol: ProtocolConfig | None, dataset: str) -> ProtocolConfig:
    """The protocol for a positives-only log: `negatives` resolved, and at least one."""
    from dataclasses import replace

    protocol = protocol or ProtocolConfig()
    if protocol.negatives is None:
        return replace(protocol, negatives=IMPLICIT_NEGATIVES)
    if protocol.negatives < 1:
        raise ValueError(f"dataset {dataset!r} has implicit feedback (positives only): it needs negatives >= 1")
    return protocol
