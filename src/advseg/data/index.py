"""The SliceIndex: one row per slice, the same columns for every data source.

Every source (the Kaggle UW-Madison layout, NIfTI volumes, the synthetic phantom, which is written
in the Kaggle layout) produces this one table; everything after it is source-blind. Columns:

    id          case{N}_day{M}_slice_{XXXX}
    case, day   ints
    scan        case{N}_day{M}
    slice       int, from 1 within a scan
    image_path  str, the PNG file or the NIfTI volume
    image_z     axial index in a volume; -1 for one-slice PNG files
    width, height        pixels
    spacing_w, spacing_h mm
    <class>...  one column per class: the Kaggle RLE of its mask ('' when empty)

``index.attrs["classes"]`` lists the class columns in order.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pandas as pd

from advseg.errors import UserError

BASE_COLUMNS = (
    "id",
    "case",
    "day",
    "scan",
    "slice",
    "image_path",
    "image_z",
    "width",
    "height",
    "spacing_w",
    "spacing_h",
)

#: The UW-Madison classes, in the Kaggle ``class`` order.
UWMGI_CLASSES = ("large_bowel", "small_bowel", "stomach")

ID_PATTERN = re.compile(r"^case(\d+)_day(\d+)_slice_(\d+)$")
SCAN_PATTERN = re.compile(r"^case(\d+)_day(\d+)$")

Source = Literal["auto", "uwmgi", "nifti"]


def slice_id(case: int, day: int, slice_number: int) -> str:
    """The Kaggle id of a slice, e.g. ``case123_day20_slice_0001``."""
    return f"case{case}_day{day}_slice_{slice_number:04d}"


def make_index(rows: pd.DataFrame, classes: list[str] | tuple[str, ...]) -> pd.DataFrame:
    """Put ``rows`` into SliceIndex form: columns in order, types fixed, sorted by scan and slice.

    Args:
        rows: a frame holding every column of the SliceIndex.
        classes: the class columns, in order.
    """
    columns = [*BASE_COLUMNS, *classes]
    index = rows[columns].copy()
    for col in ("case", "day", "slice", "image_z", "width", "height"):
        index[col] = index[col].astype("int64")
    for col in ("spacing_w", "spacing_h"):
        index[col] = index[col].astype("float64")
    for col in ("id", "scan", "image_path", *classes):
        index[col] = index[col].fillna("").astype(str)
    index = index.sort_values(["case", "day", "slice"], kind="stable").reset_index(drop=True)
    index.attrs["classes"] = list(classes)
    return index


def index_classes(index: pd.DataFrame) -> list[str]:
    """The class columns of a SliceIndex (from ``attrs``, else every non-base column)."""
    classes = index.attrs.get("classes")
    if classes:
        return list(classes)
    return [c for c in index.columns if c not in BASE_COLUMNS]


def detect_source(path: Path) -> Literal["uwmgi", "nifti"]:
    """Which reader a data directory needs: ``uwmgi`` (train.csv) or ``nifti`` (imagesTr/)."""
    if not path.exists():
        raise UserError(f"{path}: no such data directory")
    if not path.is_dir():
        raise UserError(f"{path}: not a directory (expected a data set directory)")
    if (path / "train.csv").exists():
        return "uwmgi"
    if (path / "imagesTr").is_dir():
        return "nifti"
    raise UserError(
        f"{path}: no train.csv (Kaggle UW-Madison layout) and no imagesTr/ (NIfTI layout) found"
    )


@dataclass
class Exclusions:
    """What a reader left out of the index, and why (nothing is dropped silently).

    Attributes:
        listed: the scans the exclusion list named.
        scans: excluded scans that were present, with their slice counts.
        skipped: slice id -> reason, for slices skipped as unreadable (only with
            ``skip_unreadable``).
        unlabelled: image files with no row in the label table (not indexed).
        unmapped: NIfTI label value -> voxels holding it, for values the label mapping lacks
            (made background).
        unmapped_volumes: the names of the label volumes holding such values.
    """

    listed: tuple[str, ...] = ()
    scans: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    unlabelled: int = 0
    unmapped: dict[int, int] = field(default_factory=dict)
    unmapped_volumes: list[str] = field(default_factory=list)

    @property
    def excluded_slices(self) -> int:
        return sum(self.scans.values())

    def unmapped_line(self) -> str:
        """The label values the mapping lacks, with their voxel counts, in one line."""
        values = ", ".join(f"{v} ({voxels(n)})" for v, n in sorted(self.unmapped.items()))
        names = self.unmapped_volumes
        shown = ", ".join(names[:5]) + (f", ... {len(names) - 5} more" if len(names) > 5 else "")
        return (
            f"label values not in the label mapping, made background: {values}, in "
            f"{len(names)} volume{'s' * (len(names) != 1)} ({shown}); name them in --labels, "
            "or refuse such data with --strict-labels"
        )

    def lines(self) -> list[str]:
        """Human-readable summary lines (the CLI prints them)."""
        out = []
        if self.listed:
            absent = [s for s in self.listed if s not in self.scans]
            text = ", ".join(f"{s} ({n} slices)" for s, n in self.scans.items()) or "none present"
            out.append(
                f"excluded scans: {len(self.scans)} of {len(self.listed)} listed, "
                f"{self.excluded_slices} slices: {text}"
                + (f"; not in the data: {', '.join(absent)}" if absent else "")
            )
        if self.skipped:
            out.append(f"skipped unreadable slices: {len(self.skipped)}")
            out += [f"  {k}: {v}" for k, v in list(self.skipped.items())[:10]]
            if len(self.skipped) > 10:
                out.append(f"  ... and {len(self.skipped) - 10} more")
        if self.unlabelled:
            out.append(f"image files without labels (not indexed): {self.unlabelled}")
        if self.unmapped:
            out.append(self.unmapped_line())
        return out


def voxels(count: int) -> str:
    """``1 voxel``, ``2 voxels``."""
    return f"{count} voxel{'s' * (count != 1)}"


@dataclass
class IndexSummary:
    """Counts that describe a SliceIndex (what ``advseg data info`` prints)."""

    slices: int
    scans: int
    cases: int
    classes: list[str]
    with_mask: float  # fraction of slices with at least one non-empty mask
    class_fraction: dict[str, float]  # fraction of slices where each class is present
    sizes: dict[str, int]  # "WxH" -> slices
    exclusions: Exclusions


def summarize_index(index: pd.DataFrame, exclusions: Exclusions | None = None) -> IndexSummary:
    """Counts of slices, scans, cases, masks and sizes of ``index`` (no image is read)."""
    classes = index_classes(index)
    present = index[classes].ne("") if classes else pd.DataFrame(index=index.index)
    sizes = (index["width"].astype(str) + "x" + index["height"].astype(str)).value_counts()
    n = max(len(index), 1)
    return IndexSummary(
        slices=len(index),
        scans=int(index["scan"].nunique()),
        cases=int(index["case"].nunique()),
        classes=classes,
        with_mask=float(present.any(axis=1).sum() / n) if classes else 0.0,
        class_fraction={c: float(present[c].sum() / n) for c in classes},
        sizes={str(k): int(v) for k, v in sizes.items()},
        exclusions=exclusions or Exclusions(),
    )
