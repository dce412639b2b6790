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
(:func:`advseg.data.spread_positions`), and the report's panels show
:func:`advseg.report.figures.panel_rows` of them, again spread over cases, so that neither is the
first slices of one case. :func:`advseg.report.examples.panel_section` is the report's section
drawing them.
"""

from __future__ import annotations

import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from advseg.atomic import atomic_path
from advseg.errors import UserError

CELL_KEYS = ("model", "attack", "eps")


def save_examples(
    examples: Mapping[str, Any],
    path: str | Path,
    *,
    model: str,
    attack: str,
    eps: float,
    seed: int | None = None,
    fold: int | None = None,
) -> Path:
    """Write one cell's example arrays to ``path`` (``.npz``) atomically.

    Args:
        examples: name -> array, as :func:`advseg.evaluate.evaluate_cell` returns them.
        path: the file to write; its name should end in ``.npz``.
        model, attack, eps: the cell the examples come from.
        seed: the training seed of the cell's model, in a grid with ``seeds:`` (None: not
            stored); fold: its cross-validation fold (None: not stored).
    """
    path = Path(path)
    arrays = {key: np.asarray(value) for key, value in examples.items()}
    arrays.update({"cell/model": np.asarray(model), "cell/attack": np.asarray(attack)})
    arrays["cell/eps"] = np.asarray(float(eps))
    if seed is not None:
        arrays["cell/seed"] = np.asarray(int(seed))
    if fold is not None:
        arrays["cell/fold"] = np.asarray(int(fold))
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
        ``"seed": int`` where the file stores a training seed and ``"fold": int`` a
        cross-validation fold.

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
    for key in ("seed", "fold"):
        if f"cell/{key}" in arrays:
            arrays["cell"][key] = int(arrays.pop(f"cell/{key}").item())
    return arrays
