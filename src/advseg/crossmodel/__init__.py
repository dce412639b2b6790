"""Attacks that cross models: images crafted on one model and scored on another.

- :mod:`~advseg.crossmodel.transfer`: transfer cells (crafting on a source, possibly an ensemble
  of sources, storing the images, the transfer matrix);
- :mod:`~advseg.crossmodel.cells`: the cross-model cells of an experiment grid (transfer,
  ensemble models, universal perturbations), run by :mod:`advseg.experiment`.

Ensemble models themselves are models (:mod:`advseg.models.ensemble`) and the universal
perturbation is an attack (:mod:`advseg.attacks.universal`).
"""
