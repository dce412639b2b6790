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
        "Table II: fgsm, eps 0.009 (2.29/255) (DSC = per-class Dice; AS = attack success)",
        "Table II: pgd, eps 0.03 (7.65/255) (DSC = per-class Dice; AS = attack success)",
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


def test_sea_is_a_column_beside_each_attacks_losses_at_its_eps():
    cells = _cells()
    sea = cells[(cells["attack"] == "fgsm") & (cells["loss"] == "bce")].assign(
        attack="sea", loss="worst-case", dsc_adv=0.5
    )
    alone = sea.assign(eps=0.1)  # an eps no other attack ran: a table of its own
    tables = table_ii(pd.concat([cells, sea, alone], ignore_index=True), "paper")
    assert [t.title.split(" (")[0] for t in tables] == [
        "Table II: fgsm", "Table II: pgd, eps 0.03", "Table II: sea, eps 0.1",
    ]  # fmt: skip
    assert tables[0].title.startswith("Table II: fgsm (+ sea), eps 0.009")
    text = _text(tables[0])
    assert "sea" in text and "worst-case" not in text
    unet = next(line.split() for line in text.splitlines() if line.strip().startswith("unet"))
    assert unet[:6] == ["unet", "1.95M", "0.9396", "0.9001", "n/a", "0.5000"]
    assert "sea" in _text(tables[2]) and len(tables[1].columns) == 7  # pgd's table unchanged


def test_run_without_report_names_the_phantom_in_table_ii(tmp_path):
    """``advseg run`` with ``report: false`` prints Table II itself: its title says the data
    was the synthetic phantom, as the report's caption does."""
    from advseg.cli.experiment import _print_result
    from advseg.experiment import GridResult, RunResult

    (tmp_path / "data.json").write_text('{"locations": ["synthetic"]}')
    result = RunResult(
        run_dir=tmp_path, grid=GridResult(), trained=[], summary=pd.DataFrame(),
        cells=_cells(), protocol="per-class", report=None, seconds=1.0,
    )  # fmt: skip
    console = Console(record=True, width=300)
    _print_result(result, console)
    words = " ".join(console.export_text().split())  # titles wrap to the table's width
    assert words.count("Table II") == 2 and words.count("data: synthetic phantom") == 2

    (tmp_path / "data.json").write_text('{"locations": ["/data/mri"]}')
    console = Console(record=True, width=300)
    _print_result(result, console)
    assert "phantom" not in console.export_text()
