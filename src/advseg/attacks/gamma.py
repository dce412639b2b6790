"""An optimised contrast curve: a gamma per image, bounded in log."""

from __future__ import annotations

import torch
from torch import Tensor

from advseg.attacks.base import ATTACKS
from advseg.attacks.plausible import PlausibleAttack

_FLOOR = 1e-6  # keeps log(u) finite at black pixels (0 ** gamma is 0 either way)


@ATTACKS.register("gamma")
class Gamma(PlausibleAttack):
    """A contrast curve ``u ** gamma`` (``u`` the intensity scaled to [0, 1]), one gamma per
    image, ``|log gamma| <= eps``, optimised by gradient.

    The intensity augmentation of AdvChain (Chen et al., MedIA 2022,
    https://arxiv.org/abs/2108.03429) reduced to one monotone curve: black and white stay, the
    mid-tones move (eps 0.3: gamma from 0.74 to 1.35, as TorchIO's RandomGamma default).

    Distance measure: ``|log gamma|``; every pixel with ``0 < u < 1`` keeps
    ``|log(log u_adv / log u)| <= eps``.

    Args:
        model, loss, eps, valid_range, targeted, activation, seed, loss_kwargs, steps, alpha,
            random_start: see :class:`~advseg.attacks.plausible.PlausibleAttack`.

    Shape:
        - x: ``(B, C, H, W)`` or ``(B, C, D, H, W)``; y: masks of the same layout; output: as x.

    Example:
        >>> attack = Gamma(model, loss="dice", eps=0.3, steps=10)
        >>> x_adv = attack(images, masks)
    """

    name = "gamma"
    pixel_budget = False
    needs_range = "both"

    def start(self, x: Tensor, generator: torch.Generator) -> Tensor:
        draw = torch.rand(len(x), generator=generator, device=x.device)
        return torch.where(draw < 0.5, -self.eps, self.eps)  # (B,): at the bound, either side

    def render(self, x: Tensor, theta: Tensor) -> Tensor:
        low, high = self.valid_range
        u = ((x - low) / (high - low)).clamp(0.0, 1.0)
        gamma = torch.exp(theta).view(-1, *([1] * (x.dim() - 1)))
        curve = torch.where(u > 0, u.clamp_min(_FLOOR) ** gamma, torch.zeros_like(u))
        return self.clip(low + (high - low) * curve)

    def project(self, x: Tensor, theta: Tensor) -> Tensor:
        return theta.clamp(-self.eps, self.eps)

    def size(self, x: Tensor, theta: Tensor) -> Tensor:
        return theta.abs()
