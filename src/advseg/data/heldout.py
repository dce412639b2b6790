"""The held-out split bound to a checkpoint: its test cases stored, and checked on every later use.

A split recomputed from ``(test_fraction, split_seed)`` is the one the checkpoint was trained
against only while the data holds the same cases: one case added to the data directory after
training shifts the seeded draw, and the recomputed test side then holds cases the model trained
on (issue 25: test cases ``[3]`` at training, ``[3, 4]`` after). So a checkpoint stores its split
(:func:`split_note`: the cases of each side, the test slices' count and a digest of their ids) and
every later use takes its held-out rows from :func:`held_out_rows`:

- the stored test cases' slices, when they are all still there with the same slice ids (a case
  added since is neither trained on nor scored, and said so in one warning line);
- refused in one line when a stored test case is gone or its slices changed;
- for a checkpoint saved before the split was stored, the recomputed split, refused when the data
  no longer has the slice counts the checkpoint recorded (``data.rows``).
"""

from __future__ import annotations

import hashlib
import warnings
from typing import Any

import numpy as np
import pandas as pd

from advseg.data.split import split_cases
from advseg.errors import AdvsegWarning, UserError

SIDES = ("train", "val", "test")


def ids_digest(index: pd.DataFrame, rows: np.ndarray) -> str:
    """SHA-256 of the slice ids of ``rows`` (one per line, in row order)."""
    ids = index["id"].to_numpy()[np.asarray(rows, dtype=np.int64)]
    return hashlib.sha256("\n".join(map(str, ids)).encode()).hexdigest()


def split_note(
    index: pd.DataFrame, train_rows: np.ndarray, val_rows: np.ndarray, test_rows: np.ndarray
) -> dict[str, Any]:
    """What a checkpoint stores of its split (``meta.data.split``).

    Returns:
        ``{"cases": {"train": [...], "val": [...], "test": [...]}, "test_slices": n,
        "test_ids_sha256": hex}``: the sorted case ids of each side, the number of test slices
        and the digest of their ids (:func:`ids_digest`).
    """
    case = index["case"].to_numpy()
    sides = dict(zip(SIDES, (train_rows, val_rows, test_rows), strict=True))
    return {
        "cases": {name: sorted({int(c) for c in case[rows]}) for name, rows in sides.items()},
        "test_slices": len(test_rows),
        "test_ids_sha256": ids_digest(index, test_rows),
    }


def check_split_note(note: Any, where: str) -> None:
    """Refuse a stored split that is not what :func:`split_note` writes (a hand edit)."""
    if not isinstance(note, dict) or not isinstance(note.get("cases"), dict):
        raise UserError(f"{where}: expected {{cases: {{train, val, test}}, ...}}, got {note!r:.80}")
    for side in SIDES:
        cases = note["cases"].get(side)
        if not isinstance(cases, list) or not all(
            isinstance(c, int) and not isinstance(c, bool) for c in cases
        ):
            raise UserError(f"{where}.cases.{side}: expected a list of case numbers")
    if not note["cases"]["test"]:
        raise UserError(f"{where}.cases.test: no held-out case")
    slices = note.get("test_slices")
    if isinstance(slices, bool) or not isinstance(slices, int) or slices < 1:
        raise UserError(f"{where}.test_slices: expected a count of 1 or more, got {slices!r}")
    digest = note.get("test_ids_sha256")
    if not isinstance(digest, str) or len(digest) != 64:
        raise UserError(f"{where}.test_ids_sha256: expected a SHA-256 hex digest")


def held_out_rows(index: pd.DataFrame, data_meta: dict[str, Any], where: str) -> np.ndarray:
    """The rows of ``index`` that the checkpoint described by ``data_meta`` held out.

    Args:
        index: the SliceIndex of the data as it is now.
        data_meta: the checkpoint's ``meta.data`` (``split``, or ``test_fraction``,
            ``split_seed`` and ``rows`` for a checkpoint saved before the split was stored).
        where: the checkpoint, for messages.

    Returns:
        Sorted positional rows: the same test slices as when the checkpoint was trained.

    Raises:
        UserError: the data no longer holds those slices, or the metadata names no split.
    """
    if "split" in data_meta:
        return _stored_rows(index, data_meta["split"], where)
    if "test_fraction" not in data_meta or "split_seed" not in data_meta:
        raise UserError(
            f"{where}: its metadata does not say which cases it held out; use --split all"
        )
    # saved before the split was stored: also before the 2-test-case default (min_test=1)
    _, test = split_cases(index, data_meta["test_fraction"], data_meta["split_seed"], min_test=1)
    counts = data_meta.get("rows")
    if isinstance(counts, dict) and all(isinstance(counts.get(s), int) for s in SIDES):
        then = sum(counts[s] for s in SIDES)
        if then != len(index) or counts["test"] != len(test):
            raise UserError(
                f"{where}: the data changed since training ({len(index)} slices, {then} then); "
                "its split cannot be recomputed, so its test cases may hold training cases "
                "(retrain, or use --split all)"
            )
    return test


def _stored_rows(index: pd.DataFrame, note: Any, where: str) -> np.ndarray:
    check_split_note(note, f"{where}: meta.data.split")
    case = index["case"].to_numpy()
    held = note["cases"]["test"]
    gone = sorted(set(held) - {int(c) for c in case})
    if gone:
        raise UserError(
            f"{where}: held-out case {gone[0]} is no longer in the data ({len(gone)} of "
            f"{len(held)} gone); cannot score the cases it was tested on"
        )
    rows = np.flatnonzero(np.isin(case, held))
    if len(rows) != note["test_slices"] or ids_digest(index, rows) != note["test_ids_sha256"]:
        raise UserError(
            f"{where}: the slices of its held-out cases changed since training ({len(rows)} now, "
            f"{note['test_slices']} then); retrain, or use --split all"
        )
    known = {c for side in SIDES for c in note["cases"][side]}
    new = sorted({int(c) for c in case} - known)
    if new:
        warnings.warn(
            f"{where}: {len(new)} case(s) added since training (e.g. case {new[0]}) are neither "
            f"trained on nor scored; scoring the {len(held)} held-out case(s) it stored",
            AdvsegWarning,
            stacklevel=3,
        )
    return rows
