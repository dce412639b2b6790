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


def warp(x: Tensor, displacement: Tensor, mode: str = "bilinear") -> Tensor:
    """``x`` ``(B, C, *S)`` sampled at each pixel plus its ``displacement`` ``(B, n, *S)``
    (pixels, axis order of ``S``): linear (``mode="nearest"``: nearest-neighbour, for label
    maps) interpolation, the border repeated outside."""
    shape = x.shape[2:]
    axes = [torch.linspace(-1.0, 1.0, n, device=x.device) for n in shape]
    identity = torch.stack(torch.meshgrid(*axes, indexing="ij"))  # (n, *S), ij order
    scale = torch.tensor([2.0 / max(n - 1, 1) for n in shape], device=x.device)
    grid = identity + displacement * scale.view(-1, *([1] * len(shape)))  # (B, n, *S)
    grid = grid.flip(1).movedim(1, -1)  # grid_sample wants (x, y[, z]): last axis first
    return F.grid_sample(x, grid, mode=mode, padding_mode="border", align_corners=True)


def moved(y: Tensor, field: Tensor) -> Tensor:
    """Masks ``(B, K, *S)`` warped linearly by ``field`` ``(B, n, *S)``; class indices
    ``(B, *S)`` (integer) nearest-neighbour."""
    if y.dim() == field.dim():
        return warp(y.float(), field)
    return warp(y[:, None].float(), field, mode="nearest")[:, 0].to(y.dtype)


@ATTACKS.register("elastic")
class Elastic(PlausibleAttack):
    """A smooth deformation, each pixel moved by at most ``eps`` pixels along each axis.

    Paper: the deformation of AdvChain (Chen et al., MedIA 2022,
    https://arxiv.org/abs/2108.03429): displacements at a coarse grid of control points,
    interpolated to a smooth field, optimised by gradient through ``grid_sample``.

    Distance measure: the largest displacement of any pixel along any axis, in pixels (mm on a
    1 mm grid), ``max |u| <= eps``.

    The deformation moves the anatomy, so the truth moves with it, as AdvChain warps the labels
    with the image's spatial transform: the attack raises its loss against the masks warped by
    the same field (linearly, soft, :meth:`target`), and :meth:`adversarial_truth` gives the
    masks the records score the deformed image against (the same field, nearest-neighbour, so
    they stay binary). A Dice drop is then the model failing to follow the anatomy, not the
    anatomy leaving its old outline.

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
    moves_anatomy = True

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

    def target(self, y: Tensor, theta: Tensor) -> Tensor:
        """``y`` warped by ``theta``'s field: masks ``(B, K, *S)`` linearly (differentiable in
        ``theta``), class indices ``(B, *S)`` nearest-neighbour."""
        return moved(y, dense_displacement(theta, tuple(y.shape[-(theta.dim() - 2) :])))

    def adversarial_truth(self, y: Tensor) -> Tensor:
        """Masks ``y`` ``(B, K, *S)`` warped nearest-neighbour by the last call's field (``y``
        itself when the last call moved nothing: eps 0)."""
        if self.theta is None:
            return y
        field = dense_displacement(self.theta.to(y.device), tuple(y.shape[2:]))
        return warp(y.float(), field, mode="nearest").to(y.dtype)

    def size(self, x: Tensor, theta: Tensor) -> Tensor:
        return theta.flatten(1).abs().amax(dim=1)
