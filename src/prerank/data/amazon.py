"""Amazon review datasets: the Beauty 5-core sequences (S3-Rec format) and DIN-style CSVs.

Both are implicit feedback (every logged review is a positive): training gets sampled negatives
(`ProtocolConfig.negatives`, default 4 per positive) and evaluation adds Recall@K / NDCG@K over
the full catalogue and over 100 sampled candidates (`prerank.train.ranking`).

- **S3-Rec format**, e.g. Beauty 5-core (`NAME.txt`: ``user item item ...`` per line in time order,
  ids from 1; `NAME_item2attributes.json`: ``{"item": [attribute, ...]}``, category and brand ids
  mixed): `amazon-beauty` reads `Beauty.*`, `s3rec` the folder's one pair, `s3rec:NAME` a named one.
  The file has no timestamps: an event's position in its user's line is its time, so
  `leave_last_out` (the S3-Rec split) and `temporal` both apply. Features: user id; item id and
  its attribute bag (item side); the behaviour sequence of earlier items.
- **DIN-style CSV** (`user_id,item_id,time,cate_id`, as in torch-rechub's Amazon Electronics
  sample): features user id; item id and category (item side); behaviour sequence.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from prerank.data.pipeline import ITEM, RANKING_EVAL, USER, FeatureSpec, ProtocolConfig, build_samples, implicit_protocol
from prerank.data.readers import attribute_table, read_frame, to_numbers
from prerank.data.schema import Kind, Side
from prerank.data.table import LABEL, TIMESTAMP, DataError, PreparedData, cache_key, cached, file_fingerprint

LOADER_VERSION = 1
ELECTRONICS_FILE = "amazon_electronics_sample.csv"


def read_sequences(path: Path) -> pd.DataFrame:
    """``user item item ...`` lines -> a log (user, item, position as timestamp)."""
    if not path.exists():
        raise DataError(f"{path}: file not found")
    users, items, positions, seen_users = [], [], [], set()
    with open(path, encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) < 2:
                raise DataError(f"{path}, line {line_no}: expected 'user item [item ...]', found {line.strip()[:80]!r}")
            try:
                ids = [int(x) for x in fields]
            except ValueError:
                bad = next(x for x in fields if not x.lstrip("-").isdigit())
                column = "user" if bad == fields[0] else f"item {fields.index(bad)}"
                raise DataError(f"{path}, line {line_no}: {column} is not an integer id: {bad!r}") from None
            if ids[0] in seen_users:
                raise DataError(f"{path}, line {line_no}: user {ids[0]} appears on an earlier line too")
            seen_users.add(ids[0])
            users.extend([ids[0]] * (len(ids) - 1))
            items.extend(ids[1:])
            positions.extend(range(len(ids) - 1))
    if not users:
        raise DataError(f"{path}: no interactions")
    return pd.DataFrame({USER: users, ITEM: items, TIMESTAMP: positions})


def read_item_attributes(path: Path) -> dict[int, list[str]]:
    if not path.exists():
        raise DataError(f"{path}: file not found")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(raw, dict):
        raise DataError(f"{path}: expected an object {{item id: [attribute ids]}}")
    out = {}
    for key, values in raw.items():
        if not str(key).isdigit() or not isinstance(values, list):
            raise DataError(f"{path}: item {key!r}: expected an integer item id mapped to a list of attribute ids")
        out[int(key)] = [str(v) for v in values]
    return out


def _implicit_meta(label: str, **extra) -> dict:
    return {"dataset_label": label, "implicit": True, "ranking_eval": RANKING_EVAL, **extra}


S3REC_ATTRIBUTES_SUFFIX = "_item2attributes.json"


def s3rec_names(data_dir: str | Path) -> list[str]:
    """The NAMEs of a folder's S3-Rec datasets: every `NAME.txt` beside a `NAME_item2attributes.json`."""
    folder = Path(data_dir)
    return sorted(p.name[: -len(S3REC_ATTRIBUTES_SUFFIX)] for p in folder.glob(f"*{S3REC_ATTRIBUTES_SUFFIX}")
                  if (folder / (p.name[: -len(S3REC_ATTRIBUTES_SUFFIX)] + ".txt")).exists())


