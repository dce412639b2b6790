"""Slice preprocessing: intensity to [0, 1], resize, grey to channels, 2.5D neighbour stacks.

Pure functions on numpy arrays, so that the cache, the dataset and the tests share one definition.
The defaults follow the paper (FACTS.md section 1): a 224 x 224 input, each slice divided by its
maximum, the grey channel copied three times for ImageNet encoders. A non-square slice is by
default resized with its aspect kept and padded to the square (``resize: pad``; the paper
stretched it, ``resize: stretch``). :func:`slice_geometry` records, per slice, where the slice lies
in the square and the millimetres per model pixel, so that predictions can be un-padded
(:func:`restore_slice`) and distances measured in mm.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import cv2
import numpy as np
import pandas as pd

from advseg.errors import UserError


@dataclass
class PreprocessConfig:
    """How a slice becomes a model input.

    Attributes:
        size: output side S; every slice becomes S x S.
        resize: ``pad``: resize with the aspect ratio kept (the longer side to S) and pad the
            shorter side with zeros, centred (the padding per slice is :func:`slice_geometry`);
            ``stretch``: resize each side to S (the paper's choice; square slices are the same
            either way).
        intensity: ``max``: divide by the slice maximum (the paper); ``percentile``: map the
            ``percentiles`` (low, high) of the slice to 0 and 1 and clip, which is robust to a few
            hot pixels. Negative values are clipped to 0 in both modes; a blank slice gives zeros.
        percentiles: the (low, high) percentiles for ``intensity: percentile``.
        mask_resize: ``nearest``: each model pixel takes the label of the source pixel under its
            centre; ``area``: each mask resized as a float with the image's own interpolation
            (area averaging when shrinking, bilinear when enlarging) and kept where at least half
            covered. Both sample on the image's pixel-centre convention (:func:`resize_masks`),
            so a mask lies where its image does.
        channels: C, the number of input channels.
        stack: ``copy``: C copies of the grey slice; ``neighbours``: 2.5D, the slices at offsets
            ``(-(C // 2) .. C // 2) * stride`` of the same scan (clamped at the scan's ends).
        stride: slice step between 2.5D neighbours.
    """

    size: int = 224
    resize: Literal["pad", "stretch"] = "pad"
    intensity: Literal["max", "percentile"] = "max"
    percentiles: tuple[float, float] = (0.5, 99.5)
    mask_resize: Literal["nearest", "area"] = "nearest"
    channels: int = 3
    stack: Literal["copy", "neighbours"] = "copy"
    stride: int = 1

    def __post_init__(self) -> None:
        if self.size < 8:
            raise UserError(f"preprocess.size: must be at least 8, got {self.size}")
        if self.resize not in ("pad", "stretch"):
            raise UserError(f"preprocess.resize: {self.resize!r} is not one of pad, stretch")
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

    @property
    def value_range(self) -> tuple[float, float]:
        """The range of the model inputs this preprocessing makes: ``(0.0, 1.0)`` (both
        intensity modes map a slice into [0, 1] and clip; resizing and padding with 0 stay in
        it). The attacks' ``valid_range`` on these inputs (``advseg.evaluate`` passes it)."""
        return (0.0, 1.0)

    def array_key(self) -> dict[str, object]:
        """The fields that change the cached arrays (channels and stacking do not).

        ``resize: stretch`` made the arrays every cache held before the setting existed, so it
        adds nothing to the key: those caches (and the data fingerprints of runs on them) stay
        valid; ``pad`` is in the key.
        """
        key: dict[str, object] = {
            "size": self.size,
            "intensity": self.intensity,
            "percentiles": list(self.percentiles) if self.intensity == "percentile" else None,
            "mask_resize": self.mask_resize,
        }
        if self.resize != "stretch":
            key["resize"] = self.resize
        return key


def saved_preprocess(saved: Mapping[str, Any], where: str) -> PreprocessConfig:
    """The :class:`PreprocessConfig` a checkpoint stored (``where`` names it in errors).

    A checkpoint saved before ``resize`` existed was trained on stretched slices: it is read as
    ``resize: stretch``, so that its evaluation sees the geometry it was trained on.
    """
    from advseg.config import from_dict

    return from_dict(PreprocessConfig, {"resize": "stretch", **saved}, where=where)


def normalize_intensity(image: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    """Map a raw slice to float32 in [0, 1]; a blank (all-zero or constant) slice gives zeros.

    Args:
        image: ``(H, W)`` raw intensities (uint16 MRI, float CT, ...).
    """
    x = np.clip(image.astype(np.float32), 0, None)
    low, high = _range_of(x, config)
    if high - low <= 0:
        return np.zeros_like(x)  # blank slice: never divide by zero, never NaN
    return np.clip((x - low) / (high - low), 0, 1)


def intensity_range(image: np.ndarray, config: PreprocessConfig) -> tuple[float, float]:
    """The raw intensities ``(low, high)`` that :func:`normalize_intensity` maps to 0 and 1 for
    the ``(H, W)`` slice ``image`` (negative values count as 0): a model-input difference ``d``
    is ``d * (high - low)`` in the source's units."""
    return _range_of(np.clip(image.astype(np.float32), 0, None), config)


def _range_of(x: np.ndarray, config: PreprocessConfig) -> tuple[float, float]:
    """:func:`intensity_range` of a slice already made float32 and non-negative."""
    if config.intensity == "max":
        return 0.0, float(x.max())
    low, high = (float(v) for v in np.percentile(x, config.percentiles))
    return low, high


def fitted_size(height: int, width: int, size: int, resize: str = "stretch") -> tuple[int, int]:
    """The ``(h, w)`` a slice is resized to before padding: ``(size, size)`` when stretched, else
    the aspect-kept size whose longer side is ``size``."""
    if resize == "stretch":
        return size, size
    scale = size / max(height, width)
    return max(1, min(size, round(height * scale))), max(1, min(size, round(width * scale)))


def fit_square(array: np.ndarray, size: int, resize: str, interpolation: int) -> np.ndarray:
    """``(H, W)`` or ``(H, W, K)`` -> ``(size, size[, K])``: resized to :func:`fitted_size` with
    OpenCV's ``interpolation``, then zero-padded around it (centred)."""
    h, w = array.shape[:2]
    fh, fw = fitted_size(h, w, size, resize)
    fitted = cv2.resize(array, (fw, fh), interpolation=interpolation).reshape(fh, fw, -1)
    out = np.zeros((size, size, fitted.shape[2]), fitted.dtype)
    top, left = (size - fh) // 2, (size - fw) // 2
    out[top : top + fh, left : left + fw] = fitted
    return out if array.ndim == 3 else out[:, :, 0]


def image_interpolation(height: int, width: int, size: int, resize: str = "stretch") -> int:
    """The OpenCV interpolation that resizes an ``height x width`` slice into the model square:
    area averaging when the slice shrinks, bilinear when it grows. Both place pixel centres at
    ``(i + 0.5) * scale - 0.5``, the convention every image, mask and restore here shares."""
    fh, fw = fitted_size(height, width, size, resize)
    return cv2.INTER_AREA if fh * fw < height * width else cv2.INTER_LINEAR


def resize_image(image: np.ndarray, size: int, resize: str = "stretch") -> np.ndarray:
    """``(H, W)`` -> ``(size, size)``: area averaging when shrinking, bilinear when enlarging;
    ``resize="pad"`` keeps the aspect ratio and pads with zeros."""
    h, w = image.shape
    return fit_square(image, size, resize, image_interpolation(h, w, size, resize))


def resize_masks(
    masks: np.ndarray, size: int, method: str = "nearest", resize: str = "stretch"
) -> np.ndarray:
    """``(K, H, W)`` binary masks -> ``(K, size, size)`` uint8 in {0, 1}, aligned with the image.

    ``nearest`` gives each model pixel the label of the source pixel under its centre
    (``cv2.INTER_NEAREST_EXACT``, the convention of PIL and scikit-image; OpenCV's
    ``INTER_NEAREST`` samples at ``i * scale`` instead, which put masks up to half a model pixel
    down and right of their images); ``area`` resizes each mask as a float with the image's own
    interpolation (:func:`image_interpolation`) and keeps the pixels at least half covered.
    ``resize="pad"`` keeps the aspect ratio (padding is 0).
    """
    if masks.shape[0] == 0:
        return np.zeros((0, size, size), np.uint8)
    stack = np.ascontiguousarray(masks.transpose(1, 2, 0))  # (H, W, K): OpenCV's channel order
    if method == "nearest":
        out = fit_square(stack.astype(np.uint8), size, resize, cv2.INTER_NEAREST_EXACT)
    elif method == "area":
        how = image_interpolation(*masks.shape[1:], size, resize)
        frac = fit_square(stack.astype(np.float32), size, resize, how)
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
    x = resize_image(normalize_intensity(image, config), config.size, config.resize)
    masks = resize_masks(masks, config.size, config.mask_resize, config.resize)
    return np.clip(x, 0, 1), masks


GEOMETRY_COLUMNS = ("top", "left", "fitted_h", "fitted_w", "mm_h", "mm_w")


def slice_geometry(index: pd.DataFrame, config: PreprocessConfig) -> pd.DataFrame:
    """Where each slice lies in its ``S x S`` array, and its model pixels' size in mm.

    Args:
        index: a SliceIndex (``width``, ``height``, ``spacing_w``, ``spacing_h``).
        config: the preprocessing the arrays were made with.

    Returns:
        One row per index row: ``top``, ``left`` (padding before the slice, in model pixels),
        ``fitted_h``, ``fitted_w`` (the slice's size in the array; the padding after it is
        ``S - top - fitted_h`` and ``S - left - fitted_w``), ``mm_h``, ``mm_w`` (millimetres per
        model pixel down and across: the pixel spacing times the resize factor).
    """
    rows = []
    for h, w in zip(index["height"].to_numpy(), index["width"].to_numpy(), strict=True):
        fh, fw = fitted_size(int(h), int(w), config.size, config.resize)
        rows.append(((config.size - fh) // 2, (config.size - fw) // 2, fh, fw))
    table = pd.DataFrame(rows, columns=list(GEOMETRY_COLUMNS[:4]), dtype="int64")
    table["mm_h"] = index["spacing_h"].to_numpy() * index["height"].to_numpy() / table["fitted_h"]
    table["mm_w"] = index["spacing_w"].to_numpy() * index["width"].to_numpy() / table["fitted_w"]
    return table


def restore_slice(array: np.ndarray, geometry: pd.Series, height: int, width: int) -> np.ndarray:
    """A model-sized ``(..., S, S)`` array back on the source slice, ``(..., H, W)``.

    The padding recorded in ``geometry`` (a row of :func:`slice_geometry`) is cut off, then the
    slice is resized to ``height x width`` on the pixel-centre convention of the forward resize
    (:func:`image_interpolation`), so that a round trip does not move anything:

    - ``bool`` masks: each resized as a float (bilinear when growing, area when shrinking) and
      kept where at least 0.5, which gives smooth outlines instead of model-pixel blocks;
    - integer arrays (labels): the label under each source pixel's centre
      (``cv2.INTER_NEAREST_EXACT``), so labels stay labels;
    - float arrays (images, perturbations): bilinear or area; a convex combination of the
      model's values, so a perturbation's L-inf norm never grows.
    """
    top, left = int(geometry["top"]), int(geometry["left"])
    fh, fw = int(geometry["fitted_h"]), int(geometry["fitted_w"])
    crop = array[..., top : top + fh, left : left + fw]
    lead, dtype = crop.shape[:-2], crop.dtype
    stack = np.ascontiguousarray(crop.reshape(-1, fh, fw).transpose(1, 2, 0))  # (h, w, N)
    smooth = cv2.INTER_AREA if height * width < fh * fw else cv2.INTER_LINEAR
    if dtype == np.bool_:
        out = cv2.resize(stack.astype(np.float32), (width, height), interpolation=smooth) >= 0.5
    elif np.issubdtype(dtype, np.integer):
        out = cv2.resize(stack, (width, height), interpolation=cv2.INTER_NEAREST_EXACT)
    else:
        out = cv2.resize(stack, (width, height), interpolation=smooth)
    out = out.reshape(height, width, -1).transpose(2, 0, 1).reshape(*lead, height, width)
    return out.astype(dtype, copy=False)


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
