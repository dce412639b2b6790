"""``advseg report RUN_DIR``: the report of a run, from its records alone (no model needed)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import typer
from rich import box
from rich.console import Console
from rich.table import Table

from advseg.cli.console import console
from advseg.report import Report, write_report
from advseg.report.html import format_table

app = typer.Typer()


def table_ii(report: Report) -> Table:
    """Table II of a report in the paper's layout, compact enough for a terminal.

    The report's numbers, with the columns it adds for bookkeeping (arch, units, excluded) left
    to the HTML page, and the attack and eps shared by every column moved into the title.
    """
    frame = report.table.drop(columns=["arch", "units", "excluded"], errors="ignore")
    suffix = f" eps={report.eps:g}"
    labels = [c[len("DSC ") :] for c in frame.columns if c.startswith("DSC ") and c != "DSC clean"]
    attacks = {label.split(" ")[0] for label in labels}
    prefix = f"{attacks.pop()} " if len(attacks) == 1 else ""
    renamed = {}
    for column in frame.columns:
        short = column.removesuffix(suffix)
        for kind in ("DSC ", "AS "):
            if prefix and short.startswith(kind + prefix):
                short = kind + short[len(kind + prefix) :]
        renamed[column] = short
    title = f"Table II: {prefix.strip().upper() or 'attacks'} at eps {report.eps:g}, "
    title += f"Dice protocol '{report.protocol}'"
    return dataframe_table(frame.rename(columns=renamed), title)


def dataframe_table(frame: pd.DataFrame, title: str) -> Table:
    """A DataFrame as a rich table: 4 decimals, parameters in millions, NaN as n/a."""
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    shown = format_table(frame)
    for i, column in enumerate(shown.columns):
        widest = max((len(v) for v in shown[column]), default=1)
        table.add_column(str(column), justify="left" if i == 0 else "right", min_width=widest)
    for row in shown.itertuples(index=False):
        table.add_row(*row)
    return table


def print_report(report: Report, console: Console) -> None:
    """Table II, what the report could not show, and where it is."""
    console.print(table_ii(report))
    for note in report.notes:
        console.print(f"[yellow]note:[/] {note}", highlight=False)
    console.print(f"report: [bold]{report.html}[/] (also {report.markdown.name}, CSV and PNG)")


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
) -> None:
    """Write a run's report (HTML, Markdown, CSV, PNG) from its records; no model is needed."""
    result = write_report(run_dir, protocol=protocol, eps=eps, out_dir=out)
    print_report(result, console())
