"""Segmentation and perturbation metrics: pure functions on tensors and arrays.

Dice and IoU come from per-(slice, class) pixel counts (``tp``, ``fp``, ``fn``), computed once by
:func:`confusion_counts` and reduced separately (the segmentation_models_pytorch pattern), so
that every Dice protocol of :mod:`advseg.stats.summary` can be recomputed from the records.

Conventions for empty masks (per slice and class): Dice and IoU are 1 when the prediction and
the ground truth are both empty (MONAI ``ignore_empty=False``; ``dice_score(..., empty=nan)``
leaves such pairs to be dropped); HD95 is 0 when both are empty and
NaN when exactly one is (see :func:`hd95`); the normalised surface Dice (:func:`surface_dice`)
is 1 when both are empty and 0 when one is. Which pairs enter a mean is the summary's protocol.
Every function takes slices ``(B, K, H, W)`` or volumes ``(B, K, D, H, W)`` alike;
:func:`volume_scores` gives a volume's Dice, HD95 and NSD in millimetres.
:func:`dice_score` and :func:`iou_score` take hard masks only (bool or 0/1): probabilities,
logits or images are refused rather than read as ``!= 0``.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

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


def confusion_counts(pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Pixel counts per (slice, class) of hard masks.

    Args:
        pred: predicted masks ``(B, K, H, W)`` (bool or {0, 1}).
        target: ground-truth masks ``(B, K, H, W)``.

    Returns:
        ``(tp, fp, fn)``, each ``(B, K)`` int64.
    """
    pred, target = pred.bool(), target.bool()
    tp = (pred & target).flatten(2).sum(2)
    fp = (pred & ~target).flatten(2).sum(2)
    fn = (~pred & target).flatten(2).sum(2)
    return tp, fp, fn


def hard_prediction(logits: Tensor, activation: str = "sigmoid") -> Tensor:
    """Hard masks ``(B, K, H, W)`` bool: ``sigmoid > 0.5`` per class, or the softmax argmax."""
    if activation == "sigmoid":
        return logits > 0  # sigmoid(z) > 0.5  <=>  z > 0
    return F.one_hot(logits.argmax(1), logits.shape[1]).movedim(-1, 1).bool()


def check_binary(name: str, mask: Tensor) -> None:
    """Refuse a mask that is not hard: ``mask`` must be bool or hold only 0 and 1.

    Probabilities, logits or images would otherwise become masks by ``mask != 0`` (a probability
    of 0.01 a foreground pixel), a Dice that looks plausible and is wrong.

    Raises:
        ValueError: naming ``name``, the shape mismatch or the values found, and how to threshold.
    """
    if mask.dtype == torch.bool:
        return
    if mask.is_floating_point() and not bool(torch.isfinite(mask).all()):
        raise ValueError(f"{name}: holds NaN or inf; pass a hard mask (bool or 0/1)")
    if not bool(((mask == 0) | (mask == 1)).all()):
        low, high = float(mask.min()), float(mask.max())
        raise ValueError(
            f"{name}: values in [{low:g}, {high:g}], not a hard mask (bool or 0/1); threshold "
            "it first (logits: advseg.metrics.hard_prediction(logits); probabilities: p > 0.5)"
        )


def _checked_counts(pred: Tensor, target: Tensor, who: str) -> tuple[Tensor, Tensor, Tensor]:
    if pred.shape != target.shape:
        raise ValueError(
            f"{who}: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape"
        )
    check_binary(f"{who} pred", pred)
    check_binary(f"{who} target", target)
    return confusion_counts(pred, target)


def dice_score(pred: Tensor, target: Tensor, empty: float = 1.0) -> Tensor:
    """Dice per (slice, class), ``(B, K)`` float64, of two hard masks.

    Equals MONAI ``DiceMetric(include_background=True, reduction="none", ignore_empty=False)``.

    Args:
        pred, target: masks ``(B, K, H, W)``, bool or holding only 0 and 1 (a ``ValueError``
            otherwise: threshold logits with :func:`hard_prediction`, probabilities with
            ``p > 0.5``; images are no masks).
        empty: the value where both masks of a (slice, class) are empty, where Dice is 0 / 0.
            The default 1 says "nothing there, nothing predicted: right" (MONAI's
            ``ignore_empty=False``), so a mean over many empty slices approaches 1 whatever the
            model does on the organs; pass ``float("nan")`` to leave such pairs out of a
            ``nanmean`` (what the report's ``per-class`` protocol does: only pairs with a
            ground-truth mask enter, see :mod:`advseg.stats.summary`). Exactly one empty mask of the
            two gives 0.
    """
    tp, fp, fn = _checked_counts(pred, target, "dice_score")
    values = dice_from_counts(tp.cpu().numpy(), fp.cpu().numpy(), fn.cpu().numpy())
    return torch.from_numpy(np.nan_to_num(values, nan=empty))


