"""PGD: projected gradient descent from a random start, with restarts."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from advseg.attacks.base import ATTACKS, Attack
from advseg.attacks.bim import check_alpha, check_steps
from advseg.errors import UserError


@ATTACKS.register("pgd")
class PGD(Attack):
    """Projected Gradient Descent, L-inf or L2, random start, restarts keeping the worst case.

    Paper: Madry et al., "Towards Deep Learning Models Resistant to Adversarial Attacks",
    ICLR 2018, https://arxiv.org/abs/1706.06083.

    Distance measure: L-inf (signed steps) or L2 (normalised steps, projection onto the ball).

    Args:
        model, loss, eps, norm, valid_range, targeted, activation, seed, loss_kwargs: see
            :class:`~advseg.attacks.base.Attack`.
        steps: iterations per restart (default 10).
        alpha: step size; by default ``2.5 * eps / steps`` (Madry et al.).
        random_start: start from a random point of the ball (default true).
        restarts: number of runs; each sample keeps the run with the highest objective
            (the highest loss, or the lowest loss to the target when targeted).

    Shape:
        - x: ``(B, C, H, W)``; y: ``(B, K, H, W)``; output: ``(B, C, H, W)``.

    Example:
        >>> attack = PGD(model, loss="bce", eps=8 / 255, steps=10, restarts=2)
        >>> x_adv = attack(images, masks)
    """

    name = "pgd"

    def __init__(self, model: nn.Module, loss="bce", eps: float = 0.009, *, steps: int = 10,
                 alpha: float | None = None, random_start: bool = True, restarts: int = 1,
                 **kwargs) -> None:  # fmt: skip
        super().__init__(model, loss, eps, **kwargs)
        self.steps = check_steps(steps, self.name)
        self.alpha = check_alpha(alpha, 2.5 * self.eps / self.steps, self.name)
        if isinstance(restarts, bool) or not isinstance(restarts, int) or restarts < 1:
            raise UserError(f"{self.name}: restarts must be an integer >= 1, got {restarts!r}")
        self.random_start = bool(random_start)
        self.restarts = restarts

    def perturb(self, x: Tensor, y: Tensor, generator: torch.Generator) -> Tensor:
        best = self.run(x, y, generator)
        if self.restarts == 1:
            return best
        best_value = self.final_objective(best, y)  # (B,)
        for _ in range(self.restarts - 1):
            candidate = self.run(x, y, generator)
            value = self.final_objective(candidate, y)
            better = value > best_value  # (B,)
            best = torch.where(better.view(-1, *[1] * (x.dim() - 1)), candidate, best)
            best_value = torch.where(better, value, best_value)
        return best

    def run(self, x: Tensor, y: Tensor, generator: torch.Generator) -> Tensor:
        """One PGD run: ``steps`` projected steps from a random (or the clean) start."""
        x_adv = self.random_point(x, generator) if self.random_start else x.clone()
        for t in range(self.steps):
            grad, _, _ = self.gradient(x_adv, y, t)
            x_adv = self.project(self.step(x_adv, grad, self.alpha), x)
        return x_adv

    @torch.no_grad()
    def final_objective(self, x_adv: Tensor, y: Tensor) -> Tensor:
        """The plain objective (no pixel weights) at ``x_adv``, ``(B,)``: what restarts compare."""
        return self.objective(self.logits(x_adv), y)
