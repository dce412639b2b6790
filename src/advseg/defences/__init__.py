"""Defences: ways to make a segmentation model hold under attack.

- :mod:`advseg.defences.adversarial_training`: the attack step inside a training step
  (FGSM-RS, PGD, TRADES), configured by ``train.adversarial`` and run by the one training loop.
"""

from __future__ import annotations

from advseg.defences.adversarial_training import (
    ADVERSARIAL_TRAINING,
    AdversarialConfig,
    AdversarialTraining,
    describe,
    trades_divergence,
)

__all__ = [
    "ADVERSARIAL_TRAINING",
    "AdversarialConfig",
    "AdversarialTraining",
    "describe",
    "trades_divergence",
]
