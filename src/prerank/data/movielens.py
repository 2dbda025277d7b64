"""MovieLens-1M from the standard release folder (``::``-separated, latin-1).

Label: rating > 3 is positive, rating 3 is dropped, rating < 3 is negative (the papers' rule).
Features: user id, gender, age, occupation (user side); movie id, genres (multi-hot), release
year (item side); the behaviour sequence of earlier positively rated movies (user side).
"""

from __future__ import annotations

import gzip
import io
import re
from pathlib import Path

import numpy as np
import pandas as pd

from prerank.data.pipeline import ITEM, USER, FeatureSpec, ProtocolConfig, build_samples
from prerank.data.schema import Kind, Side
from prerank.data.table import GRADE, LABEL, TIMESTAMP, DataError, PreparedData, cache_key, cached, file_fingerprint

ML1M_USERS = 6040
PARTIAL_RATINGS = "ratings-partial-users0001-2999/ratings.dat.gz"
LOADER_VERSION = 2


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="latin-1")
    return open(path, encoding="latin-1")


def read_double_colon(path: Path, names: list[str], numeric: list[str]) -> pd.DataFrame:
    """Parse a ``a::b::c`` file, checking every line has len(names) fields and the numeric ones parse."""
    if not path.exists():
        raise DataError(f"{path}: file not found")
    rows = []
    with _open_text(path) as fh:
        for line_no, line in enumerate(fh, start=1):
            line = line.rstrip("\r\n")
            if not line:
                continue
            fields = line.split("::")
            if len(fields) != len(names):
                raise DataError(
                    f"{path}, line {line_no}: expected {len(names)} '::'-separated fields "
                    f"({'::'.join(names)}), found {len(fields)}: {line[:80]!r}"
                )
            rows.append(fields)
    frame = pd.DataFrame(rows, columns=names)
    for col in numeric:
        frame[col] = _integers(frame[col], col, path)
    return frame


def _integers(raw: pd.Series, column: str, path: Path) -> np.ndarray:
    """A field of every line as int64; the first value that is not an integer (a rating of 4.7) is
    an error naming its line."""
    values = pd.to_numeric(raw, errors="coerce")
    bad = np.flatnonzero((values.isna() | (values != np.round(values))).to_numpy())
    if len(bad):
        raise DataError(f"{path}, line {bad[0] + 1}: field {column!r} is not an integer: {raw.iloc[bad[0]]!r}")
    return values.to_numpy().astype(np.int64)


def read_ratings(path: Path) -> pd.DataFrame:
    """Fast path for the 1M-line ratings file: pandas' C parser over ':' (fields sit at 0, 2, 4, 6)."""
    if not path.exists():
        raise DataError(f"{path}: file not found")
    try:
        frame = pd.read_csv(path, sep=":", header=None, encoding="latin-1", dtype=str, engine="c")
    except pd.errors.ParserError as err:
        raise DataError(f"{path}: malformed ratings line ({err}); expected UserID::MovieID::Rating::Timestamp") from None
    if frame.shape[1] != 7 or frame[[1, 3, 5]].notna().any().any():
        return read_double_colon(path, ["user", "item", "rating", TIMESTAMP], ["user", "item", "rating", TIMESTAMP])
    frame = frame[[0, 2, 4, 6]]
    frame.columns = ["user", "item", "rating", TIMESTAMP]
    for col in frame.columns:
        frame[col] = _integers(frame[col], col, path)
    bad = np.flatnonzero(~frame["rating"].between(1, 5).to_numpy())
    if len(bad):
        raise DataError(f"{path}, line {bad[0] + 1}: rating {frame['rating'].iloc[bad[0]]} outside 1..5")
    return frame


