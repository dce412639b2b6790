"""The report's "Example slices" section: panels drawn from the examples saved beside the records.

The examples files are a run's (:mod:`advseg.runs.examples`); which saved slices a panel shows is
:func:`advseg.report.figures.panel_rows`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from advseg.report import figures, tables
from advseg.report.html import Section
from advseg.runs.examples import load_examples
from advseg.runs.names import file_stem


def panel_section(
    writer: Any,
    run_dir: Path,
    records: pd.DataFrame,
    protocol: str,
    classes: list[str],
    eps: float,
) -> Section:
    """The report's "Example slices" section: the saved examples at ``eps``, one panel per model
    and attack, drawn for the attack's strongest loss (highest Attack Success). A model trained
    at several seeds shows its lowest seed's panels (the seed in the title; the strongest loss
    and its AS are that seed's); ``examples/`` holds every seed's. ``records``: the white-box
    records at ``eps``; ``writer``: the report's writer."""
    section = Section(f"Example slices (eps {eps:g})")
    saved: dict[str, list[tuple[str, int | None, dict]]] = {}
    for file in sorted((run_dir / "examples").glob("*.npz")):
        examples = load_examples(file)
        cell = examples["cell"]
        if cell.get("fold", 0) != 0:  # cross-validated: fold 0's panels (its title says so)
            continue
        if abs(cell["eps"] - eps) < 1e-12 and len(examples.get("slice_ids", [])):
            saved.setdefault(cell["model"], []).append((cell["attack"], cell.get("seed"), examples))
    several = []
    for model, model_records in records.groupby("model", sort=False):
        seeds = sorted({seed for _, seed, _ in saved.get(model, []) if seed is not None})
        shown = seeds[0] if seeds else None
        if len(seeds) > 1:
            several.append(f"{model}: seed {shown} of {', '.join(map(str, seeds))}")
        if shown is not None:
            model_records = model_records[model_records["seed"] == shown]
        rows = tables.cells_table(model_records, protocol)
        for attack, seed, examples in saved.get(model, []):
            losses = rows[(rows["attack"] == attack) & rows["loss"].isin(examples["losses"])]
            if seed != shown or losses.empty:
                continue
            strongest = losses.sort_values("attack_success", ascending=False).iloc[0]
            who = model if seed is None else f"{model} (training seed {seed})"
            if examples["cell"].get("fold") is not None:
                who += " (fold 0's model on its test cases)"
            title = (
                f"{who}: {attack.upper()} eps {eps:g}, loss {strongest['loss']} "
                f"(the strongest; AS {strongest['attack_success']:.3f})"
            )
            figure = figures.example_panel(examples, strongest["loss"], classes, title)
            name = f"panel_{file_stem(model)}_{file_stem(attack)}"
            section.blocks.append(writer.figure(name, figure, title))
    if several:
        section.blocks.append(
            writer.note(
                "Models trained at several seeds show one seed's panels (the lowest; "
                f"examples/ holds every seed's): {'; '.join(several)}."
            )
        )
    missing = [m for m in records["model"].unique() if m not in saved]
    if missing:
        section.blocks.append(
            writer.note(
                f"No saved example slices at eps {eps:g} for {', '.join(map(str, missing))} in "
                f"{run_dir / 'examples'}: panels need a run with evaluation.examples > 0."
            )
        )
    return section
