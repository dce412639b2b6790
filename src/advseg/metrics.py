"""Segmentation and perturbation metrics: pure functions on tensors and arrays.

Dice and IoU come from per-(slice, class) pixel counts (``tp``, ``fp``, ``fn``), computed once by
:func:`confusion_counts` and reduced separately (the segmentation_models_pytorch pattern), so
that every Dice protocol of :mod:`advseg.summary` can be recomputed from the records.
"""

from __future__ import annotations

import numpy as np

PAPER_SMOOTH = 1e-5
"""The smoothing of MONAI ``DiceLoss`` (``smooth_nr = smooth_dr = 1e-5``), the paper's Dice."""


def dice_from_counts(
    tp: np.ndarray, fp: np.ndarray, fn: np.ndarray, smooth: float = 0.0
) -> np.ndarray:
    """Dice ``(2 tp + s) / (2 tp + fp + fn + s)`` elementwise; NaN where it is ``0 / 0``.

    Args:
        tp, fp, fn: pixel counts of the same shape.
        smooth: ``s``, added to the numerator and the denominator (``PAPER_SMOOTH`` for the
            paper's protocol; 0 for the plain Dice, which is undefined on empty-empty pairs).
    """
    tp, fp, fn = (np.asarray(v, dtype=np.float64) for v in (tp, fp, fn))
    denominator = 2 * tp + fp + fn + smooth
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, (2 * tp + smooth) / denominator, np.nan)


def iou_from_counts(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    """IoU (Jaccard) ``tp / (tp + fp + fn)`` elementwise; NaN where it is ``0 / 0``."""
    tp, fp, fn = (np.asarray(v, dtype=np.float64) for v in (tp, fp, fn))
    denominator = tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, tp / denominator, np.nan)
