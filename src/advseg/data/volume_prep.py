"""Volume preprocessing: intensity normalisation chosen by modality, resampling to a spacing.

Pure functions on numpy arrays ``(D, H, W)`` (axial slices first, as nnU-Net's ``(z, y, x)``),
shared by the volume cache (:mod:`advseg.data.volumes`) and its tests.

Normalisation follows nnU-Net v2 (Isensee et al., Nature Methods 2021;
``nnunetv2.preprocessing.normalization.default_normalization_schemes``):

- CT: the data set's foreground intensities (voxels of any class) give the 0.5 and 99.5
  percentiles, the mean and the standard deviation (nnU-Net's dataset fingerprint); every volume
  is clipped to those percentiles and z-scored with that mean and deviation. The model inputs
  then lie in one fixed interval, :attr:`Normalisation.valid_range`, which the attacks take.
- MRI (any other modality): each volume z-scored by its own mean and deviation, no clip; the
  volumes' valid range is then the lowest and highest z-scored value of the data set
  (:func:`advseg.data.volumes.load_volumes`).

Resampling (optional, ``VolumeConfig.spacing``) is trilinear for images and for each class mask
taken as a float and kept where >= 0.5 (pixel centres at ``(i + 0.5) * scale - 0.5``, the
slices' convention). nnU-Net resamples images with third-order splines; trilinear is a convex
combination of voxels, so a resampled CT volume stays inside its valid range.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from advseg.errors import UserError

Modality = Literal["auto", "ct", "mri"]

#: Foreground voxels drawn per volume for the CT statistics (nnU-Net draws 10,000 per case; a
#: larger sample costs little and moves the percentiles less between runs).
FOREGROUND_SAMPLES = 100_000

#: The smallest standard deviation divided by (nnU-Net's 1e-8 guard, for constant volumes).
MIN_STD = 1e-8


#: UW-Madison GI Tract's slice thickness in mm (the data set's description; FACTS.md section 3):
#: the PNG slices name their pixel spacing only.
UWMGI_SLICE_THICKNESS = 3.0


@dataclass
class VolumeConfig:
    """How scans become model inputs for 3D models (``data.volume``; slices ignore it).

    Attributes:
        spacing: resample every volume to this ``(D, H, W)`` voxel size in mm (axial first);
            None keeps each volume's own spacing.
        modality: ``ct`` (clip to the data set's foreground 0.5 / 99.5 percentiles, then
            z-score by its foreground mean and deviation, as nnU-Net), ``mri`` (z-score per
            volume) or ``auto``: ``ct`` when ``dataset.json`` names the first channel CT, else
            ``mri`` (UW-Madison is MRI).
        patch: the training patch ``(D, H, W)``; None is the model's window (``advseg models``).
        foreground: the share of training patches centred on a foreground voxel (nnU-Net: 1/3);
            the rest are drawn uniformly.
        samples: training patches per volume and epoch.
        overlap: the sliding windows' overlap when whole volumes are predicted (validation,
            evaluation); Gaussian blending, as MONAI and nnU-Net.
    """

    spacing: tuple[float, float, float] | None = None
    modality: Modality = "auto"
    patch: tuple[int, int, int] | None = None
    foreground: float = 1 / 3
    samples: int = 4
    overlap: float = 0.5

    def __post_init__(self) -> None:
        if self.spacing is not None:
            self.spacing = tuple(float(s) for s in self.spacing)  # type: ignore[assignment]
            if len(self.spacing) != 3 or not all(0 < s < 100 for s in self.spacing):
                raise UserError(
                    f"data.volume.spacing: {self.spacing} is not 3 sizes in (0, 100) mm"
                )
        if self.modality not in ("auto", "ct", "mri"):
            raise UserError(f"data.volume.modality: {self.modality!r} is not auto, ct, mri")
        if self.patch is not None:
            self.patch = tuple(int(n) for n in self.patch)  # type: ignore[assignment]
            if len(self.patch) != 3 or min(self.patch) < 8:
                raise UserError(f"data.volume.patch: {self.patch} is not 3 sizes >= 8")
        if not 0 <= self.foreground <= 1:
            raise UserError(f"data.volume.foreground: {self.foreground} must lie in [0, 1]")
        if self.samples < 1:
            raise UserError(f"data.volume.samples: {self.samples} must be >= 1")
        if not 0 <= self.overlap < 1:
            raise UserError(f"data.volume.overlap: {self.overlap} must lie in [0, 1)")


@dataclass(frozen=True)
class Normalisation:
    """How raw intensities became model inputs: ``(clip(x, low, high) - mean) / std``.

    Attributes:
        kind: ``ct`` (one set of numbers for the data set) or ``mri`` (per volume: ``mean`` and
            ``std`` are then those of one volume, and there is no clip).
        mean, std: the z-score.
        low, high: the clip, in source units (CT), or None (MRI).
    """

    kind: Literal["ct", "mri"]
    mean: float
    std: float
    low: float | None = None
    high: float | None = None

    @property
    def valid_range(self) -> tuple[float, float] | None:
        """The model inputs' range, ``((low - mean) / std, (high - mean) / std)`` rounded to
        float32 (what the inputs hold) for CT; None (unbounded) for a per-volume z-score."""
        if self.low is None or self.high is None:
            return None
        bounds = [np.float32((v - self.mean) / self.std) for v in (self.low, self.high)]
        return float(bounds[0]), float(bounds[1])  # the float32 inputs' own extremes

    def apply(self, image: np.ndarray) -> np.ndarray:
        """``image`` (any shape) normalised, float32."""
        x = image.astype(np.float64, copy=False)
        if self.low is not None and self.high is not None:
            x = np.clip(x, self.low, self.high)
        out = ((x - self.mean) / self.std).astype(np.float32)
        valid = self.valid_range
        return out if valid is None else np.clip(out, *valid)  # resampling keeps to it too


def ct_normalisation(samples: list[np.ndarray], where: str) -> Normalisation:
    """nnU-Net's CT statistics from the foreground intensities of every volume (concatenated).

    Raises:
        UserError: no foreground voxel in any volume (``where`` names the data).
    """
    values = np.concatenate([s.astype(np.float64, copy=False).ravel() for s in samples])
    if values.size == 0:
        raise UserError(
            f"{where}: CT normalisation needs foreground voxels (labelled), found none; "
            "use data.volume.modality: mri (a z-score per volume)"
        )
    low, high = (float(v) for v in np.percentile(values, (0.5, 99.5)))
    return Normalisation("ct", float(values.mean()), max(float(values.std()), MIN_STD), low, high)


def foreground_sample(image: np.ndarray, foreground: np.ndarray, seed: int) -> np.ndarray:
    """At most :data:`FOREGROUND_SAMPLES` intensities of ``image`` where ``foreground``, drawn
    with ``seed`` (all of them when fewer)."""
    values = image[foreground]
    if values.size <= FOREGROUND_SAMPLES:
        return values
    picks = np.random.default_rng(seed).choice(values.size, FOREGROUND_SAMPLES, replace=False)
    return values[np.sort(picks)]


def mri_normalisation(image: np.ndarray) -> Normalisation:
    """A z-score by the volume's own mean and deviation (nnU-Net's ``ZScoreNormalization``)."""
    x = image.astype(np.float64, copy=False)
    return Normalisation("mri", float(x.mean()), max(float(x.std()), MIN_STD))


def resampled_shape(
    shape: tuple[int, int, int], spacing: tuple[float, float, float], target: tuple[float, ...]
) -> tuple[int, int, int]:
    """The ``(D, H, W)`` of a volume resampled from ``spacing`` to ``target`` (mm): each axis
    ``round(n * spacing / target)``, at least 1."""
    return tuple(  # type: ignore[return-value]
        max(1, round(n * s / t)) for n, s, t in zip(shape, spacing, target, strict=True)
    )


def resample(
    image: np.ndarray, masks: np.ndarray, shape: tuple[int, int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """``image`` ``(D, H, W)`` float32 (trilinear) and ``masks`` ``(K, D, H, W)`` uint8 (each
    class trilinear as a float, kept where >= 0.5) resampled to ``shape``."""
    if tuple(image.shape) == tuple(shape):
        return image, masks
    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    out = F.interpolate(x, size=shape, mode="trilinear", align_corners=False)[0, 0]
    if masks.shape[0]:
        m = torch.from_numpy(np.ascontiguousarray(masks, dtype=np.float32))[None]
        m = F.interpolate(m, size=shape, mode="trilinear", align_corners=False)[0] >= 0.5
        new_masks = m.numpy().astype(np.uint8)
    else:
        new_masks = np.zeros((0, *shape), np.uint8)
    return out.numpy(), new_masks
