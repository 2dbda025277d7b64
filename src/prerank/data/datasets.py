"""Datasets by name: what the CLI and the benchmark load."""

from __future__ import annotations

import os
from pathlib import Path

from prerank.data.pipeline import ProtocolConfig
from prerank.data.table import PreparedData

DATASETS = ("ml-1m", "synthetic", "synthetic-ml1m-scale", "amazon-beauty", "s3rec[:NAME]", "amazon-electronics",
            "taobao-userbehavior", "taobao-ad", "PATH.yaml (your own data)")
# Generated data with the shape of the full MovieLens-1M release (6,040 users, 3,706 rated movies,
# about 1M events): for memory and speed measurements at full scale where the real file is absent.
ML1M_SCALE = {"n_users": 6040, "n_items": 3706, "events_per_user": 166}


def default_cache_dir() -> Path:
    return Path(os.environ.get("PRERANK_CACHE_DIR", Path.home() / ".cache" / "prerank"))


def load_dataset(
    name: str,
    data_dir: str | Path | None = None,
    protocol: ProtocolConfig | None = None,
    ratings_file: str | Path | None = None,
    cache_dir: str | Path | None = None,
    seed: int = 0,
) -> PreparedData:
    if name == "ml-1m":
        from prerank.data.movielens import load_movielens

        if data_dir is None:
            raise ValueError("dataset 'ml-1m' needs --data-dir (the folder with users.dat, movies.dat, ratings)")
        return load_movielens(data_dir, protocol, ratings_file, cache_dir)
    if name == "synthetic":
        from prerank.data.synthetic import load_synthetic

        return load_synthetic(protocol, seed=seed)
    if name == "synthetic-ml1m-scale":
        from prerank.data.synthetic import load_synthetic

        return load_synthetic(protocol or ProtocolConfig(), seed=seed, **ML1M_SCALE)
    if str(name).endswith((".yaml", ".yml")):
        from prerank.data.owndata import load_own_data

        return load_own_data(name, protocol, cache_dir)
    if name == "s3rec" or str(name).startswith("s3rec:"):
        from prerank.data.amazon import load_s3rec

        if data_dir is None:
            raise ValueError("dataset 's3rec' needs --data-dir (the folder with NAME.txt and NAME_item2attributes.json)")
        return load_s3rec(data_dir, protocol, cache_dir, str(name).partition(":")[2] or None)
    public = _public_loaders()
    if name in public:
        if data_dir is None:
            raise ValueError(f"dataset {name!r} needs --data-dir (the folder with its files; see README)")
        return public[name](data_dir, protocol, cache_dir)
    raise ValueError(f"unknown dataset {name!r}; choose one of {DATASETS}")


def _public_loaders() -> dict:
    from prerank.data.amazon import load_amazon_beauty, load_din_csv
    from prerank.data.taobao import load_taobao_ad, load_taobao_userbehavior

    return {"amazon-beauty": load_amazon_beauty, "amazon-electronics": load_din_csv,
            "taobao-userbehavior": load_taobao_userbehavior, "taobao-ad": load_taobao_ad}


def load_recorded(source: dict, data_dir: str | Path | None = None, cache_dir: str | Path | None = None) -> PreparedData:
    """Reload the data a checkpoint was trained on, from the `data_source` it records."""
    if not source:
        raise ValueError("no data source recorded; retrain with `prerank train`")
    return load_dataset(source["dataset"], data_dir or source.get("data_dir"), ProtocolConfig.from_recorded(source["protocol"]),
                        source.get("ratings_file"), cache_dir or default_cache_dir())
