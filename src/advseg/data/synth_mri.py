"""A third synthetic data set: T1-weighted brain MRI volumes, in the Decathlon NIfTI layout.

The synthetic CT (:mod:`advseg.data.synth_nifti`) has fixed Hounsfield units and organs that sit
where anatomy puts them. This set differs in what MRI adds, so that a 3D result measured on both
is less about one toy:

- intensities in arbitrary scanner units (no fixed scale: the loaders z-score MRI per volume),
  with a smooth multiplicative bias field (a random exponentiated polynomial of degree 3 in
  x, y, z, up to about +-35 %) and Rician noise (the magnitude of complex Gaussian noise, as in
  magnitude MR images; the background is noise, not a constant);
- anatomy: a head (scalp, dark skull, CSF, a cortex of grey matter around white matter) with
  three labels of different kinds: ``ventricles`` (paired dark CSF ellipsoids, high contrast),
  ``thalamus`` (paired deep grey-matter ellipsoids, low contrast against white matter) and
  ``lesion`` (one ring-enhancing ellipsoid at a random place in the white matter, in about two
  cases out of three; absent otherwise);
- geometry: near-isotropic voxels (1.0 x 1.0 x 1.2 mm), a square in-plane grid (96 x 96 by
  default), the head an ellipsoid whose cross-section shrinks toward the top and bottom slices.

Files: ``imagesTr/mrbrain_NNN.nii.gz`` (int16) + ``labelsTr/mrbrain_NNN.nii.gz`` (labels 1..3) and
``dataset.json`` (modality MRI, the labels), read by :func:`advseg.data.read_nifti` and
:func:`advseg.data.load_volumes`. The same seed gives the same arrays.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter

from advseg.data.synth_nifti import NiftiSynthSummary, write_decathlon
from advseg.errors import UserError

#: Label value -> structure, as written to ``dataset.json``.
MRI_LABELS = {1: "ventricles", 2: "thalamus", 3: "lesion"}
#: Voxel size in mm (x, y, z).
MRI_SPACING = (1.0, 1.0, 1.2)

# T1-weighted tissue means (arbitrary units).
_SCALP, _SKULL, _CSF, _GREY, _WHITE, _DEEP = 700.0, 120.0, 220.0, 430.0, 620.0, 510.0
_LESION_RIM, _LESION_CORE = 820.0, 300.0


def write_synthetic_mri(
    out: str | Path,
    cases: int = 8,
    slices: int = 48,
    size: tuple[int, int] = (96, 96),
    seed: int = 0,
    overwrite: bool = False,
) -> NiftiSynthSummary:
    """Write ``cases`` synthetic brain MRI volumes with ventricle, thalamus and lesion labels.

    The directory appears complete or not at all (written beside it, then renamed).

    Args:
        out: the directory to create (``imagesTr/``, ``labelsTr/``, ``dataset.json``).
        cases: number of volumes (one per case).
        slices: axial slices per volume (at least 8).
        size: in-plane size (W, H) in voxels (at least 16).
        seed: random seed; the same seed gives the same voxels.
        overwrite: replace ``out`` if it is a synthetic set.
    """
    out = Path(out)
    if cases < 1:
        raise UserError("--cases: must be at least 1")
    if slices < 8:
        raise UserError("--slices: must be at least 8 for --kind mri")
    if min(size) < 16:
        raise UserError("--size: must be at least 16")
    return write_decathlon(
        Path(out), synthetic_mri_volume, cases=cases, slices=slices, size=size, seed=seed,
        overwrite=overwrite, spacing=MRI_SPACING, prefix="mrbrain", kind="mri",
        meta={
            "name": "advseg synthetic brain MRI",
            "description": "Synthetic T1-weighted volumes written by advseg.data.synth_mri.",
            "modality": {"0": "MRI"},
            "labels": {"0": "background", **{str(k): v for k, v in MRI_LABELS.items()}},
        },
    )  # fmt: skip


def synthetic_mri_volume(
    size: tuple[int, int], slices: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """One volume: ``(image int16, label uint8)``, both ``(W, H, Z)`` (NIfTI voxel order)."""
    width, height = size
    x = np.linspace(-1.0, 1.0, width)[:, None, None]
    y = np.linspace(-1.0, 1.0, height)[None, :, None]
    z = np.linspace(-1.0, 1.0, slices)[None, None, :]
    rx, ry, rz = 0.78 + 0.08 * rng.random(), 0.9 + 0.06 * rng.random(), 1.25
    head = (x / rx) ** 2 + (y / ry) ** 2 + (z / rz) ** 2  # < 1 inside the head
    wiggle = gaussian_filter(rng.normal(0.0, 1.0, head.shape), sigma=3.0)
    wiggle *= 0.04 / (wiggle.std() + 1e-8)  # a folded cortex: the grey/white border wanders
    image = np.zeros(head.shape)
    for outer, value in ((1.0, _SCALP), (0.86, _SKULL), (0.76, _CSF), (0.70, _GREY)):
        image = np.where(head < outer**2, value, image)
    image = np.where(head + wiggle < 0.56**2, _WHITE, image)
    label = np.zeros(head.shape, np.uint8)

    def ellipsoid(cx, cy, cz, ax, ay, az):
        return ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 + ((z - cz) / az) ** 2

    tilt = 0.03 * rng.normal()
    for side in (-1.0, 1.0):
        size_v = 0.8 + 0.5 * rng.random()  # ventricles vary most between heads
        vent = ellipsoid(side * 0.09 * rx, -0.08 + tilt, 0.2, 0.05 * size_v * rx / 0.8,
                         0.26 * ry, 0.28) <= 1.0  # fmt: skip
        image = np.where(vent, _CSF, image)
        label = np.where(vent, np.uint8(1), label)
        thal = ellipsoid(side * 0.13 * rx, 0.12 + tilt, -0.05, 0.09 * rx, 0.12 * ry, 0.2) <= 1.0
        thal &= label == 0
        image = np.where(thal, _DEEP, image)
        label = np.where(thal, np.uint8(2), label)
    if rng.random() < 0.67:  # a ring-enhancing lesion somewhere in the white matter
        radius = 0.07 + 0.1 * rng.random()
        for _ in range(20):
            centre = rng.uniform(-0.45, 0.45, 3) * np.array([rx, ry, 0.8 * rz])
            lesion = ellipsoid(*centre, radius, radius * (0.8 + 0.4 * rng.random()), radius * 1.3)
            inside = lesion <= 1.0
            if inside.any() and not (inside & (label > 0)).any():
                image = np.where(inside, np.where(lesion > 0.5, _LESION_RIM, _LESION_CORE), image)
                label = np.where(inside, np.uint8(3), label)
                break
    texture = gaussian_filter(rng.normal(0.0, 1.0, image.shape), sigma=1.0)
    image = np.where(head < 1.0, image + 12.0 * texture / (texture.std() + 1e-8), image)
    image = image * bias_field(x, y, z, rng)
    sigma = 0.035 * _WHITE  # Rician noise: |signal + complex Gaussian|
    real = image + rng.normal(0.0, sigma, image.shape)
    image = np.hypot(real, rng.normal(0.0, sigma, image.shape))
    return np.clip(np.round(image), 0, 32767).astype(np.int16), label


def bias_field(x: np.ndarray, y: np.ndarray, z: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A smooth multiplicative field ``exp(p(x, y, z))``, ``p`` a random polynomial of total
    degree <= 3 (no constant), its values within about ``log 1.35`` over the grid."""
    field = np.zeros(np.broadcast_shapes(x.shape, y.shape, z.shape))
    for powers in itertools.product(range(4), repeat=3):
        if 0 < sum(powers) <= 3:
            field = field + rng.normal() * x ** powers[0] * y ** powers[1] * z ** powers[2]
    field *= np.log(1.35) / (np.abs(field).max() + 1e-8)
    return np.exp(field)
