"""Files written whole or not at all: a temporary sibling first, then a rename into place, so a
reader never sees half a file and a crash leaves the old one."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | Path, payload) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2, default=float))


@contextmanager
def staged_directory(path: str | Path, overwrite: bool = False, enabled: bool = True, resume: bool = False) -> Iterator[Path]:
    """A run's output folder written whole or not at all: yields OUT.partial (emptied first, so a
    killed run's leftovers never mix in), renamed to `path` on success. An existing non-empty
    `path` is an error unless `overwrite`, then it is replaced only once the new run is complete.
    On failure the partial folder stays for inspection and `path` is untouched. With `enabled`
    False (a process that writes nothing, e.g. a non-main rank) the partial path is only yielded.
    With `resume` the partial folder of an interrupted run is kept and continued (and replaces `path`)."""
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    if not enabled:
        yield partial
        return
    if resume:
        if not partial.is_dir():
            raise ValueError(f"{partial}: no interrupted run to resume")
    else:
        if path.exists() and (not path.is_dir() or any(path.iterdir())) and not overwrite:
            raise ValueError(f"{path} already holds a run: give --overwrite to replace it, or another --out")
        if partial.exists():
            shutil.rmtree(partial)
        partial.mkdir(parents=True)
    yield partial
    if path.exists():
        old = path.with_name(path.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(path, old)
        os.replace(partial, path)
        shutil.rmtree(old)
    else:
        os.replace(partial, path)
