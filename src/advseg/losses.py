"""Segmentation losses by name, shared by training and by the attacks.

Every loss is called input first, target second, as MONAI and torch do: ``loss(logits, target)``
with ``logits`` and ``target`` of shape ``(B, K, H, W)`` (target in {0, 1}, one channel per class).
The paper's notebook swapped the two, which put the sigmoid on the mask (FACTS.md §4); here the
order is fixed by the :class:`Loss` wrapper, and a test checks it against MONAI.

``reduction="none"`` gives one value per sample, shape ``(B,)``: the mean of the loss over that
sample's classes and pixels. Averaged over the batch it equals ``reduction="mean"``. Attacks use
it to keep the worst case per sample.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch.nn.functional as F
from monai.losses import DiceLoss, FocalLoss
from torch import Tensor, nn

from advseg.errors import UserError
from advseg.registry import Registry

PerSampleLoss = Callable[[Tensor, Tensor], Tensor]
"""``(logits (B, K, H, W), target (B, K, H, W)) -> (B,)``."""

Reduction = Literal["mean", "sum", "none"]

LOSSES: Registry[Callable[..., PerSampleLoss]] = Registry("loss")


def _per_sample(values: Tensor) -> Tensor:
    """Mean over every dimension but the first: ``(B, ...) -> (B,)``."""
    return values.flatten(1).mean(1)


@LOSSES.register("bce")
def bce() -> PerSampleLoss:
    """Binary cross-entropy on per-class sigmoids (multi-label)."""

    def loss(logits: Tensor, target: Tensor) -> Tensor:
        return _per_sample(F.binary_cross_entropy_with_logits(logits, target, reduction="none"))

    return loss


@LOSSES.register("focal")
def focal(gamma: float = 2.0) -> PerSampleLoss:
    """Sigmoid focal loss (Lin et al. 2017, MONAI FocalLoss), gamma 2 as in the paper."""
    monai_focal = FocalLoss(gamma=gamma, use_softmax=False, reduction="none")

    def loss(logits: Tensor, target: Tensor) -> Tensor:
        return _per_sample(monai_focal(logits, target))

    return loss


@LOSSES.register("dice")
def dice(smooth: float = 1e-5) -> PerSampleLoss:
    """Soft Dice loss on sigmoids, per sample and class, averaged (MONAI DiceLoss)."""
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


class Loss(nn.Module):
    """A named loss with a fixed argument order and a reduction.

    Args:
        name: the registry name, or a label for a custom callable.
        per_sample: ``(logits, target) -> (B,)``.
        reduction: ``mean`` or ``sum`` over the batch, or ``none`` for ``(B,)``.
    """

    def __init__(self, name: str, per_sample: PerSampleLoss, reduction: Reduction = "mean"):
        super().__init__()
        if reduction not in ("mean", "sum", "none"):
            raise UserError(f"reduction: {reduction!r} is not one of 'mean', 'sum', 'none'")
        self.name = name
        self.per_sample = per_sample
        self.reduction = reduction

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        if logits.shape[0] != target.shape[0]:
            raise ValueError(f"batch sizes differ: logits {logits.shape}, target {target.shape}")
        values = self.per_sample(logits, target.to(logits.dtype))
        if self.reduction == "mean":
            return values.mean()
        if self.reduction == "sum":
            return values.sum()
        return values

    def extra_repr(self) -> str:
        return f"name={self.name!r}, reduction={self.reduction!r}"


def create_loss(name: str | PerSampleLoss, reduction: Reduction = "mean", **kwargs) -> Loss:
    """A loss by registry name (``bce``, ``focal``, ``dice``, ``dicefocal``, ``ce``) or callable.

    A callable must map ``(logits, target)`` to per-sample values ``(B,)``.

    Example:
        >>> loss = create_loss("focal", gamma=2.0)
        >>> loss(torch.zeros(2, 3, 4, 4), torch.ones(2, 3, 4, 4)).shape
        torch.Size([])
    """
    if callable(name):
        return Loss(getattr(name, "__name__", "custom"), name, reduction)
    try:
        per_sample = LOSSES.get(name)(**kwargs)
    except TypeError as err:
        raise UserError(f"loss {name!r}: {err}") from None
    return Loss(name, per_sample, reduction)
