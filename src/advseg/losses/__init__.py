"""Segmentation losses by name, shared by training and by the attacks.

``create_loss(name, reduction="mean", **kw)`` gives a callable ``(logits, target) -> loss`` with
input first, target second; :data:`LOSSES` lists the names:

- :mod:`~advseg.losses.classic`: ``bce``, ``focal``, ``dice``, ``dicefocal`` (sigmoid), ``ce`` and
  ``dicece`` (softmax), the paper's and the first wave's losses;
- :mod:`~advseg.losses.segmentation`: the attack losses of SEA (Croce, Singh & Hein, ECCV 2024),
  each for sigmoid multi-label and for softmax outputs: ``masked-bce`` / ``masked-ce``,
  ``balanced-bce`` / ``balanced-ce``, ``js`` and ``masked-spherical``.
"""

from __future__ import annotations

from advseg.losses import classic, segmentation
from advseg.losses.base import (
    LOSSES,
    SOFTMAX_LOSSES,
    Loss,
    PerSampleLoss,
    Reduction,
    create_loss,
    loss_activation,
    per_sample,
)

__all__ = ["LOSSES", "SOFTMAX_LOSSES", "Loss", "PerSampleLoss", "Reduction", "classic",
           "create_loss", "loss_activation", "per_sample", "segmentation"]  # fmt: skip
