"""The paper's Table II in a terminal: the one renderer ``evaluate``, ``report`` and ``run`` use."""

from __future__ import annotations

import pandas as pd
from rich import box
from rich.table import Table

from advseg.attacks.sea import WORST_CASE_LOSS
from advseg.data.location import phantom_note


def table_ii(cells: pd.DataFrame, protocol: str, locations: list[str] | None = None) -> list[Table]:
    """One table per (attack, eps) in the paper's layout: model, params, clean DSC, the
    adversarial DSC under each loss, then the Attack Success under each loss.

    An ensemble attack's worst case (``sea``, loss ``worst-case``) is shown as one more column,
    named after the attack, beside each other attack's losses at the same eps (the paper's FGSM
    columns with the reliable worst case beside them); at an eps no other attack ran, it has a
    table of its own.

    Args:
        cells: rows of :func:`advseg.stats.summary.summarize_cells` (``dsc_clean``, ``dsc_adv``,
            ``as`` per (model, attack, loss, eps)); the numbers are shown, never recomputed.
        protocol: the Dice protocol they were computed with (for the title).
        locations: the data sets they were computed on (``synthetic`` or paths); the title says
            ``data: synthetic phantom`` where the phantom is among them.
    """
    worst = cells["loss"] == WORST_CASE_LOSS
    beside, plain = cells[worst].assign(loss=cells.loc[worst, "attack"]), cells[~worst]
    groups = list(plain.groupby(["attack", "eps"], sort=False))
    alone = beside[~beside["eps"].isin(plain["eps"])]
    groups += list(alone.groupby(["attack", "eps"], sort=False))
    tables = []
    for (attack, eps), cell in groups:
        extra = beside[(beside["eps"] == eps) & (beside["attack"] != attack)]
        if not extra.empty:
            attack = f"{attack} (+ {', '.join(dict.fromkeys(extra['attack']))})"
            cell = pd.concat([cell, extra], ignore_index=True)
        tables.append(_table(cell, attack, eps, protocol, phantom_note(locations or [])))
    return tables


def _table(cell: pd.DataFrame, attack: str, eps: float, protocol: str, note: str | None) -> Table:
    losses = list(dict.fromkeys(cell["loss"]))
    scale = f" ({eps * 255:.3g}/255)" if eps <= 1 else ""  # above 1: the source's units (HU)
    title = f"Table II: {attack}, eps {eps:g}{scale} (DSC = {protocol} Dice; AS = attack success)"
    if "seeds" in cell.columns:  # a grid with seeds: the mean over training seeds, and its sd
        title += f"; mean ± sd over {int(cell['seeds'].max())} training seeds"
    if note is not None:
        title += f"; {note}"
    table = Table(title=title, box=box.SIMPLE_HEAD, padding=(0, 0))
    headers = ["model", "params", "DSC\nclean", *[f"DSC\n{x}" for x in losses]]
    for column in [*headers, *[f"AS\n{x}" for x in losses]]:
        table.add_column(column, justify="left" if column == "model" else "right", min_width=6)
    for (model, params), rows in cell.groupby(["model", "params"], sort=False):
        by_loss = rows.set_index("loss")
        clean = _number(by_loss, "dsc_clean", by_loss.index[0])
        dsc = [_number(by_loss, "dsc_adv", x) for x in losses]
        success = [_number(by_loss, "as", x) for x in losses]
        table.add_row(str(model), f"{params / 1e6:.2f}M", clean, *dsc, *success)
    return table


def _number(rows: pd.DataFrame, column: str, loss: str) -> str:
    """``rows[column]`` at ``loss`` to 4 places, ``± sd`` beside it when seeds were run."""
    value = rows[column].get(loss)
    if value is None or pd.isna(value):
        return "n/a"
    sd = rows[f"{column}_sd"].get(loss) if f"{column}_sd" in rows.columns else None
    return f"{value:.4f}" if sd is None or pd.isna(sd) else f"{value:.4f}±{sd:.4f}"
