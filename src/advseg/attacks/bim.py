"""BIM: iterative FGSM, small signed steps projected back into the budget."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from advseg.attacks.base import ATTACKS, Attack
from advseg.errors import UserError


@ATTACKS.register("bim")
class BIM(Attack):
    """Basic Iterative Method (iterative FGSM), starting at the clean image.

    Paper: Kurakin et al., "Adversarial Examples in the Physical World", ICLR workshop 2017,
    https://arxiv.org/abs/1607.02533.

    Distance measure: L-inf (or L2 with normalised gradient steps).

    Args:
        model, loss, eps, norm, valid_range, targeted, activation, seed, loss_kwargs: see
            :class:`~advseg.attacks.base.Attack`.
        steps: number of iterations (default 10).
        alpha: step size; by default ``1.25 * eps / steps`` (the paper's ``min(eps + 4, 1.25 eps)``
            steps of one grey level).

    Shape:
        - x: ``(B, C, H, W)``; y: ``(B, K, H, W)``; output: ``(B, C, H, W)``.

    Example:
        >>> attack = BIM(model, loss="dicefocal", eps=8 / 255, steps=10)
        >>> x_adv = attack(images, masks)
    """

    name = "bim"

    def __init__(self, model: nn.Module, loss="bce", eps: float = 0.009, *, steps: int = 10,
                 alpha: float | None = None, **kwargs) -> None:  # fmt: skip
        super().__init__(model, loss, eps, **kwargs)
        self.steps = check_steps(steps, self.name)
        self.alpha = check_alpha(alpha, 1.25 * self.eps / self.steps, self.name)

    def perturb(self, x: Tensor, y: Tensor, generator: torch.Generator) -> Tensor:
        x_adv = x.clone()
        for _ in range(self.steps):
            grad, _, _ = self.gradient(x_adv, y)
            x_adv = self.project(self.step(x_adv, grad, self.alpha), x)
        return x_adv


def check_steps(steps: int, name: str) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise UserError(f"{name}: steps must be an integer >= 1, got {steps!r}")
    return steps


def check_alpha(alpha: float | None, default: float, name: str) -> float:
    if alpha is None:
        return default
    if not isinstance(alpha, (int, float)) or not alpha > 0 or alpha == float("inf"):
        raise UserError(f"{name}: alpha must be a finite number > 0, got {alpha!r}")
    return float(alpha)
