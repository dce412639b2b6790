"""MI-FGSM: iterative FGSM with a momentum of L1-normalised gradients."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from advseg.attacks.base import ATTACKS, Attack
from advseg.attacks.bim import check_alpha, check_steps
from advseg.errors import UserError


@ATTACKS.register("mifgsm")
class MIFGSM(Attack):
    """Momentum Iterative FGSM: steps along the sign of an accumulated, normalised gradient.

    Paper: Dong et al., "Boosting Adversarial Attacks with Momentum", CVPR 2018,
    https://arxiv.org/abs/1710.06081.

    Distance measure: L-inf (or L2 with normalised steps).

    Args:
        model, loss, eps, norm, valid_range, targeted, activation, seed, loss_kwargs: see
            :class:`~advseg.attacks.base.Attack`.
        steps: iterations (default 10).
        alpha: step size; by default ``eps / steps`` (the paper's choice).
        decay: momentum factor ``mu`` (default 1.0).

    Shape:
        - x: ``(B, C, H, W)``; y: ``(B, K, H, W)``; output: ``(B, C, H, W)``.

    Example:
        >>> attack = MIFGSM(model, loss="focal", eps=8 / 255, steps=10, decay=1.0)
        >>> x_adv = attack(images, masks)
    """

    name = "mifgsm"

    def __init__(self, model: nn.Module, loss="bce", eps: float = 0.009, *, steps: int = 10,
                 alpha: float | None = None, decay: float = 1.0, **kwargs) -> None:  # fmt: skip
        super().__init__(model, loss, eps, **kwargs)
        self.steps = check_steps(steps, self.name)
        self.alpha = check_alpha(alpha, self.eps / self.steps, self.name)
        if not isinstance(decay, (int, float)) or not 0 <= decay < float("inf"):
            raise UserError(f"{self.name}: decay must be a finite number >= 0, got {decay!r}")
        self.decay = float(decay)

    def perturb(self, x: Tensor, y: Tensor, generator: torch.Generator) -> Tensor:
        x_adv = x.clone()
        momentum = torch.zeros_like(x)  # (B, C, H, W)
        for t in range(self.steps):
            grad, _, _ = self.gradient(x_adv, y, t)
            scale = grad.abs().mean(dim=tuple(range(1, grad.dim())), keepdim=True).clamp_min(1e-12)
            momentum = self.decay * momentum + grad / scale
            x_adv = self.project(self.step(x_adv, momentum, self.alpha), x)
        return x_adv
