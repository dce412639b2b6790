"""SegPGD: PGD whose loss shifts weight from right to wrong pixels over the iterations."""

from __future__ import annotations

from torch import Tensor

from advseg.attacks.base import ATTACKS, Activation
from advseg.attacks.pgd import PGD


@ATTACKS.register("segpgd")
class SegPGD(PGD):
    """SegPGD, adapted to sigmoid multi-label outputs as well as softmax.

    Paper: Gu et al., "SegPGD: An Effective and Efficient Adversarial Attack for Evaluating and
    Boosting Segmentation Robustness", ECCV 2022, https://arxiv.org/abs/2207.12391.

    At step ``t`` of ``T`` (0-based), pixels the model still gets right weigh ``1 - lambda`` and
    pixels already fooled weigh ``lambda``, with ``lambda = t / (2 T)``: first flip the right
    pixels, later keep the wrong ones wrong. "Right" is per pixel for softmax (argmax equals the
    label) and per (pixel, class) for sigmoid (``logit > 0`` equals the mask). When targeted,
    "fooled" means "already at the target". The weight multiplies the gradient flowing into each
    logit, which for pixel-wise losses (``bce``, ``focal``, ``ce``) is exactly the paper's weighted
    loss and for ``dice`` its natural extension.

    Distance measure: L-inf (or L2), as :class:`~advseg.attacks.pgd.PGD` (same arguments).

    Shape:
        - x: ``(B, C, H, W)``; y: ``(B, K, H, W)`` (or ``(B, H, W)`` indices for ``ce``);
          output: ``(B, C, H, W)``.

    Example:
        >>> attack = SegPGD(model, loss="bce", eps=8 / 255, steps=20)
        >>> x_adv = attack(images, masks)
    """

    name = "segpgd"

    def weigh(self, logits: Tensor, y: Tensor, t: int) -> Tensor:
        return segpgd_weigh(logits, y, t / (2 * self.steps), self.activation, self.targeted)


def segpgd_weigh(
    logits: Tensor, y: Tensor, lam: float, activation: Activation, targeted: bool
) -> Tensor:
    """``logits`` whose gradient is weighted ``1 - lam`` on the right elements and ``lam`` on the
    fooled ones (already at the target, when targeted): SegPGD's weighting at ``lam = t / 2T``."""
    right = agrees(logits, y, activation)
    fooled = right if targeted else ~right
    weight = (fooled * lam + ~fooled * (1 - lam)).to(logits.dtype)
    return scale_gradient(logits, weight)


def agrees(logits: Tensor, y: Tensor, activation: Activation) -> Tensor:
    """Where the hard prediction equals ``y``: ``(B, K, H, W)`` (sigmoid) or ``(B, 1, H, W)``."""
    if activation == "sigmoid":
        return (logits > 0) == (y > 0.5)
    labels = y.argmax(1) if y.dim() == logits.dim() else y  # (B, H, W)
    return (logits.argmax(1) == labels).unsqueeze(1)


def scale_gradient(logits: Tensor, weight: Tensor) -> Tensor:
    """``logits`` unchanged in value, with the gradient into each element scaled by ``weight``."""
    base = logits.detach()
    return base + (logits - base) * weight.detach()
