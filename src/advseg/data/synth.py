"""A synthetic abdominal-MRI phantom, written in the Kaggle UW-Madison layout.

It stands in for the real data set wherever that cannot be downloaded (tests, the demo, CI), and
goes through exactly the same reader. Each case is one "patient" with its own body and organ
layout; each of its scans ("days") moves and rescales that layout a little; within a scan the
anatomy changes smoothly from slice to slice:

- body outline with a subcutaneous fat ring, back muscles and a spine;
- stomach: a large ellipse high on the patient's left (image right), in the upper slices, grey
  fluid under a black air cap inside a dark wall;
- large bowel: a frame around the abdomen (ascending and descending colon as round
  cross-sections, the transverse colon as a band in upper slices), dark content with a bright wall;
- small bowel: bright loops in the centre that drift from slice to slice;
- a smooth multiplicative bias field, texture and noise; 16-bit output (max 6k to 16k).

About half of the slices (the lowest and highest of each scan) show no organ, as in the real set
(43 % with a mask); masks may overlap. Image sizes cycle through the real ones (W x H): 266x266,
360x310, 276x276, 234x234. Days are numbered from 1, so the default exclusion list
(``case7_day0``, ``case81_day30``) never removes a synthetic scan. The same seed gives the same
files, byte for byte.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from advseg.atomic import atomic_dir
from advseg.data.index import UWMGI_CLASSES, slice_id
from advseg.data.rle import rle_encode
from advseg.errors import UserError

#: Real image sizes (W, H) with their pixel spacing in mm.
SIZES = ((266, 266, 1.50), (360, 310, 1.50), (276, 276, 1.63), (234, 234, 1.50))
#: Case i gets SIZES[SIZE_CYCLE[i % 8]]: mostly 266x266, then 360x310, as in the real set.
SIZE_CYCLE = (0, 1, 0, 2, 0, 1, 0, 3)


MARK = ".advseg-synth"
"""The file every synthetic data set holds: ``--overwrite`` replaces only a directory marked so."""


def check_replaceable(out: Path, overwrite: bool) -> None:
    """Refuse to write a synthetic set over a non-empty ``out``; with ``overwrite``, allow it
    only where ``out`` is one advseg wrote (its :data:`MARK` file, or an older synthetic CT
    set's ``dataset.json`` name), never over a directory of the user's own files."""
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not overwrite:
        raise UserError(f"{out}: exists and is not empty (choose another --out or --overwrite)")
    if not (out / MARK).is_file() and not _older_synthetic_ct(out):
        raise UserError(
            f"{out}: --overwrite replaces only a synthetic data set advseg wrote (marked by its "
            f"{MARK} file); this directory holds other files: choose another --out"
        )


def mark(folder: Path, kind: str) -> None:
    """Write the :data:`MARK` file of a synthetic set of ``kind`` (phantom, nifti)."""
    (folder / MARK).write_text(
        f"advseg synthetic data set ({kind}): `advseg data synth --overwrite` may replace it\n"
    )


def _older_synthetic_ct(out: Path) -> bool:
    """A synthetic CT set written before the mark: its three entries and its dataset.json name."""
    import json

    if {p.name for p in out.iterdir()} != {"imagesTr", "labelsTr", "dataset.json"}:
        return False
    try:
        name = json.loads((out / "dataset.json").read_text(encoding="utf-8")).get("name")
    except (OSError, ValueError, AttributeError):
        return False
    return name == "advseg synthetic abdominal CT"


@dataclass
class SynthSummary:
    """What :func:`write_synthetic` wrote."""

    path: Path
    cases: int
    scans: int
    slices: int
    with_mask: int


def write_synthetic(
    out: str | Path,
    cases: int = 8,
    scans: int = 2,
    slices: int = 64,
    seed: int = 0,
    overwrite: bool = False,
    workers: int = 2,
) -> SynthSummary:
    """Write a synthetic data set in the Kaggle layout (``train.csv`` + ``train/``).

    The directory appears complete or not at all (written beside it, then renamed).

    Args:
        out: the directory to create.
        cases: number of cases (patients).
        scans: scans (days) per case.
        slices: slices per scan.
        seed: random seed; the same seed gives the same files.
        overwrite: replace ``out`` if it is a synthetic set (:func:`check_replaceable`).
        workers: threads writing scans in parallel (the output does not depend on it).
    """
    out = Path(out)
    for name, value in (("cases", cases), ("scans", scans), ("slices", slices)):
        if value < 1:
            raise UserError(f"--{name}: must be at least 1, got {value}")
    check_replaceable(out, overwrite)
    with atomic_dir(out) as tmp:
        rows, with_mask = _write_all(tmp, cases, scans, slices, seed, workers)
        table = pd.DataFrame(rows, columns=["id", "class", "segmentation"])
        # through write_text: pandas' to_csv let a full disk pass without an error
        (tmp / "train.csv").write_text(table.to_csv(index=False))
        mark(tmp, "phantom")
    return SynthSummary(out, cases, cases * scans, cases * scans * slices, with_mask)


# Huffman-only deflate: half the time of level 1 and smaller files on noisy 16-bit images. The
# "sub" row filter alone: libpng otherwise tries all five filters on every row, which costs as
# much as the deflate itself for files within 1 % of the size (the pixels are the same).
_PNG_OPTIONS = [
    cv2.IMWRITE_PNG_COMPRESSION,
    1,
    cv2.IMWRITE_PNG_STRATEGY,
    cv2.IMWRITE_PNG_STRATEGY_HUFFMAN_ONLY,
    cv2.IMWRITE_PNG_FILTER,
    cv2.IMWRITE_PNG_FILTER_SUB,
]

Row = tuple[str, str, str]


@dataclass
class _ScanPlan:
    case: int
    day: int
    width: int
    height: int
    spacing: float
    anatomy: _Anatomy
    rng: np.random.Generator


def _write_all(
    root: Path, cases: int, scans: int, slices: int, seed: int, workers: int
) -> tuple[list[Row], int]:
    plans = []
    for c in range(cases):
        case = c + 1
        width, height, spacing = SIZES[SIZE_CYCLE[c % len(SIZE_CYCLE)]]
        case_rng = np.random.default_rng([seed, case])
        anatomy = _Anatomy.sample(case_rng)
        day = 0
        for _ in range(scans):
            day += int(case_rng.integers(1, 8))
            scan_rng = np.random.default_rng([seed, case, day])
            scan = anatomy.jitter(scan_rng)
            plans.append(_ScanPlan(case, day, width, height, spacing, scan, scan_rng))
    # Scans are independent (each has its own generator), so threads keep the output identical;
    # OpenCV and numpy release the GIL for most of the work.
    with ThreadPoolExecutor(max(1, workers)) as pool:
        results = list(pool.map(lambda plan: _write_scan(root, plan, slices), plans))
    rows = [row for scan_rows, _ in results for row in scan_rows]
    return rows, sum(n for _, n in results)


def _write_scan(root: Path, plan: _ScanPlan, slices: int) -> tuple[list[Row], int]:
    """Write one scan's PNGs; return its train.csv rows and how many slices have a mask."""
    folder = root / "train" / f"case{plan.case}" / f"case{plan.case}_day{plan.day}" / "scans"
    folder.mkdir(parents=True)
    painter = _Painter(plan.width, plan.height, plan.rng)
    rows: list[Row] = []
    with_mask = 0
    for z in range(slices):
        image, masks = painter.paint(plan.anatomy, z / max(slices - 1, 1))
        size = f"{plan.width}_{plan.height}_{plan.spacing:.2f}_{plan.spacing:.2f}"
        ok, buf = cv2.imencode(".png", image, _PNG_OPTIONS)
        if not ok:  # pragma: no cover - OpenCV encodes any uint16 array
            raise RuntimeError(f"cannot encode slice {z + 1} of {folder}")
        # write_bytes: numpy's tofile raises a full disk as an OSError without its errno
        (folder / f"slice_{z + 1:04d}_{size}.png").write_bytes(buf.tobytes())
        sid = slice_id(plan.case, plan.day, z + 1)
        with_mask += bool(any(m.any() for m in masks))
        rows += [(sid, k, rle_encode(m)) for k, m in zip(UWMGI_CLASSES, masks, strict=True)]
    return rows, with_mask


@dataclass
class _Anatomy:
    """One patient's layout, in units of the body half-axes (x right, y down, origin centre)."""

    body: tuple[float, float]  # half-axes as fractions of the image half-size
    fat: float  # subcutaneous fat thickness (fraction of the half-axes)
    stomach: tuple[float, float, float, float, float, float]  # x, y, rx, ry, t0, t1
    colon: tuple[float, float, float, float, float]  # x offset, radius, t0, t1, transverse t0
    loops: np.ndarray  # (L, 4): x, y, radius, phase
    loops_t: tuple[float, float]
    brightness: float

    @staticmethod
    def sample(rng: np.random.Generator) -> _Anatomy:
        u = rng.uniform
        n_loops = int(rng.integers(5, 8))
        loops = np.stack(
            [
                u(-0.3, 0.3, n_loops),
                u(-0.05, 0.35, n_loops),
                u(0.13, 0.19, n_loops),
                u(0, 2 * np.pi, n_loops),
            ],
            axis=1,
        )
        return _Anatomy(
            body=(u(0.80, 0.90), u(0.66, 0.78)),
            fat=u(0.06, 0.11),
            stomach=(
                u(0.28, 0.40),
                u(-0.55, -0.45),
                u(0.26, 0.34),
                u(0.20, 0.27),
                u(0.46, 0.52),
                u(0.78, 0.84),
            ),
            colon=(u(0.58, 0.64), u(0.16, 0.20), u(0.20, 0.27), u(0.66, 0.72), u(0.55, 0.6)),
            loops=loops,
            loops_t=(u(0.23, 0.30), u(0.55, 0.62)),
            brightness=u(0.9, 1.1),
        )

    def jitter(self, rng: np.random.Generator) -> _Anatomy:
        """The same patient on another day: organs shifted and the slab moved a little."""
        loops = self.loops.copy()
        loops[:, :2] += rng.normal(0, 0.03, (len(loops), 2))
        dt = rng.uniform(-0.03, 0.03)
        sx, sy, srx, sry, st0, st1 = self.stomach
        cx, cr, ct0, ct1, ctt = self.colon
        return _Anatomy(
            body=self.body,
            fat=self.fat,
            stomach=(
                sx + rng.normal(0, 0.03),
                sy + rng.normal(0, 0.03),
                srx * rng.uniform(0.9, 1.1),
                sry * rng.uniform(0.9, 1.1),
                st0 + dt,
                st1 + dt,
            ),
            colon=(cx, cr * rng.uniform(0.9, 1.1), ct0 + dt, ct1 + dt, ctt + dt),
            loops=loops,
            loops_t=(self.loops_t[0] + dt, self.loops_t[1] + dt),
            brightness=self.brightness * rng.uniform(0.95, 1.05),
        )


def _bump(t: float, t0: float, t1: float) -> float:
    """0 outside [t0, t1], rising smoothly to 1 in the middle: how big an organ is at slice t."""
    if t <= t0 or t >= t1:
        return 0.0
    return float(np.sin(np.pi * (t - t0) / (t1 - t0)) ** 0.5)


def _span(centre: float, radius: float, n: int) -> slice:
    """The pixel indices (of ``n``) whose frame coordinate ``(i - (n - 1) / 2) / (n / 2)`` lies
    within ``radius`` of ``centre``, plus 3 pixels on each side, clipped to the image."""
    low = (centre - abs(radius)) * (n / 2) + (n - 1) / 2
    high = (centre + abs(radius)) * (n / 2) + (n - 1) / 2
    return slice(max(0, math.floor(low) - 3), min(n, math.ceil(high) + 4))


class _Painter:
    """Paints slices of one scan: fixed image size, bias field and intensity scale."""

    def __init__(self, width: int, height: int, rng: np.random.Generator) -> None:
        self.width, self.height, self.rng = width, height, rng
        ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
        self.x = (xs - (width - 1) / 2) / (width / 2)  # (H, W) in [-1, 1]
        self.y = (ys - (height - 1) / 2) / (height / 2)
        b = rng.uniform(-0.18, 0.18, 3)
        self.bias = (1 + b[0] * self.x + b[1] * self.y + b[2] * (self.x**2 + self.y**2)).astype(
            np.float32
        )
        self.scale = rng.uniform(6000, 16000)
        self.texture = self._smooth_noise(6) * 0.08

    def _smooth_noise(self, cells: int) -> np.ndarray:
        grid = self.rng.normal(0, 1, (cells, cells)).astype(np.float32)
        return cv2.resize(grid, (self.width, self.height), interpolation=cv2.INTER_CUBIC)

    def _ellipse(self, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
        """The (H, W) mask of an ellipse in the [-1, 1] frame of ``x``/``y``.

        Computed on the ellipse's bounding box only (widened by 3 pixels, far beyond float32
        rounding), with the same formula per pixel as on the whole grid: the same mask."""
        mask = np.zeros((self.height, self.width), dtype=bool)
        rows = _span(cy, ry, self.height)
        cols = _span(cx, rx, self.width)
        if rows.start < rows.stop and cols.start < cols.stop:
            x, y = self.x[rows, cols], self.y[rows, cols]
            mask[rows, cols] = ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1
        return mask

    def paint(self, a: _Anatomy, t: float) -> tuple[np.ndarray, list[np.ndarray]]:
        """One slice at axial position ``t`` in [0, 1]: (H, W) uint16 and 3 masks (H, W) bool."""
        bx, by = a.body
        bx *= 1 + 0.04 * np.sin(np.pi * t)
        body = self._ellipse(0, 0.03, bx, by)
        inner = self._ellipse(0, 0.03, bx * (1 - a.fat), by * (1 - 1.3 * a.fat))
        img = np.where(body, 0.85, 0.0).astype(np.float32)  # fat: bright
        img[inner] = 0.40  # soft tissue
        back = self._ellipse(-0.22 * bx, 0.55 * by, 0.2 * bx, 0.22 * by) | self._ellipse(
            0.22 * bx, 0.55 * by, 0.2 * bx, 0.22 * by
        )
        img[back & inner] = 0.25  # muscle: dark
        img[self._ellipse(0, 0.5 * by, 0.1 * bx, 0.12 * by)] = 0.12  # spine

        # Small bowel: bright loops in the centre drifting along the scan.
        sb = np.zeros_like(body)
        size = _bump(t, *a.loops_t)
        if size > 0:
            for lx, ly, lr, phase in a.loops:
                cx = (lx + 0.08 * np.sin(2 * np.pi * t + phase)) * bx
                cy = (ly + 0.08 * np.cos(2 * np.pi * t + phase)) * by
                r = lr * (0.4 + 0.6 * size)
                sb |= self._ellipse(cx, cy, r * bx, r * by * 1.1)
            sb &= inner
            img[sb] = 0.78
        # Large bowel: ascending / descending colon, plus the transverse colon in upper slices.
        lb = np.zeros_like(body)
        cx, cr, ct0, ct1, ctt = a.colon
        size = _bump(t, ct0, ct1)
        if size > 0:
            r = cr * (0.5 + 0.5 * size)
            drift = 0.04 * np.sin(2 * np.pi * t)
            for side in (-1, 1):
                lb |= self._ellipse(side * (cx + drift) * bx, 0.05 * by, r * bx, r * by * 1.2)
            if t > ctt:
                band = (np.abs(self.x) <= (cx + drift) * bx) & (
                    np.abs(self.y + 0.05 * by) <= r * by
                )
                lb |= band
            lb &= inner
            wall = lb & ~cv2.erode(lb.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
            img[lb] = 0.18
            img[wall] = 0.60
        # Stomach: a big fluid-filled ellipse, upper slices, patient's left.
        st = np.zeros_like(body)
        sx, sy, srx, sry, st0, st1 = a.stomach
        size = _bump(t, st0, st1)
        if size > 0:
            r = 0.3 + 0.7 * size
            st = self._ellipse(sx * bx, sy * by, srx * r * bx, sry * r * by) & inner
            wall = st & ~cv2.erode(st.astype(np.uint8), np.ones((7, 7), np.uint8)).astype(bool)
            air = st & (self.y < (sy - 0.45 * sry * r) * by)
            img[st] = 0.62  # gastric fluid
            img[air] = 0.04  # an air cap on top (the patient lies on the back)
            img[wall] = 0.22  # a dark muscular wall

        img = cv2.GaussianBlur(img, (0, 0), 0.8)
        img = img * (1 + self.texture) * self.bias * a.brightness
        noise = self.rng.normal(0, 0.03, (2, self.height, self.width)).astype(np.float32)
        img = np.sqrt((img + noise[0]) ** 2 + noise[1] ** 2)  # Rician magnitude noise
        img = np.clip(img * self.scale / 1.2, 0, 65535).astype(np.uint16)
        return img, [lb, sb, st]
