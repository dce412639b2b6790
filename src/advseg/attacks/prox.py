"""Proximal operators of the L-inf and L2 norms, for the minimal-norm attacks.

Every function works on a batch of perturbations of any shape ``(B, ...)`` (slices or volumes):
the norm is taken over everything but the first axis, and ``lam`` is one weight per sample
``(B,)``.

- :func:`linf_prox_box` / :func:`l2_prox_box` (ALMA prox): the proximal point of
  ``lam * ||z|| + indicator(lower <= z <= upper)`` in the diagonal metric ``H``,
  ``argmin_z 1/2 sum_i H_i (z_i - d_i)^2 + lam ||z||`` over the box. The box is the valid pixel
  range seen from the clean image, so the result is a perturbation that stays in range.
- :func:`linf_prox` / :func:`l2_prox` (PDPGD): the plain Euclidean proximal points of
  ``lam * ||z||`` (PDPGD projects onto the range after each proximal step).
"""

from __future__ import annotations

import torch
from torch import Tensor

SEARCH_STEPS = 32
"""Bisection steps of the box-constrained proximal points: 2^-32 of the largest radius (below
float32's resolution)."""


def _per_sample(values: Tensor, like: Tensor) -> Tensor:
    """``(B,)`` values shaped to broadcast against ``like`` ``(B, ...)``."""
    return values.view(-1, *([1] * (like.dim() - 1)))


def linf_prox_box(d: Tensor, lam: Tensor, lower: Tensor, upper: Tensor, metric: Tensor) -> Tensor:
    """``argmin_z 1/2 sum H (z - d)^2 + lam ||z||_inf`` with ``lower <= z <= upper``.

    The minimiser is ``clamp(p, -r, r)`` with ``p = clamp(d, lower, upper)`` (the box contains 0)
    for the radius ``r`` where the derivative of the objective in ``r``,
    ``lam - sum_{|p_i| > r} H_i (|d_i| - r)``, changes sign; it increases with ``r``, so a
    bisection finds it (Rony et al. search the same convex function of ``r`` by ternary search).

    Args:
        d: the point ``(B, ...)``; lam: ``(B,)`` weights >= 0; lower, upper: the box, ``lower <=
            0 <= upper``, shaped like ``d``; metric: the diagonal metric ``H > 0``, like ``d``.
    """
    p = torch.maximum(torch.minimum(d, upper), lower).flatten(1)
    size, weight = d.abs().flatten(1), metric.flatten(1)
    low = torch.zeros_like(lam)
    high = p.abs().amax(1)
    for _ in range(SEARCH_STEPS):
        r = (low + high) / 2
        outside = p.abs() > r[:, None]
        slope = lam - (weight * (size - r[:, None]) * outside).sum(1)
        low = torch.where(slope < 0, r, low)
        high = torch.where(slope < 0, high, r)
    r = _per_sample((low + high) / 2, p)
    return torch.maximum(torch.minimum(p, r), -r).view_as(d)


def l2_prox_box(d: Tensor, lam: Tensor, lower: Tensor, upper: Tensor, metric: Tensor) -> Tensor:
    """``argmin_z 1/2 sum H (z - d)^2 + lam ||z||_2`` with ``lower <= z <= upper``.

    At a minimiser ``z != 0`` with ``t = ||z||_2`` the optimality condition separates per
    coordinate: ``z_i = clamp(H_i t d_i / (H_i t + lam), lower_i, upper_i)`` (the box is a product
    of intervals and the scaling is positive). ``||z(t)|| / t`` decreases in ``t``, so ``t`` is
    found by bisection on ``||z(t)|| = t``; where no ``t > 0`` solves it the minimiser is 0 and
    the bisection converges to it. (Our extension of ALMA prox, which Rony et al. define for
    L-inf.)
    """
    flat, weight = d.flatten(1), metric.flatten(1)
    low_box, high_box = lower.flatten(1), upper.flatten(1)

    def point(t: Tensor) -> Tensor:
        scaled = weight * t[:, None]
        return torch.maximum(torch.minimum(scaled * flat / (scaled + lam[:, None]), high_box),
                             low_box)  # fmt: skip

    low = torch.zeros_like(lam)
    high = torch.maximum(torch.minimum(flat, high_box), low_box).norm(dim=1)
    for _ in range(SEARCH_STEPS):
        t = (low + high) / 2
        longer = point(t).norm(dim=1) > t
        low = torch.where(longer, t, low)
        high = torch.where(longer, high, t)
    return point((low + high) / 2).view_as(d)


def l2_prox(d: Tensor, lam: Tensor) -> Tensor:
    """``argmin_z 1/2 ||z - d||^2 + lam ||z||_2``: ``d * max(0, 1 - lam / ||d||)`` per sample."""
    norms = d.flatten(1).norm(dim=1)
    factor = (1 - lam / norms.clamp(min=1e-30)).clamp(min=0)
    return d * _per_sample(factor, d)


def linf_prox(d: Tensor, lam: Tensor) -> Tensor:
    """``argmin_z 1/2 ||z - d||^2 + lam ||z||_inf``: ``d - lam * P(d / lam)`` (Moreau), ``P`` the
    projection onto the unit L1 ball; ``d`` itself where ``lam`` is 0."""
    safe = torch.where(lam > 0, lam, torch.ones_like(lam))
    scale = _per_sample(safe, d)
    out = d - scale * l1_ball_projection((d / scale).flatten(1)).view_as(d)
    return torch.where(_per_sample(lam > 0, d), out, d)


def l1_ball_projection(v: Tensor) -> Tensor:
    """The Euclidean projection of each row of ``v`` ``(B, N)`` onto the unit L1 ball.

    Duchi et al., "Efficient Projections onto the l1-Ball for Learning in High Dimensions",
    ICML 2008 (the sort-based algorithm): rows already inside are kept.
    """
    size = v.abs()
    ordered = size.sort(dim=1, descending=True).values
    running = ordered.cumsum(1) - 1
    ranks = torch.arange(1, v.shape[1] + 1, device=v.device, dtype=v.dtype)
    count = (ordered * ranks > running).sum(1, keepdim=True).clamp(min=1)  # rho
    theta = running.gather(1, count - 1) / count
    projected = torch.sign(v) * (size - theta).clamp(min=0)
    inside = size.sum(1, keepdim=True) <= 1
    return torch.where(inside, v, projected)
