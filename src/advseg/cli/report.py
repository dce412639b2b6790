"""``advseg report RUN_DIR``: the report of a run, from its records alone (no model needed)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from advseg.cli.console import console

if TYPE_CHECKING:
    from rich.console import Console

    from advseg.report import Report

app = typer.Typer()


def print_report(report: Report, console: Console) -> None:
    """Table II, what the report could not show, and where it is."""
    from advseg.cli.table_ii import table_ii

    for table in table_ii(report.cells, report.protocol, report.locations):
        console.print(table)
    for line in report.warnings:
        console.print(f"[bold red]warning:[/] {line}", highlight=False)
    for note in report.notes:
        console.print(f"[yellow]note:[/] {note}", highlight=False)
    console.print(f"report: [bold]{report.html}[/] (also {report.markdown.name}, CSV, PNG and SVG)")


@app.command()
def report(
    run_dir: Path = typer.Argument(..., help="A run directory (with records/)."),
    protocol: str | None = typer.Option(
        None, help="Dice protocol: paper, per-class or global [default: the run's]."
    ),
    eps: float | None = typer.Option(
        None, help="eps of Table II [default: the eps with the most results]."
    ),
    out: Path | None = typer.Option(None, help="Output folder [default: RUN_DIR/report]."),
    baseline: str | None = typer.Option(
        None,
        help="Model the corruption errors (CE, mCE) are relative to [default: the run's "
        "corruption_baseline, else the first model trained without a defence, else the first].",
    ),
) -> None:
    """Write a run's report (HTML, Markdown, CSV, PNG) from its records; no model is needed."""
    from advseg.report import write_report

    result = write_report(run_dir, protocol=protocol, eps=eps, out_dir=out, baseline=baseline)
    print_report(result, console())
