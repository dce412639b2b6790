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


def nifti_pair(root: Path, image, label, name: str = "vol_001") -> Path:
    """Write one image volume and its label volume in the NIfTI (nnU-Net) layout under ``root``."""
    import nibabel as nib
    import numpy as np

    for folder in ("imagesTr", "labelsTr"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(image), np.eye(4)), root / "imagesTr" / f"{name}.nii.gz")
    nib.save(nib.Nifti1Image(np.asarray(label), np.eye(4)), root / "labelsTr" / f"{name}.nii.gz")
    return root


def damage_cache_entry(entry: Path, how: str) -> None:
    """Break one cache entry the ways a disk, a user or a crash can (see ``DAMAGES``)."""
    import numpy as np

    if how == "truncated images":
        data = (entry / "images.npy").read_bytes()
        (entry / "images.npy").write_bytes(data[: len(data) // 2])
    elif how == "garbage meta":
        (entry / "meta.json").write_text("{not json")
    elif how == "missing masks":
        (entry / "masks.npy").unlink()
    elif how == "object array":
        np.save(entry / "kept.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    elif how == "wrong shape":
        np.save(entry / "images.npy", np.zeros((2, 3), np.float32))
    else:
        raise ValueError(how)


DAMAGES = ("truncated images", "garbage meta", "missing masks", "object array", "wrong shape")