def iou_score(pred: Tensor, target: Tensor, empty: float = 1.0) -> Tensor:
    """IoU per (slice, class), ``(B, K)`` float64, of two hard masks; ``empty`` where both
    masks are empty (the same inputs and convention as :func:`dice_score`)."""
    tp, fp, fn = _checked_counts(pred, target, "iou_score")
    values = iou_from_counts(tp.cpu().numpy(), fp.cpu().numpy(), fn.cpu().numpy())
    return torch.from_numpy(np.nan_to_num(values, nan=empty))


def hd95(pred: Tensor, target: Tensor, spacing: np.ndarray | None = None) -> Tensor:
    """95th-percentile Hausdorff distance per (slice, class), ``(B, K)`` float64.

    Computed by MONAI (``compute_hausdorff_distance``, Euclidean, symmetric, percentile 95) at the
    model's resolution: in pixels, or in millimetres when ``spacing`` gives each slice's pixel
    size, ``(B, 2)`` mm down and across (:func:`advseg.data.slice_geometry`'s ``mm_h``,
    ``mm_w``: the source pixel spacing times the resize factor). Empty masks, which MONAI leaves
    undefined, follow this convention:

    - both masks empty: 0 (the prediction is exactly right);
    - exactly one empty: NaN (no distance exists). Records keep the NaN; every summary excludes
      these pairs and reports how many it excluded, so no NaN reaches a table.
    """
    if spacing is None:
        return hd95_both(pred, target, None)[0]
    return hd95_both(pred, target, spacing, pixels=False)[1]


def hd95_both(
    pred: Tensor, target: Tensor, spacing: np.ndarray | None, *, pixels: bool = True
) -> tuple[Tensor, Tensor]:
    """:func:`hd95` in pixels and in millimetres (NaN without ``spacing``), two ``(B, K)``;
    ``pixels=False`` leaves the pixel one unmeasured (0 where both masks have a pixel).

    The mask edges of each pair are found once and measured under both spacings: MONAI's
    ``compute_hausdorff_distance`` step by step (``get_mask_edges``, then ``get_surface_distance``
    both ways, the 95th percentile of each, their maximum in float32), so each number equals its
    ``compute_hausdorff_distance`` value exactly; finding the edges is most of its cost.
    """
    pred, target = pred.bool(), target.bool()
    pred_empty = ~pred.flatten(2).any(2).cpu()  # (B, K)
    target_empty = ~target.flatten(2).any(2).cpu()
    in_pixels = torch.zeros(pred.shape[:2], dtype=torch.float64)  # both empty: 0
    in_pixels[pred_empty ^ target_empty] = float("nan")
    mm = in_pixels.clone() if spacing is not None else torch.full_like(in_pixels, float("nan"))
    both = ~pred_empty & ~target_empty
    if not both.any():
        return in_pixels, mm
    from monai.metrics.utils import get_mask_edges, get_surface_distance, prepare_spacing

    # only the defined pairs, one per row, as compute_hausdorff_distance takes them: (N, *S)
    pred_pairs = pred.cpu()[both].float()
    target_pairs = target.cpu()[both].float()
    count = len(pred_pairs)
    spacings = [None] * count
    if spacing is not None:
        pairs = np.asarray(spacing, dtype=np.float64)[both.nonzero()[:, 0].numpy()]  # (N, 2|3)
        spacings = prepare_spacing(spacing=pairs.tolist(), batch_size=count, img_dim=pred.dim() - 2)
    found = torch.empty((2, count), dtype=torch.float)  # MONAI's result dtype
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI warns about its deprecated arguments
        for i in range(count):
            edges = get_mask_edges(
                pred_pairs[i], target_pairs[i], crop=True, always_return_as_numpy=False
            )
            for row, pair_spacing in ((0, None), (1, spacings[i])):
                if (row == 1 and spacing is None) or (row == 0 and not pixels):
                    continue
                distances = [
                    get_surface_distance(a, b, "euclidean", pair_spacing)
                    for a, b in ((edges[0], edges[1]), (edges[1], edges[0]))
                ]
                found[row, i] = torch.max(torch.stack([torch.quantile(d, 0.95) for d in distances]))
    if pixels:
        in_pixels[both] = found[0].double()
    if spacing is not None:
        mm[both] = found[1].double()
    return in_pixels, mm


