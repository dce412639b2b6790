"""The first wave's losses: bce, focal, dice, dicefocal (sigmoid, multi-label), ce and dicece
(softmax).

MONAI's implementations where they exist; every one per sample, ``(logits, target) -> (B,)``.
MONAI is imported where a loss is built, not here: its package ``__init__`` imports every
submodule (networks and apps included), which ``bce`` and ``ce`` do not need.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from advseg.losses.base import LOSSES, PerSampleLoss
from advseg.losses.base import per_sample as _per_sample


@LOSSES.register("bce")
def bce() -> PerSampleLoss:
    """Binary cross-entropy on per-class sigmoids (multi-label)."""

    def loss(logits: Tensor, target: Tensor) -> Tensor:
        return _per_sample(F.binary_cross_entropy_with_logits(logits, target, reduction="none"))

    return loss


@LOSSES.register("focal")
def focal(gamma: float = 2.0) -> PerSampleLoss:
    """Sigmoid focal loss (Lin et al. 2017, MONAI FocalLoss), gamma 2 as in the paper."""
    from monai.losses import FocalLoss

    monai_focal = FocalLoss(gamma=gamma, use_softmax=False, reduction="none")

    def loss(logits: Tensor, target: Tensor) -> Tensor:
        return _per_sample(monai_focal(logits, target))

    return loss


@LOSSES.register("dice")
def dice(smooth: float = 1e-5) -> PerSampleLoss:
    """Soft Dice loss on sigmoids, per sample and class, averaged (MONAI DiceLoss)."""
    from monai.losses import DiceLoss

    monai_dice = DiceLoss(sigmoid=True, smooth_nr=smooth, smooth_dr=smooth, reduction="none")

    def loss(logits: Tensor, target: Tensor) -> Tensor:
        return _per_sample(monai_dice(logits, target))

    return loss


@LOSSES.register("dicefocal")
def dicefocal(
    gamma: float = 2.0, lambda_dice: float = 1.0, lambda_focal: float = 1.0
) -> PerSampleLoss:
    """Dice + Focal, the paper's training loss (MONAI DiceFocalLoss, sigmoid, gamma 2)."""
    dice_term = dice()
    focal_term = focal(gamma)

    def loss(logits: Tensor, target: Tensor) -> Tensor:
        return lambda_dice * dice_term(logits, target) + lambda_focal * focal_term(logits, target)

    return loss


@LOSSES.register("ce")
def ce() -> PerSampleLoss:
    """Cross-entropy over classes, for softmax models; the target is one-hot or indices."""

    def loss(logits: Tensor, target: Tensor) -> Tensor:
        if target.dim() == logits.dim():
            target = target.argmax(1)  # (B, K, H, W) one-hot -> (B, H, W) indices
        return _per_sample(F.cross_entropy(logits, target.long(), reduction="none"))

    return loss


@LOSSES.register("dicece")
def dicece(smooth: float = 1e-5, lambda_dice: float = 1.0, lambda_ce: float = 1.0) -> PerSampleLoss:
    """Dice + cross-entropy for softmax models (MONAI DiceLoss on the softmax, background
    channel 0 left out of the Dice; torch cross-entropy over every channel): the softmax
    training loss. The target is one-hot over the K + 1 channels, or indices."""
    from monai.losses import DiceLoss

    monai_dice = DiceLoss(
        softmax=True, include_background=False, smooth_nr=smooth, smooth_dr=smooth,
        reduction="none",
    )  # fmt: skip
    ce_term = ce()

    def loss(logits: Tensor, target: Tensor) -> Tensor:
        if target.dim() != logits.dim():  # (B, H, W) indices -> one-hot
            target = F.one_hot(target.long(), logits.shape[1]).movedim(-1, 1).to(logits)
        dice_term = _per_sample(monai_dice(logits, target))
        return lambda_dice * dice_term + lambda_ce * ce_term(logits, target)

    return loss
