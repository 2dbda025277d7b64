"""Taobao datasets from Tianchi: UserBehavior (implicit, graded) and the display-ad CTR files.

- **UserBehavior** (`UserBehavior.csv`, header-less ``user,item,category,behaviour,timestamp``,
  behaviour one of pv/cart/fav/buy). Every logged behaviour is a positive interaction; its grade
  orders the behaviours for the cascade objectives and NDCG: buy 3 > cart = fav 2 > pv 1, and
  sampled negatives (`ProtocolConfig.negatives`, default 4) get grade 0. Repeated behaviours on an
  item stay separate events. A last line cut mid-row (the staged prefix ends in one) is dropped
  with a warning; a bad line anywhere else is an error. Features: user id; item id and category
  (item side); behaviour sequence.
- **Display-ad CTR** (Tianchi 56): either the three raw files (`raw_sample.csv`,
  `ad_feature.csv`, `user_profile.csv`), joined here on ``adgroup_id`` and ``userid``, or files
  already joined as FuxiCTR ships them (`train_sample.csv`, `valid_sample.csv`,
  `test_sample.csv`, with a ``^``-separated `click_sequence`). Joined files are pooled (a file
  identical to one already read is skipped) and the protocol splits them like any log. Label:
  ``clk``. Features: user profile (user side); ``pid`` (context, per impression); ad group,
  category, campaign, customer, brand and price (item side); the behaviour sequence:
  `click_sequence` where the files carry it, else built from the log's clicks. Users without a
  profile and ads without features get out-of-vocabulary values.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from prerank.data.pipeline import ITEM, RANKING_EVAL, USER, FeatureSpec, ProtocolConfig, build_samples, implicit_protocol
from prerank.data.readers import Located, attribute_table, check_values, read_frame, split_lists, to_numbers, to_timestamps
from prerank.data.schema import Kind, Side
from prerank.data.table import GRADE, LABEL, TIMESTAMP, DataError, PreparedData, cache_key, cached, file_fingerprint

LOADER_VERSION = 1
BEHAVIOUR_GRADE = {"pv": 1, "cart": 2, "fav": 2, "buy": 3}
USERBEHAVIOR_COLUMNS = ["user", "item", "category", "behavior", "timestamp"]

AD_ITEM_COLUMNS = ["cate_id", "campaign_id", "customer", "brand"]
AD_USER_COLUMNS = ["cms_segid", "cms_group_id", "final_gender_code", "age_level", "pvalue_level", "shopping_level",
                   "occupation", "new_user_class_level"]
AD_JOINED_FILES = ("train_sample.csv", "valid_sample.csv", "test_sample.csv")
AD_RAW_FILES = ("raw_sample.csv", "ad_feature.csv", "user_profile.csv")


def _userbehavior_path(path: Path) -> Path:
    return path / "UserBehavior.csv" if path.is_dir() else path


def load_taobao_userbehavior(path: str | Path, protocol: ProtocolConfig | None = None,
                             cache_dir: str | Path | None = None) -> PreparedData:
    protocol = implicit_protocol(protocol, "taobao-userbehavior")
    path = _userbehavior_path(Path(path))
    if not path.exists():
        raise DataError(f"{path}: file not found")
    key = "taobao-userbehavior-" + cache_key(LOADER_VERSION, file_fingerprint(path), protocol.__dict__)

    def build() -> PreparedData:
        located = read_frame(path, names=USERBEHAVIOR_COLUMNS, required=tuple(USERBEHAVIOR_COLUMNS), drop_truncated_last=True)
        check_values(located, "behavior", BEHAVIOUR_GRADE)
        log = pd.DataFrame({USER: to_numbers(located, "user"), ITEM: to_numbers(located, "item"),
                            TIMESTAMP: to_numbers(located, "timestamp")})
        log[LABEL] = np.float32(1.0)
        log[GRADE] = located.frame["behavior"].map(BEHAVIOUR_GRADE).to_numpy(dtype=np.int16)
        items = attribute_table(log[ITEM].to_numpy(), located.frame, ["category"], ITEM)
        users = pd.DataFrame(index=pd.Index(np.unique(log[USER]), name=USER))
        features = [
            FeatureSpec("user_id", Side.USER, Kind.CATEGORICAL),
            FeatureSpec("item_id", Side.ITEM, Kind.CATEGORICAL),
            FeatureSpec("category", Side.ITEM, Kind.CATEGORICAL),
        ]
        meta = {"dataset_label": "Taobao UserBehavior (prefix sample)" if "sample" in str(path) else "Taobao UserBehavior",
                "implicit": True, "ranking_eval": RANKING_EVAL, "grades": "buy 3 > cart/fav 2 > pv 1; sampled negatives 0",
                "source_file": str(path)}
        return build_samples(log, users, items, features, protocol, dataset="taobao-userbehavior", meta=meta)

    return cached(Path(cache_dir) if cache_dir else None, key, build)


def _ad_features() -> list[FeatureSpec]:
    return [
        FeatureSpec("userid", Side.USER, Kind.CATEGORICAL),
        *[FeatureSpec(c, Side.USER, Kind.CATEGORICAL) for c in AD_USER_COLUMNS],
        FeatureSpec("pid", Side.CONTEXT, Kind.CATEGORICAL),
        FeatureSpec("adgroup_id", Side.ITEM, Kind.CATEGORICAL),
        *[FeatureSpec(c, Side.ITEM, Kind.CATEGORICAL) for c in AD_ITEM_COLUMNS],
        FeatureSpec("price", Side.ITEM, Kind.DENSE),
    ]


def read_taobao_ad(folder: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, bool, list[Path]]:
    """(log, users, items, has a click_sequence column, files read) from either layout."""
    if all((folder / name).exists() for name in AD_RAW_FILES):
        return _read_raw(folder)
    joined = [folder / name for name in AD_JOINED_FILES if (folder / name).exists()]
    if not joined:
        raise DataError(f"{folder}: expected {', '.join(AD_RAW_FILES)} (raw Tianchi files) or "
                        f"{', '.join(AD_JOINED_FILES)} (joined)")
    frames, digests, used = [], set(), []
    for path in joined:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest in digests:
            warnings.warn(f"{path}: identical to a file already read; skipped", UserWarning, stacklevel=2)
            continue
        digests.add(digest)
        used.append(path)
        located = read_frame(path, required=("clk", "time_stamp", "userid", "adgroup_id"))
        missing = [c for c in ["pid", *AD_ITEM_COLUMNS, "price", *AD_USER_COLUMNS] if c not in located.frame.columns]
        if missing:
            raise DataError(f"{path}: missing column(s) {missing}")
        frames.append(_ad_log(located, has_sequence="click_sequence" in located.frame.columns))
    log = pd.concat(frames, ignore_index=True)
    users = attribute_table(log[USER].to_numpy(), log, AD_USER_COLUMNS, USER)
    items = attribute_table(log[ITEM].to_numpy(), log, [*AD_ITEM_COLUMNS, "price"], ITEM)
    return log, users, items, "click_sequence" in log.columns, used


def _ad_log(located: Located, has_sequence: bool) -> pd.DataFrame:
    frame = located.frame
    check_values(located, "clk", {"0", "1"})
    log = pd.DataFrame({USER: to_numbers(located, "userid"), ITEM: to_numbers(located, "adgroup_id"),
                        TIMESTAMP: to_timestamps(located, "time_stamp"),
                        LABEL: frame["clk"].astype(np.float32).to_numpy(), "pid": frame["pid"].to_numpy()})
    for column in (*AD_ITEM_COLUMNS, *AD_USER_COLUMNS):
        if column in frame.columns:
            log[column] = frame[column].to_numpy()
    if "price" in frame.columns:
        log["price"] = to_numbers(located, "price", integer=False, allow_empty=True)
    if has_sequence:
        log["click_sequence"] = split_lists(frame["click_sequence"], "^").map(lambda ids: [int(i) for i in ids if i.isdigit()])
    return log


def _read_raw(folder: Path):
    samples = read_frame(folder / "raw_sample.csv", required=("user", "time_stamp", "adgroup_id", "pid", "clk"))
    samples.frame = samples.frame.rename(columns={"user": "userid"})
    log = _ad_log(samples, has_sequence=False)
    ads = read_frame(folder / "ad_feature.csv", required=("adgroup_id",))
    ad_ids = to_numbers(ads, "adgroup_id")
    ads.frame["price"] = to_numbers(ads, "price", integer=False, allow_empty=True)
    profiles = read_frame(folder / "user_profile.csv", required=("userid",))
    user_ids = to_numbers(profiles, "userid")
    for located, keys, what in ((ads, ad_ids, "adgroup_id"), (profiles, user_ids, "userid")):
        dupes = pd.Index(keys).duplicated()
        if dupes.any():
            row = int(np.flatnonzero(dupes)[0])
            raise DataError(f"{located.where(row)}: {what} {keys[row]} appears twice")
    items = attribute_table(ad_ids, ads.frame, [*AD_ITEM_COLUMNS, "price"], ITEM)
    users = attribute_table(user_ids, profiles.frame, AD_USER_COLUMNS, USER)
    # A left join: samples of unknown ads or users keep empty attributes (out of vocabulary).
    items = items.reindex(items.index.union(pd.Index(np.unique(log[ITEM]))))
    users = users.reindex(users.index.union(pd.Index(np.unique(log[USER]))))
    items.index.name, users.index.name = ITEM, USER
    return log, users, items, False, [folder / n for n in AD_RAW_FILES]


def load_taobao_ad(folder: str | Path, protocol: ProtocolConfig | None = None,
                   cache_dir: str | Path | None = None) -> PreparedData:
    protocol = protocol or ProtocolConfig()
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder (taobao-ad needs the raw or the joined Tianchi 56 files)")
    candidates = [folder / n for n in (*AD_RAW_FILES, *AD_JOINED_FILES) if (folder / n).exists()]
    key = "taobao-ad-" + cache_key(LOADER_VERSION, [file_fingerprint(p) for p in candidates], protocol.__dict__)

    def build() -> PreparedData:
        log, users, items, has_sequence, used = read_taobao_ad(folder)
        return build_samples(
            log, users, items, _ad_features(), protocol, dataset="taobao-ad",
            sequence_column="click_sequence" if has_sequence else None,
            meta={"dataset_label": "Taobao display ads (Tianchi 56)" + (" sample" if "sample" in used[0].name else ""),
                  "files": [str(p) for p in used],
                  "sequence": "click_sequence column" if has_sequence else "built from the log's clicks"},
        )

    return cached(Path(cache_dir) if cache_dir else None, key, build)
