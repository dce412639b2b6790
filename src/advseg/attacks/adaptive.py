"""Adaptive attacks on input defences: BPDA and EOT, as suffixes of any attack's name.

Athalye, Carlini & Wagner, ICML 2018, "Obfuscated Gradients Give a False Sense of Security",
https://arxiv.org/abs/1802.00420. A defence that rounds (bit-depth, JPEG) gives the attacker a
zero gradient, one that draws noise a gradient that changes at every call; neither makes the
model robust. The adaptive attack sees through both:

- ``+bpda`` (Backward Pass Differentiable Approximation): the forward runs the defence as it is,
  the backward treats every non-differentiable step (bit-depth and JPEG rounding) as the
  identity (a straight-through estimator). Differentiable steps (blur, noise, the median almost
  everywhere) keep their exact gradient.
- ``+eot`` (Expectation Over Transformation): the attacked forward averages the model's logits
  over ``eot_samples`` independent draws of a random defence, so each step follows the gradient
  of the expected logits, not of one draw. Deterministic defences are run once.

``pgd+bpda``, ``pgd+eot`` and ``pgd+bpda+eot`` work with every attack of the registry: the attack
is built on the defended model's ``adaptive_view(bpda=..., eot_samples=...)``
(:class:`advseg.defences.transforms.AdaptiveView`), which shares the model's parameters. The
records' ``attack`` column keeps the full name, so naive and adaptive results sit side by side.
A model without an input defence has no view: the adaptive attack equals the naive one. The
names are parsed by :func:`advseg.catalogue.parse_attack_name` (no torch: typos are answered
at once).
"""

from __future__ import annotations

from torch import nn

from advseg.errors import UserError

DEFAULT_EOT_SAMPLES = 8


def adaptive_model(
    model: nn.Module, modes: tuple[str, ...], eot_samples: int = DEFAULT_EOT_SAMPLES
) -> nn.Module:
    """The model an attack with these adaptive ``modes`` differentiates (see the module doc).

    A model offers its adaptive form through ``adaptive_view(bpda=..., eot_samples=...)``
    (:class:`advseg.defences.DefendedModel` does); any other model is returned as it is.
    """
    if isinstance(eot_samples, bool) or not isinstance(eot_samples, int) or eot_samples < 1:
        raise UserError(f"eot_samples must be an integer >= 1, got {eot_samples!r}")
    view = getattr(model, "adaptive_view", None)
    if not modes or view is None:
        return model
    return view(bpda="bpda" in modes, eot_samples=eot_samples if "eot" in modes else 1)
