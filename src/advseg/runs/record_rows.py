"""Building records: one row per (slice, class) of a batch, the one builder every producer uses.

The attack engine (:mod:`advseg.evaluate.scoring`: clean against adversarial predictions) and
certification (:mod:`advseg.evaluate.certify`: the plain prediction against the certified one)
fill the same columns of :data:`advseg.runs.records.RECORD_COLUMNS` the same way here: the slice's
identity from the index, the pixel counts (from which every Dice protocol is recomputed), Dice
and IoU with the empty-pair convention, HD95 in pixels and in millimetres. What differs between
them (norms, the eps, the abstentions) is handed in as columns; the model, attack and eps columns
are added by the caller for the whole cell.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from torch import Tensor

from advseg.metrics import (
    confusion_counts,
    dice_from_counts,
    hd95,
    hd95_both,
    iou_from_counts,
    surface_dice,
)


@dataclass(frozen=True)
class Scores:
    """One prediction's scores against the true masks, per (slice, class), each ``(B * K,)``
    in slice-major order (slice 0's classes, then slice 1's, ...)."""

    tp: np.ndarray
    fp: np.ndarray
    fn: np.ndarray
    hd95: np.ndarray
    """Pixels."""
    hd95_mm: np.ndarray
    """Millimetres; NaN without a pixel spacing."""
    nsd: np.ndarray | None = None
    """Normalised surface Dice at a tolerance in mm (volumes); None where not computed."""


def score(
    pred: Tensor, target: Tensor, spacing: np.ndarray | None = None, nsd_mm: float | None = None
) -> Scores:
    """The :class:`Scores` of hard masks ``pred`` against ``target`` (both ``(B, K, H, W)``, or
    ``(B, K, D, H, W)`` volumes).

    ``spacing``: ``(B, 2)`` mm per model pixel (``(B, 3)`` per voxel; :func:`pixel_mm`), for
    HD95 in millimetres. ``nsd_mm``: also the normalised surface Dice at this tolerance in mm
    (:func:`advseg.metrics.surface_dice`; needs ``spacing``).
    """
    tp, fp, fn = (t.cpu().numpy().ravel() for t in confusion_counts(pred, target))
    pixels, mm = hd95_both(pred, target, spacing)  # the edges found once for both
    nsd = None
    if nsd_mm is not None and spacing is not None:
        nsd = surface_dice(pred, target, nsd_mm, spacing).numpy().ravel()
    return Scores(tp, fp, fn, pixels.numpy().ravel(), mm.numpy().ravel(), nsd)


def hd95_mm(pred: Tensor, target: Tensor, spacing: np.ndarray | None) -> np.ndarray:
    """HD95 in mm per (slice, class), ``(B * K,)``; NaN where no spacing is known."""
    if spacing is None:
        return np.full(pred.shape[0] * pred.shape[1], np.nan)
    return hd95(pred, target, spacing).numpy().ravel()


def pixel_mm(data: Any, rows: Sequence[int]) -> np.ndarray | None:
    """``(B, 2)`` mm per model pixel (down, across) of ``rows``, or None without a geometry.

    ``data`` is a :class:`~advseg.evaluate.SliceSource`; its ``geometry`` (as
    ``SliceData.geometry``) has ``mm_h``, ``mm_w`` per index row.
    """
    geometry = getattr(data, "geometry", None)
    if geometry is None:
        return None
    columns = ["mm_d", "mm_h", "mm_w"] if "mm_d" in geometry else ["mm_h", "mm_w"]
    return geometry[columns].to_numpy(np.float64)[np.asarray(rows, dtype=np.int64)]


def empty_is_one(values: np.ndarray) -> np.ndarray:
    """Dice/IoU of a pair empty in both masks is 1 (see :mod:`advseg.metrics`)."""
    return np.nan_to_num(values, nan=1.0)


def slice_records(
    meta: pd.DataFrame,
    classes: Sequence[str],
    clean: Scores,
    adv: Scores,
    per_slice: Mapping[str, np.ndarray] | None = None,
    **columns: Any,
) -> pd.DataFrame:
    """One row per (slice, class) of a batch: identity, counts, Dice, IoU and HD95 columns.

    Args:
        meta: the batch's index rows (``id``, ``case``, ``scan``, ``slice``), one per slice.
        classes: the class names, in channel order.
        clean, adv: the scores of the ``_clean`` and ``_adv`` columns.
        per_slice: further columns with one value per slice ``(B,)``, repeated over the classes.
        columns: further columns, each one value or ``(B * K,)`` values (``loss``, ...).

    Returns:
        The frame in the order of ``columns``, the common columns, ``per_slice``; the caller
        adds the cell's columns and puts it in order with :func:`advseg.runs.records.check_records`.
    """
    b, k = len(meta), len(classes)
    return pd.DataFrame(
        {
            **columns,
            "slice_id": np.repeat(meta["id"].to_numpy(), k),
            "case": np.repeat(meta["case"].to_numpy(), k),
            "scan": np.repeat(meta["scan"].to_numpy(), k),
            "slice": np.repeat(meta["slice"].to_numpy(), k),
            "class": np.tile(classes, b),
            "gt_pixels": clean.tp + clean.fn,
            "tp_clean": clean.tp,
            "fp_clean": clean.fp,
            "fn_clean": clean.fn,
            "tp_adv": adv.tp,
            "fp_adv": adv.fp,
            "fn_adv": adv.fn,
            "dice_clean": empty_is_one(dice_from_counts(clean.tp, clean.fp, clean.fn)),
            "dice_adv": empty_is_one(dice_from_counts(adv.tp, adv.fp, adv.fn)),
            "iou_clean": empty_is_one(iou_from_counts(clean.tp, clean.fp, clean.fn)),
            "iou_adv": empty_is_one(iou_from_counts(adv.tp, adv.fp, adv.fn)),
            "hd95_clean": clean.hd95,
            "hd95_adv": adv.hd95,
            "hd95_mm_clean": clean.hd95_mm,
            "hd95_mm_adv": adv.hd95_mm,
            **({} if clean.nsd is None else {"nsd_clean": clean.nsd}),
            **({} if adv.nsd is None else {"nsd_adv": adv.nsd}),
            **{name: np.repeat(values, k) for name, values in (per_slice or {}).items()},
        }
    )
