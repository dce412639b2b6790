"""The attack losses of SEA, each for sigmoid multi-label and for softmax outputs.

Croce, Singh & Hein, "Towards Reliable Evaluation and Fast Training of Robust Semantic
Segmentation Models", ECCV 2024, https://arxiv.org/abs/2306.12941. Their attack ensemble (SEA)
runs APGD with four losses whose strengths complement each other; pixel-wise cross-entropy alone
keeps pushing pixels that are already wrong, and large classes drown small ones.

Softmax models predict one class per pixel (``argmax``); sigmoid models take one decision per
(pixel, class) (``logit > 0``, organs may overlap). "Correct" below means per pixel for softmax
and per (pixel, class) for sigmoid. Every loss returns one value per sample, ``(B,)``: the sum of
its terms divided by the number of elements (pixels for softmax, pixels x classes for sigmoid), so
that with nothing masked the masked losses equal the plain ones.

- ``masked-bce`` / ``masked-ce``: cross-entropy over the correct elements only (the mask is a
  constant): the attack spends nothing on what it has already flipped.
- ``balanced-bce`` / ``balanced-ce``: each element weighted by the inverse frequency of its true
  class in its sample, so that every class present counts as much as any other (small organs as
  much as the background). Sigmoid: per class, positives and negatives are the two classes.
- ``js``: the Jensen-Shannon divergence between the predicted distribution and the one-hot label
  (sigmoid: each class's two-way distribution ``(p, 1 - p)`` against ``(y, 1 - y)``). Bounded by
  ``log 2``, so flipped pixels saturate instead of dominating.
- ``masked-spherical``: minus the true class's logit after projecting the logits onto the unit
  sphere (``z / ||z||_2`` over the classes), on the correct elements only. For sigmoid outputs the
  classes' logits are projected together and the term of class ``k`` is its signed coordinate
  ``(2 y_k - 1) z_k / ||z||``; with one class that coordinate is only a sign (no gradient).

- ``cosine``: one minus the cosine similarity between the prediction and the one-hot label, per
  pixel (PAdam-Cos, Halmosi et al., ECCV 2024, https://arxiv.org/abs/2407.09150): softmax, the
  raw logits over the classes (the reference's form); sigmoid, each class's two-way probability
  ``(p, 1 - p)`` against ``(y, 1 - y)`` (the logits' two-way form ``(z / 2, -z / 2)`` has a
  constant cosine, no gradient).

``js``, ``masked-spherical`` and ``cosine`` take ``activation="sigmoid"`` or ``"softmax"``; the
attacks pass their own activation.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from advseg.errors import UserError
from advseg.losses.base import LOSSES, PerSampleLoss, per_sample

Activation = Literal["sigmoid", "softmax"]
_TINY = 1e-12  # keeps logs and norms finite


def _labels(logits: Tensor, target: Tensor) -> Tensor:
    """Class indices ``(B, H, W)`` from a one-hot ``(B, K, H, W)`` target or indices."""
    return (target.argmax(1) if target.dim() == logits.dim() else target).long()


def _one_hot(logits: Tensor, target: Tensor) -> Tensor:
    """A one-hot ``(B, K, H, W)`` target in the logits' dtype."""
    if target.dim() != logits.dim():
        target = F.one_hot(target.long(), logits.shape[1]).movedim(-1, 1)
    return target.to(logits.dtype)


def _check(activation: str) -> None:
    if activation not in ("sigmoid", "softmax"):
        raise UserError(f"activation {activation!r} is not 'sigmoid' or 'softmax'")


@LOSSES.register("masked-bce")
def masked_bce() -> PerSampleLoss:
    """BCE over the (pixel, class) elements still classified correctly (sigmoid)."""

    def loss(logits: Tensor, target: Tensor) -> Tensor:
        correct = ((logits > 0) == (target > 0.5)).detach()  # (B, K, H, W)
        values = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        return per_sample(values * correct)

    return loss


@LOSSES.register("masked-ce")
def masked_ce() -> PerSampleLoss:
    """Cross-entropy over the pixels still classified correctly (softmax; SEA's Mask-CE)."""

    def loss(logits: Tensor, target: Tensor) -> Tensor:
        labels = _labels(logits, target)  # (B, H, W)
        correct = (logits.argmax(1) == labels).detach()
        return per_sample(F.cross_entropy(logits, labels, reduction="none") * correct)

    return loss


