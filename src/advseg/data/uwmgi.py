"""Reader for the Kaggle UW-Madison GI Tract layout (also what the synthetic phantom writes).

Layout (FACTS.md section 3)::

    train.csv                       columns id, class, segmentation; 3 rows per slice
    train/case{N}/case{N}_day{M}/scans/slice_{XXXX}_{W}_{H}_{pw}_{ph}.png   16-bit grey

W and H are the width and height in pixels, pw and ph the pixel spacing in mm. Images are read
without loss (16-bit) and checked against the size their file name states.
"""

from __future__ import annotations

import difflib
import re
import struct
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from advseg.data.index import ID_PATTERN, SCAN_PATTERN, UWMGI_CLASSES, Exclusions, make_index
from advseg.errors import UserError

#: Scans with faulty masks that are commonly dropped (FACTS.md section 3).
DEFAULT_EXCLUDED = ("case7_day0", "case81_day30")
#: The competition host's longer list of faulty scans.
HOST_EXCLUDED = (
    "case61_day14",
    "case9_day27",
    "case7_day0",
    "case81_day30",
    "case43_day18",
    "case138_day0",
    "case34_day20",
    "case43_day26",
    "case124_day19",
    "case144_day15",
    "case83_day11",
    "case13_day0",
)
#: Named exclusion lists, usable wherever a list of scans is expected.
EXCLUDE_LISTS: dict[str, tuple[str, ...]] = {
    "default": DEFAULT_EXCLUDED,
    "host": HOST_EXCLUDED,
    "none": (),
}

# OpenCV would print libpng's complaint about a broken file on stderr; read_png's UserError says
# it in one line instead.
cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_IEND = b"IEND"
MAX_PIXELS = 2**26
"""The most pixels a slice may declare (8192 x 8192): more is refused from the PNG header, before
decoding (a PNG declaring 40000 x 40000 would take gigabytes)."""

FILE_PATTERN = re.compile(r"^slice_(\d+)_(\d+)_(\d+)_(\d+(?:\.\d+)?)_(\d+(?:\.\d+)?)\.png$")
REQUIRED_COLUMNS = ("id", "class", "segmentation")


def resolve_exclusions(exclude: str | Sequence[str]) -> tuple[str, ...]:
    """A named list (``default``, ``host``, ``none``) or explicit scan ids, checked."""
    if isinstance(exclude, str):
        if exclude not in EXCLUDE_LISTS:
            raise UserError(
                f"exclude: unknown list {exclude!r}; valid: {', '.join(EXCLUDE_LISTS)} "
                "or a list of scans like case7_day0"
            )
        return EXCLUDE_LISTS[exclude]
    for scan in exclude:
        if not SCAN_PATTERN.match(scan):
            raise UserError(f"exclude: {scan!r} is not a scan id like case7_day0")
    return tuple(exclude)