def surface_dice(
    pred: Tensor, target: Tensor, tolerance: float, spacing: np.ndarray | None = None
) -> Tensor:
    """Normalised surface Dice per (volume or slice, class), ``(B, K)`` float64.

    The share of both boundaries lying within ``tolerance`` of the other boundary (Nikolov et al.
    2021), computed by MONAI (``compute_surface_dice``, Euclidean, ``class_thresholds`` the
    tolerance) on hard masks ``(B, K, *S)`` whose channels are classes (no background channel:
    ``labels.class_prediction`` drops it). ``tolerance`` is in voxels, or in millimetres when
    ``spacing`` gives each item's voxel size, ``(B, len(S))`` mm in the axes' order. Empty masks
    follow :func:`dice_score`'s convention: both empty 1, exactly one empty 0 (MONAI's value).
    """
    from monai.metrics import compute_surface_dice

    pred, target = pred.bool().cpu(), target.bool().cpu()
    pred_empty = ~pred.flatten(2).any(2)  # (B, K)
    target_empty = ~target.flatten(2).any(2)
    values = torch.zeros(pred.shape[:2], dtype=torch.float64)  # exactly one empty: 0
    values[pred_empty & target_empty] = 1.0
    both = ~pred_empty & ~target_empty
    for b, k in both.nonzero().tolist():  # one (item, class) at a time: its own spacing
        pair_spacing = None if spacing is None else np.asarray(spacing, np.float64)[b].tolist()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            value = compute_surface_dice(
                pred[b, k][None, None].float(),
                target[b, k][None, None].float(),
                class_thresholds=[float(tolerance)],
                include_background=True,
                spacing=pair_spacing,
            )
        values[b, k] = float(value)
    return values


def volume_scores(
    pred: Tensor, target: Tensor, spacing: np.ndarray, tolerance_mm: float = 1.0
) -> dict[str, Tensor]:
    """Per (volume, class) scores of hard masks ``(B, K, D, H, W)`` (classes only: the background
    is no channel), with ``spacing`` ``(B, 3)`` mm per voxel along D, H, W.

    Returns ``(B, K)`` float64 tensors: ``dice`` (both empty 1), ``hd95_mm`` (:func:`hd95`: both
    empty 0, one empty NaN) and ``nsd`` (:func:`surface_dice` at ``tolerance_mm``).
    """
    check_binary("prediction", pred)
    check_binary("target", target)
    return {
        "dice": dice_score(pred, target).double().cpu(),
        "hd95_mm": hd95(pred, target, spacing),
        "nsd": surface_dice(pred, target, tolerance_mm, spacing),
    }


def attack_success(dice_clean: np.ndarray, dice_adv: np.ndarray) -> np.ndarray:
    """The paper's Attack Success ``(DSC_clean - DSC_adv) / DSC_clean``; NaN where clean is 0."""
    clean, adv = np.asarray(dice_clean, np.float64), np.asarray(dice_adv, np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(clean > 0, (clean - adv) / clean, np.nan)


def perturbation_norms(x: Tensor, x_adv: Tensor) -> tuple[Tensor, Tensor]:
    """L-inf and L2 norms of ``x_adv - x`` per image: two ``(B,)`` tensors."""
    delta = (x_adv.float() - x.float()).flatten(1)
    return delta.abs().amax(1), delta.norm(p=2, dim=1)


def psnr(x: Tensor, x_adv: Tensor, data_range: float = 1.0) -> Tensor:
    """Peak signal-to-noise ratio of ``x_adv`` against ``x`` per image, ``(B,)`` in dB.

    ``inf`` where the images are equal (eps 0).
    """
    mse = (x_adv.float() - x.float()).flatten(1).pow(2).mean(1)
    return 10 * torch.log10(data_range**2 / mse)


def ssim(x: Tensor, x_adv: Tensor, data_range: float = 1.0, win_size: int = 7) -> Tensor:
    """Structural similarity of ``x_adv`` to ``x`` per image, ``(B,)``, mean over channels.

    MONAI ``SSIMMetric`` (Gaussian window, sigma 1.5); the window shrinks to the image on
    images smaller than ``win_size``.
    """
    from monai.metrics import SSIMMetric  # here: MONAI's import is heavy

    side = min(x.shape[2:])
    win = min(win_size, side if side % 2 else side - 1)
    dims = x.dim() - 2  # 2 for slices (B, C, H, W), 3 for volumes (B, C, D, H, W)
    metric = SSIMMetric(spatial_dims=dims, data_range=data_range, win_size=win, reduction="none")
    return metric(x_adv.float(), x.float()).flatten()


def luminosity(x: Tensor) -> Tensor:
    """Mean intensity of each image, ``(B,)``: the slice brightness the paper asks about."""
    return x.float().flatten(1).mean(1)
