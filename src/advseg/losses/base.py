"""The loss registry, the :class:`Loss` wrapper and :func:`create_loss`.

Every loss is called input first, target second, as MONAI and torch do: ``loss(logits, target)``
with ``logits`` and ``target`` of shape ``(B, K, H, W)`` (target in {0, 1}, one channel per class;
softmax losses also take class indices ``(B, H, W)``). The paper's notebook swapped the two, which
put the sigmoid on the mask (FACTS.md §4); here the order is fixed by the :class:`Loss` wrapper,
and a test checks it against MONAI.

``reduction="none"`` gives one value per sample, shape ``(B,)``: the mean of the loss over that
sample's classes and pixels. Averaged over the batch it equals ``reduction="mean"``. Attacks use
it to keep the worst case per sample.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Literal

from torch import Tensor, nn

from advseg.errors import UserError
from advseg.registry import Registry

PerSampleLoss = Callable[[Tensor, Tensor], Tensor]
"""``(logits (B, K, H, W), target (B, K, H, W)) -> (B,)``."""

Reduction = Literal["mean", "sum", "none"]

LOSSES: Registry[Callable[..., PerSampleLoss]] = Registry("loss")

SOFTMAX_LOSSES: frozenset[str] = frozenset({"ce", "dicece", "masked-ce", "balanced-ce"})
"""Losses for softmax models only (one class per pixel); the others are sigmoid multi-label
losses, or take an ``activation`` keyword and serve both (``js``, ``masked-spherical``)."""


def per_sample(values: Tensor) -> Tensor:
    """Mean over every dimension but the first: ``(B, ...) -> (B,)``."""
    return values.flatten(1).mean(1)


def loss_activation(name: str) -> str | None:
    """``softmax`` or ``sigmoid`` for a loss made for one kind of output; None for both."""
    if name in SOFTMAX_LOSSES:
        return "softmax"
    if name in LOSSES and "activation" in inspect.signature(LOSSES.get(name)).parameters:
        return None
    return "sigmoid"


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
    """A loss by registry name (``advseg.losses.LOSSES.names()``) or a callable.

    A callable must map ``(logits, target)`` to per-sample values ``(B,)``.

    Example:
        >>> loss = create_loss("focal", gamma=2.0)
        >>> loss(torch.zeros(2, 3, 4, 4), torch.ones(2, 3, 4, 4)).shape
        torch.Size([])
    """
    if callable(name):
        return Loss(getattr(name, "__name__", "custom"), name, reduction)
    try:
        per_sample_loss = LOSSES.get(name)(**kwargs)
    except TypeError as err:
        raise UserError(f"loss {name!r}: {err}") from None
    return Loss(name, per_sample_loss, reduction)
