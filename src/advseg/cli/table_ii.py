"""The paper's Table II in a terminal: the one renderer ``evaluate``, ``report`` and ``run`` use."""

from __future__ import annotations

import pandas as pd
from rich import box
from rich.table import Table


def table_ii(cells: pd.DataFrame, protocol: str) -> list[Table]:
    """One table per (attack, eps) in the paper's layout: model, params, clean DSC, the
    adversarial DSC under each loss, then the Attack Success under each loss.

    Args:
        cells: rows of :func:`advseg.summary.summarize_cells` (``dsc_clean``, ``dsc_adv``, ``as``
            per (model, attack, loss, eps)); the numbers are shown, never recomputed.
        protocol: the Dice protocol they were computed with (for the title).
    """
    tables = []
    for (attack, eps), cell in cells.groupby(["attack", "eps"], sort=False):
        losses = list(dict.fromkeys(cell["loss"]))
        title = f"Table II: {attack}, eps {eps:g} ({protocol} Dice; AS = attack success)"
        table = Table(title=title, box=box.SIMPLE_HEAD, padding=(0, 0))
        headers = ["model", "params", "DSC\nclean", *[f"DSC\n{x}" for x in losses]]
        for column in [*headers, *[f"AS\n{x}" for x in losses]]:
            table.add_column(column, justify="left" if column == "model" else "right", min_width=6)
        for (model, params), rows in cell.groupby(["model", "params"], sort=False):
            by_loss = rows.set_index("loss")
            clean = _number(rows["dsc_clean"].iloc[0])
            dsc = [_number(by_loss["dsc_adv"].get(x)) for x in losses]
            success = [_number(by_loss["as"].get(x)) for x in losses]
            table.add_row(str(model), f"{params / 1e6:.2f}M", clean, *dsc, *success)
        tables.append(table)
    return tables


def _number(value: float | None) -> str:
    return "n/a" if value is None or pd.isna(value) else f"{value:.4f}"
