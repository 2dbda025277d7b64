"""What every command shares: the one error helper, `--set key=value` parsing, the DDP wrapper."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

import typer
import yaml


def fail(message: str) -> NoReturn:
    """Print `error: message` in red on stderr and exit with status 2 (a usage error, not a crash)."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


@contextmanager
def user_errors(*also: type[Exception]) -> Iterator[None]:
    """Errors a user causes (bad data, config, path) become one line via `fail`, never a traceback."""
    try:
        yield
    except typer.Exit:
        raise
    except (ValueError, FileNotFoundError, *also) as err:  # DataError, ConfigError, ArtifactError are ValueErrors
        fail(str(err))


def parse_overrides(pairs: list[str], flag: str = "--set") -> dict:
    """`--set hidden=[256,128] --set similarity=dot` -> {"hidden": [256, 128], "similarity": "dot"}."""
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise typer.BadParameter(f"{flag} expects key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def data_parallel(command):
    """`prerank.train.distributed.data_parallel`, imported when the command runs: the CLI package
    (which `prerank serve` loads) must not import the trainer's package."""

    @functools.wraps(command)
    def run(*args, **kwargs):
        from prerank.train.distributed import data_parallel as wrap

        return wrap(command)(*args, **kwargs)

    return run
