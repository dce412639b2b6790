"""Slice preprocessing: intensity to [0, 1], resize, grey to channels, 2.5D neighbour stacks.

Pure functions on numpy arrays, so that the cache, the dataset and the tests share one definition.
The defaults follow the paper (FACTS.md section 1): resize to 224 x 224, divide each slice by its
maximum, copy the grey channel three times for ImageNet encoders.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np

from advseg.errors import UserError


@dataclass
class PreprocessConfig:
    """How a slice becomes a model input.

    Attributes:
        size: output side S; every slice is resized to S x S (non-square slices are stretched,
            as in the paper).
        intensity: ``max``: divide by the slice maximum (the paper); ``percentile``: map the
            ``percentiles`` (low, high) of the slice to 0 and 1 and clip, which is robust to a few
            hot pixels. Negative values are clipped to 0 in both modes; a blank slice gives zeros.
        percentiles: the (low, high) percentiles for ``intensity: percentile``.
        mask_resize: ``nearest``: nearest-neighbour resize of each mask; ``area``: area-average
            resize then threshold at 0.5, which keeps thin structures more faithfully when
            shrinking.
        channels: C, the number of input channels.
        stack: ``copy``: C copies of the grey slice; ``neighbours``: 2.5D, the slices at offsets
            ``(-(C // 2) .. C // 2) * stride`` of the same scan (clamped at the scan's ends).
        stride: slice step between 2.5D neighbours.
    """

    size: int = 224
    intensity: Literal["max", "percentile"] = "max"
    percentiles: tuple[float, float] = (0.5, 99.5)
    mask_resize: Literal["nearest", "area"] = "nearest"
    channels: int = 3
    stack: Literal["copy", "neighbours"] = "copy"
    stride: int = 1

    def __post_init__(self) -> None:
        if self.size < 8:
            raise UserError(f"preprocess.size: must be at least 8, got {self.size}")
        low, high = self.percentiles
        if not 0 <= low < high <= 100:
            raise UserError(
                f"preprocess.percentiles: need 0 <= low < high <= 100, got {self.percentiles}"
            )
        if self.channels < 1:
            raise UserError(f"preprocess.channels: must be at least 1, got {self.channels}")
        if self.stack == "neighbours" and self.channels % 2 == 0:
            raise UserError(
                f"preprocess.channels: 2.5D stacks need an odd channel count, got {self.channels}"
            )
        if self.stride < 1:
            raise UserError(f"preprocess.stride: must be at least 1, got {self.stride}")

    def array_key(self) -> dict[str, object]:
        """The fields that change the cached arrays (channels and stacking do not)."""
        return {
            "size": self.size,
            "intensity": self.intensity,
            "percentiles": list(self.percentiles) if self.intensity == "percentile" else None,
            "mask_resize": self.mask_resize,
        }


def normalize_intensity(image: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    """Map a raw slice to float32 in [0, 1]; a blank (all-zero or constant) slice gives zeros.

    Args:
        image: ``(H, W)`` raw intensities (uint16 MRI, float CT, ...).
    """
    x = np.clip(image.astype(np.float32), 0, None)
    if config.intensity == "max":
        low, high = 0.0, float(x.max())
    else:
        low, high = (float(v) for v in np.percentile(x, config.percentiles))
    if high - low <= 0:
        return np.zeros_like(x)  # blank slice: never divide by zero, never NaN
    return np.clip((x - low) / (high - low), 0, 1)


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """``(H, W)`` -> ``(size, size)``: area averaging when shrinking, bilinear when enlarging."""
    h, w = image.shape
    shrink = size * size < h * w
    interp = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
    return cv2.resize(image, (size, size), interpolation=interp)


def resize_masks(masks: np.ndarray, size: int, method: str = "nearest") -> np.ndarray:
    """``(K, H, W)`` binary masks -> ``(K, size, size)`` uint8 in {0, 1}.

    ``nearest`` picks the nearest source pixel; ``area`` averages the covered source pixels and
    keeps those at least half covered.
    """
    if masks.shape[0] == 0:
        return np.zeros((0, size, size), np.uint8)
    stack = np.ascontiguousarray(masks.transpose(1, 2, 0))  # (H, W, K): OpenCV's channel order
    if method == "nearest":
        out = cv2.resize(stack.astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST)
    elif method == "area":
        frac = cv2.resize(stack.astype(np.float32), (size, size), interpolation=cv2.INTER_AREA)
        out = (frac >= 0.5).astype(np.uint8)
    else:
        raise UserError(f"preprocess.mask_resize: unknown method {method!r}; valid: nearest, area")
    return out.reshape(size, size, -1).transpose(2, 0, 1)  # (K, S, S)


def preprocess_slice(
    image: np.ndarray, masks: np.ndarray, config: PreprocessConfig
) -> tuple[np.ndarray, np.ndarray]:
    """One raw slice and its masks as cached arrays.

    Args:
        image: ``(H, W)`` raw slice.
        masks: ``(K, H, W)`` binary masks.

    Returns:
        ``(S, S)`` float32 in [0, 1] and ``(K, S, S)`` uint8 in {0, 1}.
    """
    x = resize_image(normalize_intensity(image, config), config.size)
    return np.clip(x, 0, 1), resize_masks(masks, config.size, config.mask_resize)


def neighbour_rows(scans: np.ndarray, slices: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    """For every row, the rows whose images form its C input channels.

    With ``stack: copy`` every channel is the row itself; with ``stack: neighbours`` channel j is
    the slice at offset ``(j - C // 2) * stride`` within the same scan, clamped to the scan's first
    and last slice (a slice number missing inside a scan is replaced by the next present one).

    Args:
        scans: ``(N,)`` scan ids per row.
        slices: ``(N,)`` slice numbers per row.

    Returns:
        ``(N, C)`` int64 row positions.
    """
    n = len(scans)
    rows = np.arange(n)
    if config.stack == "copy":
        return np.repeat(rows[:, None], config.channels, axis=1)
    offsets = (np.arange(config.channels) - config.channels // 2) * config.stride  # (C,)
    out = np.empty((n, config.channels), np.int64)
    order = np.lexsort((slices, scans))  # rows grouped by scan, then by slice number
    sorted_scans = scans[order]
    starts = np.flatnonzero(np.r_[True, sorted_scans[1:] != sorted_scans[:-1]])
    ends = np.r_[starts[1:], n]
    for start, end in zip(starts, ends, strict=True):
        group = order[start:end]
        numbers = slices[group]
        wanted = numbers[:, None] + offsets[None, :]  # (G, C) slice numbers
        pos = np.searchsorted(numbers, np.clip(wanted, numbers[0], numbers[-1]))
        out[group] = group[np.clip(pos, 0, len(group) - 1)]
    return out
