"""The per-sample Dice an attack tracks: the evaluation records' own scoring, on the device.

An attack that keeps "the best iterate by the metric" (APGD and PAdam with ``best="dice"``, the
members of SEA and its per-slice choice) must rank iterates exactly as the records will score
them, or it returns a point that looks worse in its own eyes than one it visited. The records
score :func:`advseg.labels.class_prediction` (sigmoid ``logit > 0``; softmax argmax with the
background channel 0 dropped) against the masks, per (slice, class) Dice
``2 tp / (2 tp + fp + fn)``, 1 where both are empty (:func:`advseg.metrics.dice_score`).
:func:`sample_dice` is that, averaged over the classes of each slice, in torch (no host copy per
step).

The attack sees its target as the model does (:func:`advseg.labels.model_target`): sigmoid masks
``(B, K, H, W)``, or for softmax the one-hot partition ``(B, K + 1, H, W)`` (or indices
``(B, H, W)``), whose channels after 0 are the classes. A pixel of two overlapping classes is in
the partition under the first of them only, so on such pixels this Dice can differ from the
records' (which score the multi-label masks); elsewhere it is the same number.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from advseg.labels import class_prediction


def sample_dice(logits: Tensor, y: Tensor, activation: str) -> Tensor:
    """Dice of the hard prediction per slice, ``(B,)`` float64: the mean over the foreground
    classes of ``2 tp / (2 tp + fp + fn)``, 1 for a class empty in both prediction and mask.

    Args:
        logits: ``(B, K, H, W)`` (sigmoid) or ``(B, K + 1, H, W)`` (softmax, channel 0 the
            background).
        y: the masks ``(B, K, H, W)`` (sigmoid); the one-hot ``(B, K + 1, H, W)`` or class
            indices ``(B, H, W)`` (softmax).
        activation: ``sigmoid`` or ``softmax``.
    """
    pred = class_prediction(logits, activation)  # (B, K, H, W) bool
    if y.dim() != logits.dim():
        y = F.one_hot(y.long(), logits.shape[1]).movedim(-1, 1)
    target = y > 0.5
    if activation == "softmax":
        target = target[:, 1:]  # the background is no class of the records
    tp = (pred & target).flatten(2).sum(2).double()  # (B, K)
    wrong = (pred ^ target).flatten(2).sum(2).double()  # fp + fn
    denominator = 2 * tp + wrong
    dice = torch.where(denominator > 0, 2 * tp / denominator.clamp(min=1), torch.ones_like(tp))
    return dice.mean(1)
