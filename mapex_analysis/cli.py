"""``mapex-study``: the command line. Thin: parse, call one library function, print.

The CLI owns user-facing output (rich tables, progress bars); the library logs.
"""

from __future__ import annotations

import logging
import sys

import click
from rich.console import Console
from rich.table import Table

console = Console()


def _table(rows: list[dict[str, object]], title: str) -> Table:
    table = Table(title=title)
    if rows:
        for col in rows[0]:
            table.add_column(str(col))
        for row in rows:
            table.add_row(*[f"{v:,}" if isinstance(v, int) else str(v) for v in row.values()])
    return table


@click.group()
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
def main(verbose: int) -> None:
    """Measure how much of a remote sensing foundation model a task needs."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


@main.group("list")
def list_() -> None:
    """List registered modalities or models."""


@list_.command("modalities")
def list_modalities() -> None:
    """Sensors, bands, centre wavelengths and units of every modality."""
    from mapex_analysis.modalities import modality_table

    console.print(_table(modality_table(), "Modalities"))


@list_.command("models")
def list_models() -> None:
    """Registered models with their modalities, parameters and weight source."""
    from mapex_analysis.models.registry import model_table

    console.print(_table(model_table(), "Models"))


def _fail(err: Exception) -> None:
    console.print(f"[bold red]error:[/] {err}", highlight=False, markup=True)
    sys.exit(2)


if __name__ == "__main__":  # pragma: no cover
    main()
