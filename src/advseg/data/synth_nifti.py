"""A second synthetic data set: abdominal CT volumes in the Medical Segmentation Decathlon layout.

The phantom (:mod:`advseg.data.synth`) is easy: bright, high-contrast MRI organs that FGSM at eps
0.009 barely moves. This set differs on purpose in every respect a model could lean on, so that a
number measured on both says something about attacks rather than about one toy:

- modality and contrast: CT in Hounsfield units (int16, air -1000, fat -100, soft tissue 40-60,
  bone 700+), so after min-max normalisation the organs are low-contrast grey on grey;
- anatomy: liver (large, right of the patient, image left), spleen (small, left), two kidneys
  (paired, posterior, each with a brighter cortex), inside a body with fat, muscle and a spine;
- format: ``imagesTr/abct_NNN.nii.gz`` + ``labelsTr/abct_NNN.nii.gz`` (labels 1..4) and a
  ``dataset.json`` naming the labels (the Decathlon form), read by :func:`advseg.data.read_nifti`
  with no ``--labels`` needed;
- geometry: non-square in-plane size (W x H = 192 x 160 by default), anisotropic voxels
  (0.8 x 0.8 x 2.5 mm), a RAS affine.

Organs are ellipsoids whose centre and radii drift along z with per-case jitter, so slices at the
top and bottom of a volume show no organ (as in real abdominal scans). The same seed gives the
same arrays.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from scipy.ndimage import gaussian_filter

from advseg.atomic import atomic_dir
from advseg.data.synth import check_replaceable, mark
from advseg.errors import UserError

#: Label value -> organ, as written to ``dataset.json``.
NIFTI_LABELS = {1: "liver", 2: "spleen", 3: "kidney_left", 4: "kidney_right"}
#: Voxel size in mm (x, y, z).
SPACING = (0.8, 0.8, 2.5)

# Organ: (centre x, centre y as fractions of the body box, radii x, y in fractions, z centre and
# half-height as fractions of the volume, Hounsfield mean). x runs to the patient's left (RAS).
_ORGANS = {
    "liver": (-0.32, -0.05, 0.32, 0.30, 0.55, 0.28, 60.0),
    "spleen": (0.42, 0.10, 0.13, 0.16, 0.60, 0.18, 48.0),
    "kidney_left": (0.30, 0.38, 0.11, 0.15, 0.40, 0.17, 35.0),
    "kidney_right": (-0.30, 0.40, 0.11, 0.15, 0.36, 0.17, 35.0),
}


@dataclass
class NiftiSynthSummary:
    """What :func:`write_synthetic_nifti` wrote."""

    path: Path
    cases: int
    slices: int
    with_mask: int


def write_synthetic_nifti(
    out: str | Path,
    cases: int = 8,
    slices: int = 40,
    size: tuple[int, int] = (192, 160),
    seed: int = 0,
    overwrite: bool = False,
) -> NiftiSynthSummary:
    """Write ``cases`` synthetic abdominal CT volumes with liver, spleen and kidney labels.

    The directory appears complete or not at all (written beside it, then renamed).

    Args:
        out: the directory to create (``imagesTr/``, ``labelsTr/``, ``dataset.json``).
        cases: number of volumes (one per case).
        slices: axial slices per volume.
        size: in-plane size (W, H) in voxels.
        seed: random seed; the same seed gives the same voxels.
        overwrite: replace ``out`` if it is a synthetic set (:func:`check_replaceable`).
    """
    out = Path(out)
    for name, value in (("cases", cases), ("slices", slices), ("size", min(size))):
        if value < 1 or (name == "size" and value < 16):
            raise UserError(f"--{name}: must be at least {16 if name == 'size' else 1}")
    return write_decathlon(
        out, synthetic_ct_volume, cases=cases, slices=slices, size=size, seed=seed,
        overwrite=overwrite, spacing=SPACING, prefix="abct", kind="nifti",
        meta={
            "name": "advseg synthetic abdominal CT",
            "description": "Synthetic volumes written by advseg.data.write_synthetic_nifti.",
            "modality": {"0": "CT"},
            "labels": {"0": "background", **{str(k): v for k, v in NIFTI_LABELS.items()}},
        },
    )  # fmt: skip


def write_decathlon(
    out: Path,
    volume: Callable[[tuple[int, int], int, np.random.Generator], tuple[np.ndarray, np.ndarray]],
    *,
    cases: int,
    slices: int,
    size: tuple[int, int],
    seed: int,
    overwrite: bool,
    spacing: tuple[float, float, float],
    prefix: str,
    kind: str,
    meta: dict[str, Any],
) -> NiftiSynthSummary:
    """Write ``cases`` volumes made by ``volume(size, slices, rng)`` (case ``k`` from the seed
    ``[seed, k]``) as a Decathlon / nnU-Net raw set: ``imagesTr/`` and ``labelsTr/``
    (``<prefix>_<k:03d>.nii.gz``, the diagonal ``spacing`` affine) and ``dataset.json`` (``meta``
    with ``numTraining`` and ``training``), atomically, marked as advseg's ``kind``."""
    check_replaceable(out, overwrite)
    with atomic_dir(out) as tmp:
        (tmp / "imagesTr").mkdir()
        (tmp / "labelsTr").mkdir()
        affine = np.diag([*spacing, 1.0])
        with_mask = 0
        entries = []
        for case in range(1, cases + 1):
            image, label = volume(size, slices, np.random.default_rng([seed, case]))
            with_mask += int((label.reshape(-1, slices) > 0).any(axis=0).sum())
            name = f"{prefix}_{case:03d}.nii.gz"
            nib.save(nib.Nifti1Image(image, affine), tmp / "imagesTr" / name)
            nib.save(nib.Nifti1Image(label, affine), tmp / "labelsTr" / name)
            entries.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
        meta = {**meta, "numTraining": cases, "training": entries}
        (tmp / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
        mark(tmp, kind)
    return NiftiSynthSummary(out, cases, cases * slices, with_mask)


def synthetic_ct_volume(
    size: tuple[int, int], slices: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """One volume: ``(image int16 HU, label uint8)``, both ``(W, H, Z)`` (NIfTI voxel order)."""
    width, height = size
    x = np.linspace(-1.0, 1.0, width)[:, None, None]
    y = np.linspace(-1.0, 1.0, height)[None, :, None]
    z = np.linspace(0.0, 1.0, slices)[None, None, :]
    body_rx, body_ry = 0.85 + 0.08 * rng.random(), 0.72 + 0.1 * rng.random()
    body = (x / body_rx) ** 2 + (y / body_ry) ** 2 <= 1.0
    inner = (x / (body_rx - 0.08)) ** 2 + (y / (body_ry - 0.08)) ** 2 <= 1.0
    hu = np.full((width, height, slices), -1000.0)
    hu = np.where(body, -100.0, hu)  # subcutaneous fat
    hu = np.where(inner, 20.0, hu)  # muscle and bowel, low contrast
    spine = ((x / 0.1) ** 2 + ((y - 0.55 * body_ry) / 0.1) ** 2 <= 1.0) & np.ones_like(z, bool)
    hu = np.where(spine, 750.0, hu)
    label = np.zeros((width, height, slices), np.uint8)
    for value, organ in NIFTI_LABELS.items():
        cx, cy, rx, ry, zc, zh, mean = _ORGANS[organ]
        cx, cy = cx * body_rx + 0.04 * rng.normal(), cy * body_ry + 0.04 * rng.normal()
        rx, ry = rx * (0.85 + 0.3 * rng.random()), ry * (0.85 + 0.3 * rng.random())
        zc, zh = zc + 0.05 * rng.normal(), zh * (0.85 + 0.3 * rng.random())
        # Radii shrink towards the organ's ends (an ellipsoid); the centre drifts along z.
        taper = np.sqrt(np.clip(1.0 - ((z - zc) / zh) ** 2, 0.0, None))
        drift = 0.05 * np.sin(3.0 * z + rng.uniform(0, 2 * np.pi))
        shape = ((x - cx - drift) / (rx * taper + 1e-6)) ** 2 + (
            (y - cy) / (ry * taper + 1e-6)
        ) ** 2
        organ_mask = (shape <= 1.0) & (taper > 0) & inner
        hu = np.where(organ_mask, mean + 8.0 * rng.normal(), hu)
        if organ.startswith("kidney"):
            hu = np.where(organ_mask & (shape >= 0.55), mean + 120.0, hu)  # enhancing cortex
        label = np.where(organ_mask, np.uint8(value), label)
    texture = gaussian_filter(rng.normal(0.0, 1.0, hu.shape), sigma=(2.0, 2.0, 0.7))
    hu = hu + 25.0 * texture / (texture.std() + 1e-8) + rng.normal(0.0, 12.0, hu.shape)
    hu = np.where(body, hu, -1000.0 + rng.normal(0.0, 5.0, hu.shape))
    return np.clip(np.round(hu), -1024, 3071).astype(np.int16), label