def load_s3rec(data_dir: str | Path, protocol: ProtocolConfig | None = None, cache_dir: str | Path | None = None,
               name: str | None = None) -> PreparedData:
    """A dataset in the S3-Rec format (`NAME.txt` sequences + `NAME_item2attributes.json`), as published
    for Amazon Beauty, Sports, Toys, Yelp, LastFM: `name` picks the pair, or the folder's only pair is
    used. Runs, metrics and artifacts are labelled with NAME (dataset "s3rec:NAME")."""
    if name is None:
        found = s3rec_names(data_dir)
        if len(found) != 1:
            raise DataError(f"{data_dir}: " + (f"holds several S3-Rec datasets ({', '.join(found)}): name one as --dataset s3rec:NAME"
                                               if found else f"no S3-Rec dataset (NAME.txt beside NAME{S3REC_ATTRIBUTES_SUFFIX})"))
        name = found[0]
    return _load_s3rec_files(data_dir, protocol, cache_dir, name, dataset=f"s3rec:{name}", label=f"{name} (S3-Rec format)")


def load_amazon_beauty(data_dir: str | Path, protocol: ProtocolConfig | None = None,
                       cache_dir: str | Path | None = None) -> PreparedData:
    """Amazon Beauty 5-core as S3-Rec publishes it (`Beauty.txt`, `Beauty_item2attributes.json`)."""
    return _load_s3rec_files(data_dir, protocol, cache_dir, "Beauty", dataset="amazon-beauty", label="Amazon Beauty 5-core")


def _load_s3rec_files(data_dir: str | Path, protocol: ProtocolConfig | None, cache_dir: str | Path | None, name: str,
                      dataset: str, label: str) -> PreparedData:
    protocol = implicit_protocol(protocol, dataset)
    data_dir = Path(data_dir)
    files = (f"{name}.txt", f"{name}{S3REC_ATTRIBUTES_SUFFIX}")
    paths = [data_dir / f for f in files]
    for p in paths:
        if not p.exists():
            raise DataError(f"{p}: file not found ({dataset} needs {' and '.join(files)} in --data-dir)")
    key = f"{dataset.replace(':', '-')}-" + cache_key(LOADER_VERSION, [file_fingerprint(p) for p in paths], protocol.__dict__)

    def build() -> PreparedData:
        log = read_sequences(paths[0])
        attributes = read_item_attributes(paths[1])
        log[LABEL] = np.float32(1.0)
        item_ids = np.unique(log[ITEM])
        items = pd.DataFrame({"attributes": [attributes.get(int(i), []) for i in item_ids]},
                             index=pd.Index(item_ids, name=ITEM))
        users = pd.DataFrame(index=pd.Index(np.unique(log[USER]), name=USER))
        features = [
            FeatureSpec("user_id", Side.USER, Kind.CATEGORICAL),
            FeatureSpec("item_id", Side.ITEM, Kind.CATEGORICAL),
            FeatureSpec("attributes", Side.ITEM, Kind.MULTI_CATEGORICAL),
        ]
        return build_samples(log, users, items, features, protocol, dataset=dataset,
                             meta=_implicit_meta(label, timestamps="position in the user's sequence", source_files=[str(p) for p in paths]))

    return cached(Path(cache_dir) if cache_dir else None, key, build)


def load_din_csv(path: str | Path, protocol: ProtocolConfig | None = None, cache_dir: str | Path | None = None,
                 dataset: str = "amazon-electronics") -> PreparedData:
    """A DIN-style review CSV (`user_id,item_id,time,cate_id`); `path` is the file or its folder."""
    protocol = implicit_protocol(protocol, dataset)
    path = Path(path)
    if path.is_dir():
        path = path / ELECTRONICS_FILE
    if not path.exists():
        raise DataError(f"{path}: file not found")
    key = f"{dataset}-" + cache_key(LOADER_VERSION, file_fingerprint(path), protocol.__dict__)

    def build() -> PreparedData:
        located = read_frame(path, required=("user_id", "item_id", "time", "cate_id"))
        frame = located.frame
        log = pd.DataFrame({USER: to_numbers(located, "user_id"), ITEM: to_numbers(located, "item_id"),
                            TIMESTAMP: to_numbers(located, "time")})
        log[LABEL] = np.float32(1.0)
        items = attribute_table(log[ITEM].to_numpy(), frame, ["cate_id"], ITEM)
        users = pd.DataFrame(index=pd.Index(np.unique(log[USER]), name=USER))
        features = [
            FeatureSpec("user_id", Side.USER, Kind.CATEGORICAL),
            FeatureSpec("item_id", Side.ITEM, Kind.CATEGORICAL),
            FeatureSpec("cate_id", Side.ITEM, Kind.CATEGORICAL),
        ]
        return build_samples(log, users, items, features, protocol, dataset=dataset,
                             meta=_implicit_meta(f"Amazon DIN-style CSV ({path.name})", source_file=str(path)))

    return cached(Path(cache_dir) if cache_dir else None, key, build)
