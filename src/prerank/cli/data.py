"""`prerank data ...`: look at a dataset before training on it."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from prerank.cli.common import user_errors

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Validate and summarise datasets.")


@app.command()
def check(config: Path = typer.Argument(..., help="a dataset YAML (see README, 'Your own data')"),
          as_json: bool = typer.Option(False, "--json", help="print the summary as JSON")) -> None:
    """Validate an own-data YAML and the files it names; print a summary or the first error."""
    from prerank.data.owndata import check_own_data

    with user_errors():
        summary = check_own_data(config)
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    typer.echo(f"{config}: OK  ({summary['dataset']}, {summary['feedback']})")
    for key in ("rows", "users", "items", "catalogue_items", "positives", "positive_rate", "time_range"):
        typer.echo(f"  {key:16s} {summary[key]}")
    if "grades" in summary:
        typer.echo(f"  {'grades':16s} {summary['grades']}")
    seq = summary["sequence_lengths"]
    typer.echo(f"  {'sequence':16s} {seq['source']}" + (f": mean {seq['mean']}, median {seq['median']}, max {seq['max']}, "
                                                     f"empty {seq['empty_fraction']:.1%}" if "mean" in seq else ""))
    for side, features in summary["features"].items():
        described = [f"{f['name']} ({f['kind']}" + (f", {f['distinct_values']} values" if "distinct_values" in f else "") + ")"
                     for f in features]
        typer.echo(f"  {side + ' features':16s} {len(features)}: {', '.join(described) or '-'}")
    for note in summary["notes"]:
        typer.secho(f"  note: {note}", fg=typer.colors.YELLOW)
