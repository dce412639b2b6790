"""Convergence traces of a cell: how the mean loss and Dice moved over an attack's iterations.

An iterative attack built with ``record_trace=True`` keeps, per call, ``(mean loss, mean Dice)``
of its batch after each step (:attr:`advseg.attacks.Attack.trace`). :func:`cell_trace` merges a
cell's batches (weighted by their slices) into one table, which the evaluation writes as
``traces/<cell>.csv`` beside the records and the report draws ("Did the attacks converge?").
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from advseg.atomic import write_text_atomic
from advseg.errors import UserError

TRACE_COLUMNS = ("model", "attack", "eps", "loss", "step", "mean_loss", "mean_dice")
"""One row per (loss, step) of a cell: ``step`` counts from 1; ``mean_loss`` is the attack's loss
to its ``y`` (the target when targeted) and ``mean_dice`` the mean over (slice, class) of the hard
prediction's Dice to ``y`` (1 where both are empty), both after the step and averaged over the
cell's slices."""

BatchTrace = tuple[int, Sequence[Sequence[tuple[float, float]]]]
"""One batch's traces: ``(slices in the batch, per loss the attack's trace)``."""


def cell_trace(
    batches: Sequence[BatchTrace],
    losses: Sequence[str],
    *,
    model: str,
    attack: str,
    eps: float,
) -> pd.DataFrame:
    """The cell's trace table (:data:`TRACE_COLUMNS`): each step's values averaged over the
    batches, weighted by their slices.

    Raises:
        ValueError: batches whose traces differ in length (an attack that stopped early on one
            batch must still report every step).
    """
    rows = []
    weights = np.array([n for n, _ in batches], dtype=np.float64)
    for j, loss in enumerate(losses):
        per_batch = [np.asarray(traces[j], dtype=np.float64) for _, traces in batches]
        if len({len(t) for t in per_batch}) > 1:
            raise ValueError(f"{attack}: traces of different lengths over the batches")
        if not per_batch or len(per_batch[0]) == 0:
            continue
        mean = np.tensordot(weights, np.stack(per_batch), axes=1) / weights.sum()  # (T, 2)
        for step, (value, dice) in enumerate(mean, start=1):
            rows.append((model, attack, float(eps), loss, step, float(value), float(dice)))
    return pd.DataFrame(rows, columns=list(TRACE_COLUMNS))


def write_trace(trace: pd.DataFrame, path: str | Path) -> Path:
    """Write one cell's trace as CSV, atomically."""
    write_text_atomic(Path(path), trace.to_csv(index=False))
    return Path(path)


def read_traces(run_dir: str | Path) -> pd.DataFrame | None:
    """Every ``traces/*.csv`` of ``run_dir`` in one frame, or None when there is none; with
    ``seed`` (the training seed; ``advseg run`` writes it) where the files have it.

    Raises:
        UserError: a trace file that cannot be read or lacks a column (naming the file).
    """
    files = sorted((Path(run_dir) / "traces").glob("*.csv"))
    if not files:
        return None
    frames = []
    for file in files:
        try:
            frame = pd.read_csv(file)
        except (OSError, ValueError) as err:
            raise UserError(f"{file}: not a readable trace file ({err})") from None
        missing = [c for c in TRACE_COLUMNS if c not in frame.columns]
        if missing:
            raise UserError(f"{file}: trace file without column {missing[0]!r}")
        frames.append(frame[[*TRACE_COLUMNS, *(["seed"] if "seed" in frame.columns else [])]])
    return pd.concat(frames, ignore_index=True)
