"""CosPGD: PGD whose per-pixel loss is weighted by the prediction's cosine to the label."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from advseg.attacks.base import ATTACKS, Activation
from advseg.attacks.pgd import PGD
from advseg.attacks.segpgd import scale_gradient


@ATTACKS.register("cospgd")
class CosPGD(PGD):
    """CosPGD, adapted to sigmoid multi-label outputs as well as softmax.

    Paper: Agnihotri & Keuper, "CosPGD: an efficient white-box adversarial attack for pixel-wise
    prediction tasks", ICML 2024, https://arxiv.org/abs/2302.02213.

    Each pixel's loss is weighted by the cosine similarity between the prediction and the label:
    softmax probabilities against the one-hot label (per pixel), or, for sigmoid outputs, each
    class's two-way distribution ``(p, 1 - p)`` against ``(y, 1 - y)`` (a sigmoid is a two-class
    softmax), giving ``(p y + (1 - p)(1 - y)) / sqrt(p^2 + (1 - p)^2)`` per (pixel, class).
    Pixels still predicted right weigh most; already fooled ones fade out. When targeted, the
    weight is ``1 - cos`` to the target (pixels far from the target weigh most), as in the
    paper's targeted variant. The weights are constants (no gradient flows through them) and
    scale the gradient into each logit, which is the paper's weighted loss for pixel-wise
    losses (``bce``, ``focal``, ``ce``).

    Distance measure: L-inf (or L2), as :class:`~advseg.attacks.pgd.PGD` (same arguments).

    Shape:
        - x: ``(B, C, H, W)``; y: ``(B, K, H, W)`` (or ``(B, H, W)`` indices for ``ce``);
          output: ``(B, C, H, W)``.

    Example:
        >>> attack = CosPGD(model, loss="bce", eps=8 / 255, steps=20)
        >>> x_adv = attack(images, masks)
    """

    name = "cospgd"

    def weigh(self, logits: Tensor, y: Tensor, t: int) -> Tensor:
        cos = cosine_to_label(logits.detach(), y, self.activation)
        return scale_gradient(logits, 1 - cos if self.targeted else cos)


def cosine_to_label(logits: Tensor, y: Tensor, activation: Activation) -> Tensor:
    """Cosine similarity of prediction and label: ``(B, K, H, W)`` sigmoid, ``(B, 1, H, W)``."""
    if activation == "sigmoid":
        p = torch.sigmoid(logits)
        y = y.to(p.dtype)
        return (p * y + (1 - p) * (1 - y)) / torch.sqrt(p**2 + (1 - p) ** 2)
    if y.dim() != logits.dim():  # (B, H, W) indices -> (B, K, H, W) one-hot
        y = F.one_hot(y.long(), logits.shape[1]).movedim(-1, 1)
    return F.cosine_similarity(logits.softmax(1), y.to(logits.dtype), dim=1).unsqueeze(1)
