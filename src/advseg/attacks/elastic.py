"""An optimised smooth deformation: control-point displacements bounded in pixels."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from advseg.attacks.base import ATTACKS
from advseg.attacks.plausible import PlausibleAttack
from advseg.errors import UserError


def dense_displacement(control: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Control-point displacements ``(B, n, *grid)`` (pixels, axis order of ``shape``)
    interpolated (bi/trilinearly, corners aligned) to every pixel: ``(B, n, *shape)``.

    Linear interpolation is a convex combination, so no pixel moves further along an axis than
    the furthest control point: the bound on the control points is the bound on the field.
    """
    mode = "bilinear" if len(shape) == 2 else "trilinear"
    return F.interpolate(control, size=shape, mode=mode, align_corners=True)


def warp(x: Tensor, displacement: Tensor) -> Tensor:
    """``x`` ``(B, C, *S)`` sampled at each pixel plus its ``displacement`` ``(B, n, *S)``
    (pixels, axis order of ``S``): linear interpolation, the border repeated outside."""
    shape = x.shape[2:]
    axes = [torch.linspace(-1.0, 1.0, n, device=x.device) for n in shape]
    identity = torch.stack(torch.meshgrid(*axes, indexing="ij"))  # (n, *S), ij order
    scale = torch.tensor([2.0 / max(n - 1, 1) for n in shape], device=x.device)
    grid = identity + displacement * scale.view(-1, *([1] * len(shape)))  # (B, n, *S)
    grid = grid.flip(1).movedim(1, -1)  # grid_sample wants (x, y[, z]): last axis first
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True)


@ATTACKS.register("elastic")
class Elastic(PlausibleAttack):
    """A smooth deformation, each pixel moved by at most ``eps`` pixels along each axis.

    Paper: the deformation of AdvChain (Chen et al., MedIA 2022,
    https://arxiv.org/abs/2108.03429): displacements at a coarse grid of control points,
    interpolated to a smooth field, optimised by gradient through ``grid_sample``.

    Distance measure: the largest displacement of any pixel along any axis, in pixels (mm on a
    1 mm grid), ``max |u| <= eps``. The masks are not moved: the records score against the
    true masks, so part of a Dice drop at a few pixels is the anatomy moving, not the model
    failing; keep eps small (1-3 pixels).

    Args:
        model, loss, eps, valid_range, targeted, activation, seed, loss_kwargs, steps, alpha,
            random_start: see :class:`~advseg.attacks.plausible.PlausibleAttack`.
        grid: control points per axis (default 5; at least 2).

    Shape:
        - x: ``(B, C, H, W)`` or ``(B, C, D, H, W)``; y: masks of the same layout; output: as x.

    Example:
        >>> attack = Elastic(model, loss="dice", eps=2.0, steps=20)
        >>> x_adv = attack(images, masks)
    """

    name = "elastic"
    pixel_budget = False

    def __init__(self, model: nn.Module, loss="bce", eps: float = 2.0, *, grid: int = 5,
                 **kwargs) -> None:  # fmt: skip
        super().__init__(model, loss, eps, **kwargs)
        if isinstance(grid, bool) or not isinstance(grid, int) or grid < 2:
            raise UserError(f"{self.name}: grid must be an integer >= 2, got {grid!r}")
        self.grid = grid

    def start(self, x: Tensor, generator: torch.Generator) -> Tensor:
        n = x.dim() - 2
        shape = (len(x), n, *([self.grid] * n))
        theta = torch.empty(shape, device=x.device).uniform_(-1.0, 1.0, generator=generator)
        reach = self.size(x, theta).clamp_min(1e-12).view(-1, *([1] * (theta.dim() - 1)))
        return theta * (self.eps / reach)  # the furthest control point on the bound

    def render(self, x: Tensor, theta: Tensor) -> Tensor:
        return self.clip(warp(x, dense_displacement(theta, tuple(x.shape[2:]))))

    def project(self, x: Tensor, theta: Tensor) -> Tensor:
        return theta.clamp(-self.eps, self.eps)

    def size(self, x: Tensor, theta: Tensor) -> Tensor:
        return theta.flatten(1).abs().amax(dim=1)
