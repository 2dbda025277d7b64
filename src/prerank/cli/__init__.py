"""The `prerank` command line: one Typer app; each module of this package holds one room of commands.

    train       train, evaluate, models, benchmark
    quickstart  quickstart
    data        data check
    cascade     cascade build
    cold        cold-select (COLD's feature-group selection, which retrains)
    serve       export, serve, bench-serve, load-test
    common      the error helper and `--set` parsing every command shares

Command modules import heavy code inside their commands: `prerank serve` must not load the
trainer, and `prerank --help` should not pay for FastAPI.
"""

from __future__ import annotations

import logging
import sys

import typer

from prerank.cli import cascade, cold, data, quickstart, serve, train

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Pre-ranking models for cascade recommender systems.")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is when a record comes (test runners swap it per command)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


@app.callback()
def _log_to_stderr() -> None:
    """The package's info lines (e.g. "reusing cached preprocessing at ...") go to stderr."""
    logger = logging.getLogger("prerank")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)


app.command()(train.train)
app.command()(train.evaluate)
app.command()(train.models)
app.command()(quickstart.quickstart)
app.command()(train.benchmark)
app.command()(serve.export)
app.command()(serve.serve)
app.command("bench-serve")(serve.bench_serve)
app.command("load-test")(serve.load_test)
app.command("cold-select")(cold.cold_select)
app.add_typer(data.app, name="data")
app.add_typer(cascade.app, name="cascade")


def main() -> None:
    app()
