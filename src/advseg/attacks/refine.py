"""Refining a minimal-norm attack's minimal eps: a batched APGD bisection below the norm it found.

The minimal-norm searches (``alma-prox``, ``pdpgd``) stop above what a fixed-eps attack needs:
on softmax unet-tiny models (phantom, synthetic CT; 500 steps, criterion ``dice<=0.5``) each
slice's minimal norm was a median 1.6-3x (PDPGD on the CT: 157x) the smallest eps at which a
50-step APGD broke it, so their robustness curve was an upper bound that disagreed with an APGD
sweep at the same eps by up to 0.875 of the slices. The norm a search found is a sound *upper*
bound ``u`` (its perturbation breaks the sample); this module lowers it inside the same run:

for ``rounds`` rounds, every sample still being refined runs a fixed-budget APGD (``steps``
steps, the attack's loss, the records' Dice keeping the returned iterate) in the ball of radius
``mid = sqrt(low * high)``, warm-started from its best breaking perturbation projected onto that
ball. The bisection is on log eps, from ``high = u`` down to ``low = u / 1024`` (the searches
overshoot by a factor, 1.5x to 150x, not by an amount: 6 rounds resolve a factor of 1.11). The
result is re-scored (one forward) with the attack's own criterion; if it breaks the sample,
``high`` becomes its actual norm (``<= mid``) and it is kept, else ``low = mid``. The whole
batch bisects together (``eps`` is a per-sample tensor). The returned eps is the smallest norm of
a perturbation *verified* to break the sample (never above ``u``).

A sample the search did not break (``inf``) gets one APGD run (``steps`` steps, random start) at
the attack's budget ``eps`` when that is finite (``advseg evaluate --eps 1``: the whole range);
if that breaks it, its norm is the upper bound the bisection starts from, else the sample stays
``inf``. A sample broken clean (0) is left as it is.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from advseg.attacks.apgd import APGD
from advseg.errors import UserError

DEFAULT_ROUNDS = 6
DEFAULT_STEPS = 20
SPAN = 1024.0
"""The bisection's range: from the search's norm down to that norm over :data:`SPAN`."""


@dataclass(frozen=True)
class Refinement:
    """``rounds`` bisection rounds of ``steps``-step APGD each."""

    rounds: int
    steps: int

    @property
    def label(self) -> str:
        """How the records name it: ``apgd-bisection 6x20``."""
        return f"apgd-bisection {self.rounds}x{self.steps}"


def parse_refine(value: object, name: str) -> Refinement | None:
    """The ``refine`` option: ``True``/``"on"`` (the default, :data:`DEFAULT_ROUNDS` x
    :data:`DEFAULT_STEPS`), ``False``/``"off"`` (None), or ``"ROUNDSxSTEPS"`` (e.g. ``"8x30"``).

    Raises:
        UserError: anything else, in one line naming the attack and the option.
    """
    if value is True or value == "on":
        return Refinement(DEFAULT_ROUNDS, DEFAULT_STEPS)
    if value is False or value == "off":
        return None
    match = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*", value) if isinstance(value, str) else None
    if match is None or min(int(match[1]), int(match[2])) < 1:
        raise UserError(f"{name}: refine must be on, off or ROUNDSxSTEPS with both >= 1 (e.g. "
                        f"{DEFAULT_ROUNDS}x{DEFAULT_STEPS}), got {value!r}")  # fmt: skip
    return Refinement(int(match[1]), int(match[2]))


def norms(delta: Tensor, norm: str) -> Tensor:
    """Per-sample ``(B,)`` L-inf or L2 norm of ``delta`` ``(B, ...)``."""
    flat = delta.flatten(1)
    return flat.abs().amax(1) if norm == "linf" else flat.norm(dim=1)


def project(images: Tensor, x: Tensor, radius: Tensor, search: APGD) -> Tensor:
    """``images`` into the per-sample ball ``radius`` ``(B,)`` around ``x``, then the range."""
    delta = images - x
    r = radius.view(-1, *[1] * (x.dim() - 1))
    if search.norm == "linf":
        delta = torch.maximum(torch.minimum(delta, r), -r)
    else:
        size = delta.flatten(1).norm(dim=1).view_as(r)
        delta = delta * (r / size.clamp(min=1e-30)).clamp(max=1)
    return search.clip(x + delta)


def bisect(
    search: APGD,
    x: Tensor,
    y: Tensor,
    images: Tensor,
    upper: Tensor,
    broken: Callable[[Tensor, Tensor], Tensor],
    refinement: Refinement,
    generator: torch.Generator,
    budget: float = math.inf,
) -> tuple[Tensor, Tensor]:
    """Lower each sample's breaking norm below ``upper`` by bisection (see the module).

    Args:
        search: the APGD that attacks at each radius (its model is frozen by the caller).
        x: clean images ``(B, C, *S)``; y: the masks the attack was called with.
        images: each sample's breaking image (norm ``upper``) ``(B, C, *S)``.
        upper: ``(B,)`` the norms found (``inf``: none; 0: broken clean, left as it is).
        broken: ``(logits, y) -> (B,)`` bool, the attack's criterion.
        refinement: rounds and steps.
        generator: for APGD's random start at ``budget``.
        budget: the radius a sample with ``upper`` ``inf`` is tried at (``inf``: not tried).

    Returns:
        ``(eps (B,), images (B, C, *S))``: each sample's smallest verified breaking norm
        (``<= upper``) and the image at it.
    """
    eps, best = upper.clone(), images.clone()
    shape = (-1, *[1] * (x.dim() - 1))
    missing = torch.isinf(upper).nonzero().squeeze(1)
    if len(missing) and math.isfinite(budget) and budget > 0:
        xs, ys = x[missing], y[missing]
        radius = torch.full((len(missing), *shape[1:]), budget, device=x.device)
        candidate, _ = search.run(xs, ys, radius, refinement.steps, None, generator)
        with torch.no_grad():
            ok = broken(search.logits(candidate), ys)
        eps[missing[ok]] = norms(candidate - xs, search.norm)[ok]
        best[missing[ok]] = candidate[ok].detach()
    todo = (torch.isfinite(eps) & (eps > 0)).nonzero().squeeze(1)
    if len(todo) == 0:
        return eps, best
    xs, ys, kept = x[todo], y[todo], best[todo]
    high = eps[todo].clone()
    low = high / SPAN
    for _ in range(refinement.rounds):
        mid = (low * high).sqrt()
        start = project(kept, xs, mid, search)
        candidate, _ = search.run(xs, ys, mid.view(shape), refinement.steps, start, generator)
        candidate = candidate.detach()
        with torch.no_grad():
            ok = broken(search.logits(candidate), ys)  # re-scored: the image as it is returned
        size = norms(candidate - xs, search.norm)
        better = ok & (size < high)
        kept = torch.where(better.view(shape), candidate, kept)
        high = torch.where(better, size, high)
        low = torch.where(ok, low, mid)
    eps[todo] = high
    best[todo] = kept
    return eps, best
