"""Reading delimited and parquet files with errors that name the file, the line and the column.

Shared by the loaders of the public datasets and of users' own data. Values are read as strings
and converted column by column, so a bad value is reported where it sits instead of turning a
whole column into floats or objects.
"""

from __future__ import annotations

import codecs
import csv
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from prerank.data.table import DataError


class TruncatedLineWarning(UserWarning):
    """The last line of a file was cut mid-row and was dropped."""


class Located:
    """A frame read from `path`, able to say where its row i came from."""

    def __init__(self, frame: pd.DataFrame, path: Path, first_line: int | None) -> None:
        self.frame = frame
        self.path = path
        self.first_line = first_line  # file line of frame row 0 (None: parquet, report row numbers)

    def where(self, row: int) -> str:
        if self.first_line is None:
            return f"{self.path}, row {row + 1}"
        return f"{self.path}, line {row + self.first_line}"


def read_yaml_mapping(path: Path, error: type[ValueError] = DataError, expected: str = "a mapping") -> dict:
    """A YAML file whose top level is a mapping (an empty file is an empty one); `error` names the file."""
    if not path.is_file():
        raise error(f"{path}: file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise error(f"{path}: not valid YAML ({err})") from None
    if not isinstance(raw, dict | None):
        raise error(f"{path}: expected {expected} at the top level")
    return raw or {}


def read_frame(
    path: str | Path,
    names: list[str] | None = None,
    sep: str = ",",
    required: tuple[str, ...] = (),
    drop_truncated_last: bool = False,
    encoding: str = "utf-8",
) -> Located:
    """CSV (header row unless `names` is given, text in `encoding`) or parquet (by suffix) as string
    columns.

    `required` columns must exist and have no empty value. A last line with no final newline that
    has fewer fields than the header, or empty required fields, is a file cut mid-row: with
    `drop_truncated_last` it is dropped with a `TruncatedLineWarning`, otherwise it is an error, as
    is such a row anywhere else.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise DataError(f"{path}: unknown text encoding {encoding!r}") from None
    if path.suffix in (".parquet", ".pq"):
        try:
            frame = pd.read_parquet(path)
        except Exception as err:  # pyarrow raises several types for a corrupt file
            raise DataError(f"{path}: cannot read parquet ({err})") from None
        located = Located(frame, path, None)
    else:
        try:
            frame = pd.read_csv(path, sep=sep, header=None if names else 0, names=names, dtype=str, encoding=encoding,
                                keep_default_na=False, na_values=[""], skipinitialspace=False, engine="c")
        except UnicodeDecodeError:
            raise DataError(_undecodable(path, encoding)) from None
        except pd.errors.EmptyDataError:
            raise DataError(f"{path}: file is empty") from None
        except pd.errors.ParserError as err:
            raise DataError(f"{path}: malformed line ({str(err).strip()})") from None
        frame.columns = [str(c).strip() for c in frame.columns]
        located = Located(frame, path, 1 if names else 2)
        cut = len(frame) and not _ends_with_newline(path)
        if cut:
            fields = _last_line_fields(path, sep, encoding)
            if fields < frame.shape[1]:
                where = f"{located.where(len(frame) - 1)}: last line is cut mid-row ({fields} of {frame.shape[1]} fields, no final newline)"
                if not drop_truncated_last:
                    raise DataError(f"{where}; complete or remove it")
                warnings.warn(f"{where}; dropped", TruncatedLineWarning, stacklevel=2)
                located.frame = frame = frame.iloc[:-1]
                cut = False  # the cut line is gone: the last one left is whole
    missing = [c for c in required if c not in located.frame.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; found {list(located.frame.columns)}")
    if required and len(located.frame):
        empty = located.frame[list(required)].isna().to_numpy()
        bad_rows = np.flatnonzero(empty.any(axis=1))
        if drop_truncated_last and cut and len(bad_rows) and bad_rows[-1] == len(located.frame) - 1:
            warnings.warn(f"{located.where(bad_rows[-1])}: last line is cut mid-row "
                          f"({_raw_line(located.frame, bad_rows[-1])!r}); dropped", TruncatedLineWarning, stacklevel=2)
            located.frame = located.frame.iloc[:-1]
            bad_rows = bad_rows[:-1]
        if len(bad_rows):
            row = int(bad_rows[0])
            column = list(required)[int(np.flatnonzero(empty[row])[0])]
            raise DataError(f"{located.where(row)}: column {column!r} is empty or missing")
    return located


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as fh:
        fh.seek(0, 2)
        if fh.tell() == 0:
            return True
        fh.seek(-1, 2)
        return fh.read(1) == b"\n"


def _last_line_fields(path: Path, sep: str, encoding: str) -> int:
    """How many `sep`-separated fields the file's last line holds (quotes respected)."""
    with open(path, "rb") as fh:
        fh.seek(0, 2)
        size = fh.tell()
        fh.seek(max(0, size - (1 << 16)))
        tail = fh.read()
    last = tail.rsplit(b"\n", 1)[-1].decode(encoding, errors="replace").rstrip("\r")
    return len(next(csv.reader([last], delimiter=sep), []))


def _undecodable(path: Path, encoding: str) -> str:
    """Where the first byte that is not `encoding` text sits in the file, as an error message."""
    decoder = codecs.getincrementaldecoder(encoding)()
    with open(path, "rb") as fh:
        for line_no, line in enumerate(fh, start=1):
            try:
                decoder.decode(line)
            except UnicodeDecodeError as err:
                return (f"{path}, line {line_no}: byte {line[err.start:err.start + 1]!r} at column {err.start + 1} is not "
                        f"{encoding} text; give the file's encoding (own-data YAML: files.encoding, e.g. latin-1)")
    return f"{path}: not {encoding} text; give the file's encoding (own-data YAML: files.encoding)"


def _raw_line(frame: pd.DataFrame, row: int) -> str:
    return ",".join("" if pd.isna(v) else str(v) for v in frame.iloc[row])


def to_numbers(located: Located, column: str, integer: bool = True, allow_empty: bool = False) -> np.ndarray:
    """Column `column` as int64 (or float64); the first value that does not parse, or is infinite,
    is an error."""
    raw = located.frame[column]
    if pd.api.types.is_numeric_dtype(raw) and (not integer or pd.api.types.is_integer_dtype(raw)):
        values = raw.to_numpy()
        if not allow_empty and pd.isna(values).any():
            row = int(np.flatnonzero(pd.isna(values))[0])
            raise DataError(f"{located.where(row)}: column {column!r} is empty")
        if np.isinf(values.astype(np.float64)).any():
            row = int(np.flatnonzero(np.isinf(values.astype(np.float64)))[0])
            raise DataError(f"{located.where(row)}: column {column!r} is not a finite number: {values[row]!r}")
        return values.astype(np.int64 if integer else np.float64)
    values = pd.to_numeric(raw, errors="coerce")
    bad = (values.isna() & (raw.notna() | (not allow_empty))) | np.isinf(values)
    if integer:
        bad |= values.notna() & (values != np.round(values))
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        kind = "an integer" if integer else "a finite number"
        raise DataError(f"{located.where(row)}: column {column!r} is not {kind}: {raw.iloc[row]!r}")
    if integer:
        return values.to_numpy().astype(np.int64)
    return values.to_numpy(dtype=np.float64)


def to_timestamps(located: Located, column: str) -> np.ndarray:
    """Integers (Unix seconds, or any ordered positions; '1000.0' is 1000), or date-time strings
    ('YYYY-MM-DD HH:MM:SS', ISO 8601) -> seconds. A column of numbers with a fraction is an error
    naming its first such row."""
    raw = located.frame[column]
    if pd.api.types.is_numeric_dtype(raw) or pd.to_numeric(raw, errors="coerce").notna().all():
        return to_numbers(located, column)
    parsed = pd.to_datetime(raw, errors="coerce", format="mixed")
    if parsed.isna().any():
        row = int(np.flatnonzero(parsed.isna().to_numpy())[0])
        raise DataError(f"{located.where(row)}: column {column!r} is neither Unix seconds nor a date-time: {raw.iloc[row]!r}")
    return parsed.astype("datetime64[s]").astype(np.int64).to_numpy()


def check_values(located: Located, column: str, allowed: set | list) -> None:
    bad = ~located.frame[column].isin(list(allowed))
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataError(f"{located.where(row)}: column {column!r} has {located.frame[column].iloc[row]!r}; "
                        f"expected one of {sorted(map(str, allowed))}")


def split_lists(values: pd.Series, separator: str) -> pd.Series:
    """'a|b|c' -> ['a', 'b', 'c']; empty -> []. Lists (from parquet) pass through as lists of str."""
    def one(v):
        if isinstance(v, (list, tuple, np.ndarray)):
            return [str(x) for x in v]
        if v is None or (isinstance(v, float) and np.isnan(v)) or v == "":
            return []
        return [x for x in str(v).split(separator) if x != ""]

    return values.map(one)


def attribute_table(keys: np.ndarray, frame: pd.DataFrame, columns: list[str], name: str) -> pd.DataFrame:
    """Attribute table from a joined file: one row per key (the first row seen of it), indexed by key."""
    table = pd.DataFrame({c: frame[c].to_numpy() for c in columns}, index=pd.Index(keys, name=name))
    return table[~table.index.duplicated(keep="first")]
