"""Defences: ways to make a segmentation model hold under attack, and to measure how well.

- :mod:`advseg.defences.adversarial_training`: the attack step inside a training step
  (FGSM-RS, PGD, TRADES), configured by ``train.adversarial`` and run by the one training loop.
- :mod:`advseg.defences.transforms`: input defences (median, blur, bit-depth, JPEG, noise) as
  model wrappers by name, with their adaptive (BPDA / EOT) views.
- :mod:`advseg.defences.smoothing`: randomized-smoothing certification of a segmentation model;
  :mod:`advseg.evaluate.certify` runs it over a split or a checkpoint and keeps its records.
"""

from __future__ import annotations

from advseg.defences.adversarial_training import (
    ADVERSARIAL_TRAINING,
    AdversarialConfig,
    AdversarialTraining,
    describe,
    trades_divergence,
)
from advseg.defences.transforms import (
    DEFENCES,
    AdaptiveView,
    DefendedModel,
    InputTransform,
    create_defence,
    defend,
    defended_name,
)

__all__ = [
    "ADVERSARIAL_TRAINING",
    "DEFENCES",
    "AdaptiveView",
    "AdversarialConfig",
    "AdversarialTraining",
    "DefendedModel",
    "InputTransform",
    "create_defence",
    "defend",
    "defended_name",
    "describe",
    "trades_divergence",
]
