"""Defences: ways to make a segmentation model hold under attack, and to measure how well.

- :mod:`advseg.defences.transforms`: input defences (median, blur, bit-depth, JPEG, noise) as
  model wrappers by name, with their adaptive (BPDA / EOT) views.
- :mod:`advseg.defences.smoothing`: randomized-smoothing certification of a segmentation model.
"""

from __future__ import annotations

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
    "DEFENCES",
    "AdaptiveView",
    "DefendedModel",
    "InputTransform",
    "create_defence",
    "defend",
    "defended_name",
]
