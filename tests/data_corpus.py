"""Helpers for the data tests: a tiny synthetic set and ways to break it.

Each ``break_*`` function damages a copy of a valid Kaggle-layout directory in one way; the error
tests check that the answer is one line naming the file or row.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd

from advseg.data.synth import write_synthetic


def tiny_synthetic(root: Path, cases: int = 2, scans: int = 2, slices: int = 6) -> Path:
    """A small synthetic set (case 1: 266x266, case 2: 360x310)."""
    out = root / "synth"
    write_synthetic(out, cases=cases, scans=scans, slices=slices, seed=3)
    return out


def copy_of(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".advseg-cache"))
    return dst


def first_png(root: Path) -> Path:
    return sorted((root / "train").glob("case*/case*_day*/scans/*.png"))[0]


def edit_csv(root: Path, row: int, column: str, value: str) -> None:
    """Set one cell of train.csv (row counted from 0, header excluded)."""
    table = pd.read_csv(root / "train.csv", dtype=str, keep_default_na=False)
    table.loc[row, column] = value
    table.to_csv(root / "train.csv", index=False)
