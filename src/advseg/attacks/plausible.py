"""The base of the physically plausible attacks: a few parameters of a smooth transformation,
raised by gradient and kept inside a bound of their own.

AdvBias and AdvChain (Chen et al., "Realistic Adversarial Data Augmentation for MR Image
Segmentation", MICCAI 2020, https://arxiv.org/abs/2006.13322; "Enhancing MR image segmentation
with realistic adversarial data augmentation", MedIA 2022, https://arxiv.org/abs/2108.03429)
showed that optimising a bias field or a deformation finds failures that random ones of the same
size miss. Here an attack is a map ``render(x, theta) -> x_adv`` from a small parameter tensor
``theta`` (polynomial coefficients, control-point displacements, a gamma), a projection of
``theta`` into the bound ``eps`` (in the attack's own terms, recorded as the records' ``eps``),
and signed-gradient ascent on ``theta`` from a random point of the bound (PGD on the parameters,
Madry et al. 2018). Slices ``(B, C, H, W)`` and volumes ``(B, C, D, H, W)`` alike.

With ``steps=0`` the attack is a random draw of the bound: the baseline that shows how much the
optimisation adds.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor, nn

from advseg.attacks.base import Attack
from advseg.attacks.bim import check_alpha
from advseg.errors import UserError


class PlausibleAttack(Attack):
    """Signed-gradient ascent on the parameters of a bounded smooth transformation.

    Args:
        model, loss, eps, valid_range, targeted, activation, seed, loss_kwargs, record_trace:
            see :class:`~advseg.attacks.base.Attack`; ``eps`` is the bound in the attack's own
            terms and ``norm`` must stay ``linf`` (the parameters' bound is the attack's).
        steps: ascent steps (default 10); 0 keeps the random start (a random transformation at
            the bound).
        alpha: step size in the bound's units; by default ``2.5 * eps / steps``.
        random_start: start from a random point at the bound (default true), else from the
            identity.

    Subclasses give :meth:`start`, :meth:`render`, :meth:`project` and :meth:`size` (how far a
    parameter tensor reaches, in the bound's units).
    """

    norms: ClassVar[tuple[str, ...]] = ("linf",)
    needs_range: ClassVar[str] = ""
    """``low``: the render needs a finite floor of the valid range; ``both``: both bounds."""

    def __init__(self, model: nn.Module, loss="bce", eps: float = 0.3, *, steps: int = 10,
                 alpha: float | None = None, random_start: bool = True,
                 **kwargs) -> None:  # fmt: skip
        super().__init__(model, loss, eps, **kwargs)
        low, high = self.valid_range
        bounds = {"low": [low], "both": [low, high]}.get(self.needs_range, [])
        if not all(math.isfinite(b) for b in bounds):
            raise UserError(
                f"{self.name}: needs a finite valid_range "
                f"{'floor' if self.needs_range == 'low' else '(low, high)'} to act on, got "
                f"{kwargs.get('valid_range')}"
            )
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise UserError(f"{self.name}: steps must be an integer >= 0, got {steps!r}")
        self.steps = steps
        self.alpha = check_alpha(alpha, 2.5 * self.eps / max(steps, 1), self.name)
        self.random_start = bool(random_start)
        self.theta: Tensor | None = None
        """The parameters of the last call's images (per sample), for inspection."""

    def __call__(self, x: Tensor, y: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        self.theta = None  # eps 0 returns x unchanged, with no parameters
        return super().__call__(x, y, generator=generator)

    def perturb(self, x: Tensor, y: Tensor, generator: torch.Generator) -> Tensor:
        theta = self.start(x, generator) if self.random_start else self.identity(x)
        for t in range(self.steps):
            theta = theta.detach().requires_grad_(True)
            logits = self.logits(self.render(x, theta))
            target = self.target(y, theta)
            self.note(logits, target)
            values = self.objective(self.weigh(logits, target, t), target)
            (grad,) = torch.autograd.grad(values.sum(), theta)
            direction = grad.sign()
            reach = self.size(x, direction).clamp_min(1e-12)  # (B,): the step's reach per sample
            shape = (-1,) + (1,) * (theta.dim() - 1)
            theta = self.project(x, theta.detach() + self.alpha * direction / reach.view(shape))
        self.theta = theta.detach()
        return self.render(x, self.theta).detach()

    def target(self, y: Tensor, theta: Tensor) -> Tensor:
        """The masks the images rendered with ``theta`` are attacked against: ``y`` (a spatial
        attack moves them with the anatomy)."""
        return y

    def identity(self, x: Tensor) -> Tensor:
        """The parameters that leave the images unchanged (zeros)."""
        return torch.zeros_like(self.start(x, torch.Generator(device=x.device).manual_seed(0)))

    def start(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """A random parameter tensor at the bound ``eps``, one per sample."""
        raise NotImplementedError

    def render(self, x: Tensor, theta: Tensor) -> Tensor:
        """The transformed images, in the valid range (differentiable in ``theta``)."""
        raise NotImplementedError

    def project(self, x: Tensor, theta: Tensor) -> Tensor:
        """``theta`` moved back inside the bound ``eps`` (each sample's)."""
        raise NotImplementedError

    def size(self, x: Tensor, theta: Tensor) -> Tensor:
        """How far ``theta`` reaches, ``(B,)``, in the bound's units (the bound: ``<= eps``)."""
        raise NotImplementedError