def resolve_ratings_file(data_dir: Path, ratings_file: str | Path | None) -> Path:
    if ratings_file is not None:
        path = Path(ratings_file)
        path = path if path.is_absolute() or path.exists() else data_dir / path
        if not path.exists():
            raise DataError(f"{path}: ratings file not found")
        return path
    for name in ("ratings.dat", "ratings.dat.gz"):
        if (data_dir / name).exists():
            return data_dir / name
    hint = ""
    if (data_dir / PARTIAL_RATINGS).exists():
        hint = f"; a partial copy exists: pass --ratings-file {PARTIAL_RATINGS}"
    raise DataError(f"{data_dir}: no ratings.dat or ratings.dat.gz{hint}")


def load_tables(data_dir: Path, ratings_file: str | Path | None = None) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, Path]:
    data_dir = Path(data_dir)
    ratings_path = resolve_ratings_file(data_dir, ratings_file)
    ratings = read_ratings(ratings_path)
    users = read_double_colon(data_dir / "users.dat", ["user", "gender", "age", "occupation", "zip"], ["user", "age", "occupation"])
    movies = read_double_colon(data_dir / "movies.dat", ["item", "title", "genres"], ["item"])
    users = users.set_index("user")
    movies = movies.set_index("item")
    year = movies["title"].map(lambda t: (m := re.search(r"\((\d{4})\)\s*$", t)) and int(m.group(1)))
    movies["year"] = year.fillna(-1).astype(np.int64)
    movies["genres"] = movies["genres"].map(lambda g: g.split("|") if g else [])
    for frame, key, table, other in ((ratings, "user", users, "users.dat"), (ratings, "item", movies, "movies.dat")):
        missing = ~frame[key].isin(table.index)
        if missing.any():
            row = int(np.flatnonzero(missing.to_numpy())[0])
            raise DataError(f"{ratings_path}, line {row + 1}: {key} id {frame[key].iloc[row]} is not in {other}")
    return ratings, users, movies, ratings_path


def dataset_label(ratings: pd.DataFrame) -> str:
    lo, hi, count = ratings["user"].min(), ratings["user"].max(), ratings["user"].nunique()
    return "ML-1M" if count == ML1M_USERS else f"ML-1M (users {lo}–{hi})"


def load_movielens(
    data_dir: str | Path,
    protocol: ProtocolConfig | None = None,
    ratings_file: str | Path | None = None,
    cache_dir: str | Path | None = None,
) -> PreparedData:
    protocol = protocol or ProtocolConfig()
    data_dir = Path(data_dir)
    ratings_path = resolve_ratings_file(data_dir, ratings_file)
    fingerprint = [file_fingerprint(p) for p in (ratings_path, data_dir / "users.dat", data_dir / "movies.dat") if p.exists()]
    key = "ml-1m-" + cache_key(LOADER_VERSION, fingerprint, protocol.__dict__)

    def build() -> PreparedData:
        ratings, users, movies, path = load_tables(data_dir, ratings_path)
        log = ratings[ratings["rating"] != 3].rename(columns={"rating": GRADE}).copy()
        log[LABEL] = (log[GRADE] > 3).astype(np.float32)
        log = log.rename(columns={"user": USER, "item": ITEM})
        features = [
            FeatureSpec("user_id", Side.USER, Kind.CATEGORICAL),
            FeatureSpec("gender", Side.USER, Kind.CATEGORICAL),
            FeatureSpec("age", Side.USER, Kind.CATEGORICAL),
            FeatureSpec("occupation", Side.USER, Kind.CATEGORICAL),
            FeatureSpec("movie_id", Side.ITEM, Kind.CATEGORICAL),
            FeatureSpec("genres", Side.ITEM, Kind.MULTI_CATEGORICAL),
            FeatureSpec("year", Side.ITEM, Kind.CATEGORICAL),
        ]
        return build_samples(
            log,
            users,
            movies,
            features,
            protocol,
            dataset="ml-1m",
            meta={"dataset_label": dataset_label(ratings), "ratings_file": str(path), "grades": "star rating 1-5"},
        )

    return cached(Path(cache_dir) if cache_dir else None, key, build)