def read_uwmgi(
    root: str | Path,
    exclude: str | Sequence[str] = "default",
    skip_unreadable: bool = False,
) -> tuple[pd.DataFrame, Exclusions]:
    """Index a Kaggle-layout data set: one row per slice of ``train.csv``.

    Args:
        root: directory holding ``train.csv`` and ``train/``.
        exclude: scans to leave out: a named list (see :data:`EXCLUDE_LISTS`) or scan ids.
        skip_unreadable: skip (and count) slices whose image file is missing, instead of stopping.

    Returns:
        The SliceIndex and a record of what was excluded or skipped.
    """
    root = Path(root)
    csv = root / "train.csv"
    table = _read_csv(csv)
    listed = resolve_exclusions(exclude)

    parts = table["id"].str.extract(ID_PATTERN)
    bad = parts[0].isna()
    if bad.any():
        i = int(np.argmax(bad.to_numpy()))
        raise UserError(
            f"{csv} line {i + 2}: id {table['id'].iloc[i]!r} does not match "
            "case{N}_day{M}_slice_{XXXX}"
        )
    spaced = table["id"].str.contains(r"\s", regex=True).to_numpy()
    if spaced.any():  # "case1_day0_slice_0001\n" matches the pattern before its newline
        i = int(np.argmax(spaced))
        raise UserError(f"{csv} line {i + 2}: id {table['id'].iloc[i]!r} holds white space")
    long = (parts.apply(lambda column: column.str.len()).max(axis=1) > 9).to_numpy()
    if long.any():  # beyond int64 (a traceback), and no real case, day or slice number
        i = int(np.argmax(long))
        raise UserError(
            f"{csv} line {i + 2}: id {table['id'].iloc[i]!r}: case, day and slice numbers have "
            "at most 9 digits"
        )
    table["case"] = parts[0].astype("int64")
    table["day"] = parts[1].astype("int64")
    table["slice"] = parts[2].astype("int64")
    table["line"] = np.arange(len(table)) + 2
    if (table["class"] == "").any():
        i = int(np.argmax((table["class"] == "").to_numpy()))
        raise UserError(f"{csv} line {i + 2}: empty class")
    dup = table.duplicated(["id", "class"])
    if dup.any():
        i = int(np.argmax(dup.to_numpy()))
        raise UserError(
            f"{csv} line {i + 2}: second row for id {table['id'].iloc[i]!r}, "
            f"class {table['class'].iloc[i]!r}"
        )
    classes = sorted(table["class"].unique())
    _check_class_names(table, classes, csv)

    slices = table.drop_duplicates("id")[["id", "case", "day", "slice", "line"]].copy()
    rows_per_class = table["class"].value_counts()
    if rows_per_class.min() < len(slices):  # a class some slices lack: name its first row
        rare = str(rows_per_class.idxmin())
        line = int(table.loc[table["class"] == rare, "line"].iloc[0])
        raise UserError(
            f"{csv} line {line}: class {rare!r} has rows for {rows_per_class.min()} of "
            f"{len(slices)} slices; every slice needs one row per class"
        )
    masks = table.pivot(index="id", columns="class", values="segmentation")
    missing = masks.isna()
    if missing.to_numpy().any():
        sid, cls = missing.stack().loc[lambda s: s].index[0]
        line = int(slices.loc[slices["id"] == sid, "line"].iloc[0])
        raise UserError(f"{csv} line {line}: id {sid!r} has no row for class {cls!r}")
    slices = slices.join(masks, on="id")
    slices["scan"] = "case" + slices["case"].astype(str) + "_day" + slices["day"].astype(str)

    exclusions = Exclusions(listed=listed)
    excluded = slices["scan"].isin(listed)
    counts = slices.loc[excluded, "scan"].value_counts(sort=False)
    exclusions.scans = {s: int(counts[s]) for s in listed if s in counts}
    slices = slices[~excluded]

    files = _scan_images(root)
    merged = slices.merge(files, on=["scan", "slice"], how="left")
    no_file = merged["image_path"].isna()
    if no_file.any():
        if not skip_unreadable:
            row = merged[no_file].iloc[0]
            raise UserError(
                f"{csv} line {row['line']}: no image for {row['id']} (expected "
                f"train/case{row['case']}/{row['scan']}/scans/slice_{row['slice']:04d}_W_H_pw_ph.png)"
            )
        for sid in merged.loc[no_file, "id"]:
            exclusions.skipped[sid] = "image file missing"
        merged = merged[~no_file]
    labelled = files.merge(
        slices[["scan", "slice"]], on=["scan", "slice"], how="left", indicator=True
    )
    in_excluded = labelled["scan"].isin(listed)
    exclusions.unlabelled = int(((labelled["_merge"] == "left_only") & ~in_excluded).sum())

    if merged.empty:
        raise UserError(f"{csv}: no slices left to use (empty data set after exclusions)")
    merged["image_z"] = -1
    index = make_index(merged, classes)
    index.attrs["label_source"] = str(csv)
    return index, exclusions


