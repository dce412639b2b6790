"""Example slices saved beside the records, so that the report can draw panels without a model.

The evaluation engine returns, for a few slices of each cell, numpy arrays
(:class:`advseg.evaluate.CellResult` ``.examples``: ``slice_ids`` ``(N,)``, ``losses`` ``(L,)``,
``image`` ``(N, C, H, W)``, ``mask`` and ``pred_clean`` ``(N, K, H, W)``, ``x_adv``
``(L, N, C, H, W)``, ``pred_adv`` ``(L, N, K, H, W)``). They are stored in one compressed ``.npz``
file per cell with the cell's identity beside them (``cell/model``, ``cell/attack``,
``cell/eps``, and ``cell/seed``, the training seed, in a grid with ``seeds:``), so that the
report finds a model's panels by reading the files rather than by knowing how the runner names
them. Nothing is pickled, and loading refuses pickles.

Which slices: the engine keeps a seeded draw spread over the cases
(:func:`advseg.data.spread_positions`), and the report's panels show :func:`panel_rows` of them,
again spread over cases, so that neither is the first slices of one case.
:func:`panel_section` is the report's section drawing them.
"""

from __future__ import annotations

import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from advseg.atomic import atomic_path
from advseg.data.index import ID_PATTERN
from advseg.data.split import spread_positions
from advseg.errors import UserError
from advseg.report.html import Section

CELL_KEYS = ("model", "attack", "eps")


def save_examples(
    examples: Mapping[str, Any],
    path: str | Path,
    *,
    model: str,
    attack: str,
    eps: float,
    seed: int | None = None,
) -> Path:
    """Write one cell's example arrays to ``path`` (``.npz``) atomically.

    Args:
        examples: name -> array, as :func:`advseg.evaluate.evaluate_cell` returns them.
        path: the file to write; its name should end in ``.npz``.
        model, attack, eps: the cell the examples come from.
        seed: the training seed of the cell's model, in a grid with ``seeds:`` (None: not
            stored).
    """
    path = Path(path)
    arrays = {key: np.asarray(value) for key, value in examples.items()}
    arrays.update({"cell/model": np.asarray(model), "cell/attack": np.asarray(attack)})
    arrays["cell/eps"] = np.asarray(float(eps))
    if seed is not None:
        arrays["cell/seed"] = np.asarray(int(seed))
    for key, array in arrays.items():
        if array.dtype == object:
            raise ValueError(f"example array {key!r} has dtype object; it would need a pickle")
    with atomic_path(path) as tmp, tmp.open("wb") as handle:
        np.savez_compressed(handle, **arrays)
    return path


def load_examples(path: str | Path) -> dict[str, Any]:
    """Read a file written by :func:`save_examples`.

    Returns:
        The arrays by name, and ``"cell"``: ``{"model": str, "attack": str, "eps": float}``, with
        ``"seed": int`` where the file stores a training seed.

    Raises:
        UserError: the file is not a readable ``.npz`` of plain arrays with a cell (naming it).
    """
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise UserError(f"{path}: not a readable examples file ({err})") from None
    missing = [key for key in CELL_KEYS if f"cell/{key}" not in arrays]
    if missing:
        raise UserError(f"{path}: not an examples file (no cell/{', cell/'.join(missing)})")
    arrays["cell"] = {key: arrays.pop(f"cell/{key}").item() for key in CELL_KEYS}
    if "cell/seed" in arrays:
        arrays["cell"]["seed"] = int(arrays.pop("cell/seed").item())
    return arrays


def panel_rows(slice_ids: np.ndarray | list[str], count: int, seed: int = 0) -> np.ndarray:
    """Positions of ``count`` saved example slices for a panel: seeded, spread over the cases
    named in their ids (``case{N}_day{M}_slice_{XXXX}``; an id of another form is its own case)."""
    cases = []
    for slice_id in map(str, slice_ids):
        match = ID_PATTERN.match(slice_id)
        cases.append(f"case{match.group(1)}" if match else slice_id)
    return spread_positions(np.asarray(cases), count, seed)


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
    from advseg.report import figures, tables  # figures draws panel_rows' choice: no cycle

    section = Section(f"Example slices (eps {eps:g})")
    saved: dict[str, list[tuple[str, int | None, dict]]] = {}
    for file in sorted((run_dir / "examples").glob("*.npz")):
        examples = load_examples(file)
        cell = examples["cell"]
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
            title = (
                f"{who}: {attack.upper()} eps {eps:g}, loss {strongest['loss']} "
                f"(the strongest; AS {strongest['attack_success']:.3f})"
            )
            figure = figures.example_panel(examples, strongest["loss"], classes, title)
            name = f"panel_{tables.file_stem(model)}_{tables.file_stem(attack)}"
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