@LOSSES.register("balanced-bce")
def balanced_bce() -> PerSampleLoss:
    """BCE with each element weighted by the inverse frequency of its true value in its class.

    Per sample and class: the mean BCE over the class's positives and the mean over its
    negatives, averaged (one of them when the other is absent); then the mean over the classes.
    """

    def loss(logits: Tensor, target: Tensor) -> Tensor:
        values = F.binary_cross_entropy_with_logits(logits, target, reduction="none").flatten(2)
        positive = (target > 0.5).flatten(2).to(values.dtype)  # (B, K, N)
        negative = 1 - positive
        n_pos, n_neg = positive.sum(2), negative.sum(2)  # (B, K)
        mean_pos = (values * positive).sum(2) / n_pos.clamp(min=1)
        mean_neg = (values * negative).sum(2) / n_neg.clamp(min=1)
        present = (n_pos > 0).to(values.dtype) + (n_neg > 0).to(values.dtype)  # 1 or 2
        return ((mean_pos + mean_neg) / present).mean(1)

    return loss


@LOSSES.register("balanced-ce")
def balanced_ce() -> PerSampleLoss:
    """Cross-entropy with each pixel weighted by the inverse frequency of its true class.

    Per sample: the mean CE over each class's pixels, averaged over the classes present.
    """

    def loss(logits: Tensor, target: Tensor) -> Tensor:
        labels = _labels(logits, target)
        values = F.cross_entropy(logits, labels, reduction="none").flatten(1)  # (B, N)
        one_hot = _one_hot(logits, labels).flatten(2)  # (B, K, N)
        counts = one_hot.sum(2)  # (B, K)
        class_means = (one_hot * values.unsqueeze(1)).sum(2) / counts.clamp(min=1)
        present = (counts > 0).to(values.dtype)
        return (class_means * present).sum(1) / present.sum(1)

    return loss


def _js_divergence(p: Tensor, log_p: Tensor, q: Tensor, dim: int) -> Tensor:
    """``JS(p, q) = (KL(p || m) + KL(q || m)) / 2``, ``m = (p + q) / 2``, summed over ``dim``."""
    log_m = ((p + q) / 2).clamp(min=_TINY).log()
    kl_p = (p * (log_p - log_m)).sum(dim)
    kl_q = (torch.xlogy(q, q) - q * log_m).sum(dim)
    return (kl_p + kl_q) / 2


@LOSSES.register("js")
def js(activation: Activation = "sigmoid") -> PerSampleLoss:
    """Jensen-Shannon divergence between the prediction and the label (SEA's JS loss)."""
    _check(activation)

    def loss(logits: Tensor, target: Tensor) -> Tensor:
        if activation == "softmax":
            divergence = _js_divergence(
                logits.softmax(1), logits.log_softmax(1), _one_hot(logits, target), dim=1
            )  # (B, H, W)
            return per_sample(divergence)
        p = torch.stack([torch.sigmoid(logits), torch.sigmoid(-logits)])  # (2, B, K, H, W)
        log_p = torch.stack([F.logsigmoid(logits), F.logsigmoid(-logits)])
        q = torch.stack([target, 1 - target])
        return per_sample(_js_divergence(p, log_p, q, dim=0))  # (B, K, H, W) -> (B,)

    return loss


@LOSSES.register("masked-spherical")
def masked_spherical(activation: Activation = "sigmoid") -> PerSampleLoss:
    """Minus the true class's coordinate of the logits on the unit sphere, on correct elements.

    SEA's masked spherical loss: normalising the logits takes away the incentive to grow their
    scale, and the mask keeps the attack on the elements it has not flipped yet.
    """
    _check(activation)

    def loss(logits: Tensor, target: Tensor) -> Tensor:
        unit = logits / logits.norm(p=2, dim=1, keepdim=True).clamp(min=_TINY)  # (B, K, H, W)
        if activation == "softmax":
            labels = _labels(logits, target)
            correct = (logits.argmax(1) == labels).detach()  # (B, H, W)
            true_coordinate = unit.gather(1, labels.unsqueeze(1)).squeeze(1)
            return per_sample(-true_coordinate * correct)
        correct = ((logits > 0) == (target > 0.5)).detach()  # (B, K, H, W)
        signed = (2 * target - 1) * unit
        return per_sample(-signed * correct)

    return loss


@LOSSES.register("cosine")
def cosine(activation: Activation = "sigmoid") -> PerSampleLoss:
    """One minus the cosine similarity of the prediction and the one-hot label (PAdam-Cos)."""
    _check(activation)

    def loss(logits: Tensor, target: Tensor) -> Tensor:
        if activation == "softmax":
            similarity = F.cosine_similarity(logits, _one_hot(logits, target), dim=1)  # (B, H, W)
            return per_sample(1 - similarity)
        p = torch.sigmoid(logits)
        t = target.to(logits.dtype)
        similarity = (p * t + (1 - p) * (1 - t)) / (p**2 + (1 - p) ** 2).sqrt()  # |t| = 1
        return per_sample(1 - similarity)

    return loss