def _check_class_names(table: pd.DataFrame, classes: list[str], csv: Path) -> None:
    """Refuse a class name that is a misspelling of a UW-Madison class (``stomack``).

    Any other class name is a data set's own; one within a letter or two of ``stomach`` would
    silently become a fourth class with its own, mostly empty, masks.
    """
    for name in classes:
        if name in UWMGI_CLASSES:
            continue
        close = difflib.get_close_matches(name, UWMGI_CLASSES, n=1, cutoff=0.75)
        if close:
            i = int(np.argmax((table["class"] == name).to_numpy()))
            raise UserError(
                f"{csv} line {i + 2}: class {name!r} is not one of {', '.join(UWMGI_CLASSES)} "
                f"(did you mean {close[0]!r}?)"
            )


def _read_csv(csv: Path) -> pd.DataFrame:
    if not csv.is_file():
        raise UserError(f"{csv}: not found (the Kaggle layout needs train.csv)")
    try:
        table = pd.read_csv(csv, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise UserError(f"{csv}: empty file (expected columns id, class, segmentation)") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise UserError(f"{csv}: cannot parse as CSV ({str(err).splitlines()[0]})") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        raise UserError(
            f"{csv}: missing column(s) {', '.join(missing)}; expected id, class, segmentation "
            f"(found {', '.join(map(str, table.columns))})"
        )
    if table.empty:
        raise UserError(f"{csv}: no rows (empty data set)")
    return table


def _scan_images(root: Path) -> pd.DataFrame:
    """Every slice PNG under ``root/train``, with the size and spacing its name states."""
    records = []
    for path in sorted((root / "train").glob("case*/case*_day*/scans/slice_*.png")):
        match = FILE_PATTERN.match(path.name)
        if match is None:
            raise UserError(f"{path}: file name does not match slice_XXXX_W_H_pw_ph.png")
        num, width, height, pw, ph = match.groups()
        records.append(
            (
                path.parent.parent.name,
                int(num),
                str(path),
                int(width),
                int(height),
                float(pw),
                float(ph),
            )
        )
    columns = ["scan", "slice", "image_path", "width", "height", "spacing_w", "spacing_h"]
    files = pd.DataFrame.from_records(records, columns=columns)
    dup = files.duplicated(["scan", "slice"])
    if dup.any():
        raise UserError(f"{files['image_path'][dup].iloc[0]}: a second image for the same slice")
    return files


def read_png(path: str | Path, width: int, height: int) -> np.ndarray:
    """Read a greyscale PNG without loss and check it has the size its file name states.

    Args:
        path: the PNG file.
        width: expected width W.
        height: expected height H.

    Returns:
        ``(H, W)`` uint16 (or uint8) array.
    """
    data = np.fromfile(path, dtype=np.uint8) if Path(path).is_file() else None
    if data is None:
        raise UserError(f"{path}: image file missing")
    if data.size >= 3 and data[:3].tobytes() == b"\xff\xd8\xff":
        raise UserError(f"{path}: cannot decode image (not a PNG: a JPEG, lossy, named .png)")
    header = data[:24].tobytes()
    if len(header) == 24 and header[:8] == _PNG_SIGNATURE and header[12:16] == b"IHDR":
        declared_w, declared_h = struct.unpack(">II", header[16:24])
        if (declared_h, declared_w) != (height, width):  # before decoding (a bomb, a mix-up)
            raise UserError(
                f"{path}: image is {declared_w}x{declared_h} (WxH) but its file name says "
                f"{width}x{height}"
            )
        if declared_w * declared_h > MAX_PIXELS:
            raise UserError(
                f"{path}: its header declares {declared_w}x{declared_h} pixels, more than "
                f"{MAX_PIXELS:,}; refused before decoding"
            )
    if (
        data.size >= 8
        and data[:8].tobytes() == _PNG_SIGNATURE
        and _IEND not in data[-12:].tobytes()
    ):
        # libpng would print its own complaint on stderr before failing: say it once, here
        raise UserError(f"{path}: cannot decode image (truncated or not a PNG)")
    image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if image is None:
        raise UserError(f"{path}: cannot decode image (truncated or not a PNG)")
    if image.ndim != 2:
        raise UserError(
            f"{path}: expected a single-channel greyscale image, got shape {image.shape}"
        )
    if image.shape != (height, width):
        raise UserError(
            f"{path}: image is {image.shape[1]}x{image.shape[0]} (WxH) but its file name "
            f"says {width}x{height}"
        )
    return image
