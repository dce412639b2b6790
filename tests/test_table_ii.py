"""The terminal Table II shows summarize_cells' numbers, one table per (attack, eps)."""

from __future__ import annotations

import math

import pandas as pd
from rich.console import Console

from advseg.cli.table_ii import table_ii


def _cells() -> pd.DataFrame:
    rows = []
    for attack, eps in [("fgsm", 0.009), ("pgd", 0.03)]:
        for model, params, clean in [("unet", 1_950_000, 0.9396), ("vgg", 18_440_000, 0.91)]:
            for loss, adv in [("bce", 0.9001), ("focal", math.nan)]:
                success = (clean - adv) / clean
                rows.append([model, params, attack, loss, eps, clean, adv, success])
    columns = ["model", "params", "attack", "loss", "eps", "dsc_clean", "dsc_adv", "as"]
    return pd.DataFrame(rows, columns=columns)


def _text(table) -> str:
    console = Console(record=True, width=200)
    console.print(table)
    return console.export_text()


def test_one_table_per_attack_and_eps_with_the_cells_numbers():
    tables = table_ii(_cells(), "per-class")
    assert [t.title for t in tables] == [
        "Table II: fgsm, eps 0.009 (per-class Dice; AS = attack success)",
        "Table II: pgd, eps 0.03 (per-class Dice; AS = attack success)",
    ]
    text = _text(tables[0])
    rows = [line.split() for line in text.splitlines() if line.strip().startswith(("unet", "vgg"))]
    assert rows == [
        ["unet", "1.95M", "0.9396", "0.9001", "n/a", "0.0420", "n/a"],
        ["vgg", "18.44M", "0.9100", "0.9001", "n/a", "0.0109", "n/a"],
    ]


def test_a_loss_missing_for_one_model_is_shown_as_n_a():
    cells = _cells()
    cells = cells[~((cells["model"] == "vgg") & (cells["loss"] == "bce"))]
    text = _text(table_ii(cells, "paper")[0])
    vgg = next(line.split() for line in text.splitlines() if line.strip().startswith("vgg"))
    assert vgg == ["vgg", "18.44M", "0.9100", "n/a", "n/a", "n/a", "n/a"]
