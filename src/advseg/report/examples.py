"""Example slices saved beside the records, so that the report can draw panels without a model.

The evaluation engine returns, for a few slices of each cell, nested numpy arrays (``x_adv`` and
``pred_adv`` hold one array per attack loss). They are stored flat in one compressed ``.npz`` file
per cell, the nested keys joined with ``/``, with the cell's identity (``cell/model``,
``cell/attack``, ``cell/eps``) stored inside, so that the report finds a model's panels by reading
the files rather than by knowing how the runner names them. Nothing is pickled, and loading refuses
pickles.
"""

from __future__ import annotations

import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from advseg.atomic import atomic_path
from advseg.errors import UserError

SEPARATOR = "/"


def save_examples(
    examples: Mapping[str, Any], path: str | Path, *, model: str, attack: str, eps: float
) -> Path:
    """Write nested example arrays of one cell to ``path`` (``.npz``) atomically.

    Args:
        examples: ``{"slice_ids": (N,), "image": (N, C, H, W), ..., "x_adv": {loss: array}}``.
        path: the file to write; its name should end in ``.npz``.
        model, attack, eps: the cell the examples come from.
    """
    path = Path(path)
    cell = {"model": model, "attack": attack, "eps": float(eps)}
    flat: dict[str, np.ndarray] = {}
    for key, value in {**examples, "cell": cell}.items():
        if isinstance(value, Mapping):
            for inner, array in value.items():
                flat[f"{key}{SEPARATOR}{inner}"] = np.asarray(array)
        else:
            flat[key] = np.asarray(value)
    for key, array in flat.items():
        if array.dtype == object:
            raise ValueError(f"example array {key!r} has dtype object; it would need a pickle")
    with atomic_path(path) as tmp, tmp.open("wb") as handle:
        np.savez_compressed(handle, **flat)
    return path


def load_examples(path: str | Path) -> dict[str, Any]:
    """Read a file written by :func:`save_examples` back into nested arrays.

    The cell's identity comes back as plain values under ``"cell"``: ``{"model": str,
    "attack": str, "eps": float}``.

    Raises:
        UserError: the file is not a readable ``.npz`` of plain arrays (naming it).
    """
    path = Path(path)
    nested: dict[str, Any] = {}
    try:
        with np.load(path, allow_pickle=False) as archive:
            for key in archive.files:
                outer, _, inner = key.partition(SEPARATOR)
                if inner:
                    nested.setdefault(outer, {})[inner] = archive[key]
                else:
                    nested[key] = archive[key]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise UserError(f"{path}: not a readable examples file ({err})") from None
    cell = nested.get("cell", {})
    if set(cell) != {"model", "attack", "eps"}:
        raise UserError(f"{path}: not an examples file (no cell/model, cell/attack, cell/eps)")
    nested["cell"] = {key: value.item() for key, value in cell.items()}
    return nested
