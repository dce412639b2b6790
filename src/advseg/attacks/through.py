"""Two threat protocols for a volume predicted by a sliding window: what the attack sees.

- ``through="inference"`` (the default, :func:`attack_through_inference`): the attack's model is
  the sliding-window inferer itself (:class:`advseg.inference.SlidingWindow`): overlapping
  windows, Gaussian blending, mirroring, exactly what scores the volume. The gradient is the exact
  one of that whole function (recomputed window by window, so memory does not grow with the
  volume).
- ``through="tiles"`` (:func:`attack_through_tiles`): the published protocol of the volumetric
  robustness studies (Hanif et al., MICCAI 2023, VAFA; Malik et al., BMVC 2024): the volume is cut
  into non-overlapping tiles of the window's size, each tile is attacked on its own through the
  bare network, the tiles are stitched back, and the stitched volume is then scored with the
  overlapping inference. The attack never sees the inference it is scored under.

Both give adversarial volumes ``(B, C, D, H, W)`` within the budget around ``x``; comparing the
Dice each leaves is the point (the gap is a result). Under L-inf each tile keeps ``eps``, so the
stitched volume does; under L2 each tile of ``n`` voxels gets ``eps * sqrt(n / N)`` of a volume
of ``N`` voxels, so the stitched perturbation's norm stays within ``eps`` (tiles at the far edge
are moved back inside the volume and overlap their neighbour, which only lowers the norm).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from advseg.attacks import create_attack
from advseg.inference import SlidingWindow, window_slices
from advseg.losses import PerSampleLoss

Through = Literal["inference", "tiles"]
THROUGH: tuple[str, ...] = ("inference", "tiles")


def attack_volume(
    name: str,
    inferer: SlidingWindow,
    x: Tensor,
    y: Tensor,
    *,
    through: Through = "inference",
    loss: str | PerSampleLoss = "bce",
    eps: float = 4 / 255,
    generator: torch.Generator | None = None,
    **kwargs,
) -> Tensor:
    """Adversarial volumes by attack name under one threat protocol.

    Args:
        name: a registry attack name (``advseg attacks``).
        inferer: the sliding-window inference that scores the volumes.
        x: volumes ``(B, C, D, H, W)`` in the valid range.
        y: masks ``(B, K, D, H, W)`` (or class indices ``(B, D, H, W)`` for softmax losses).
        through: ``inference`` (end to end) or ``tiles`` (the published protocol).
        loss, eps, **kwargs: as :func:`advseg.attacks.create_attack`.
        generator: random starts; by default the attack's own seed.

    Returns:
        The adversarial volumes, ``(B, C, D, H, W)``.
    """
    if through == "inference":
        return attack_through_inference(name, inferer, x, y, loss=loss, eps=eps,
                                        generator=generator, **kwargs)  # fmt: skip
    if through == "tiles":
        return attack_through_tiles(name, inferer, x, y, loss=loss, eps=eps,
                                    generator=generator, **kwargs)  # fmt: skip
    raise ValueError(f"through must be one of {', '.join(THROUGH)}, got {through!r}")


def attack_through_inference(
    name: str,
    inferer: SlidingWindow,
    x: Tensor,
    y: Tensor,
    *,
    loss: str | PerSampleLoss = "bce",
    eps: float = 4 / 255,
    generator: torch.Generator | None = None,
    **kwargs,
) -> Tensor:
    """The attack with the whole sliding-window inference as its model (end to end)."""
    attack = create_attack(name, inferer, loss=loss, eps=eps, **kwargs)
    return attack(x, y, generator=generator)


def attack_through_tiles(
    name: str,
    inferer: SlidingWindow,
    x: Tensor,
    y: Tensor,
    *,
    loss: str | PerSampleLoss = "bce",
    eps: float = 4 / 255,
    generator: torch.Generator | None = None,
    **kwargs,
) -> Tensor:
    """Non-overlapping tiles of the inferer's window, each attacked through the bare network.

    Tiles are MONAI's windows at overlap 0 (the last along an axis moved back to end at the
    volume's edge); a volume smaller than the window is attacked as one padded tile. Tiles are
    attacked in order and stitched by writing each tile's result over the volume, so where an
    edge tile overlaps its neighbour the later tile's voxels are kept. Random starts draw from one
    generator across the tiles.
    """
    if x.dim() != 2 + inferer.spatial_dims:
        raise ValueError(f"expected x (B, C, {inferer.spatial_dims} axes), got {tuple(x.shape)}")
    norm = kwargs.get("norm", "linf")
    pad = inferer._padding(x.shape[2:])
    if any(pad):  # smaller than a window: one padded tile, as the inference pads it
        return _padded_tile(name, inferer, x, y, loss, eps, generator, kwargs)
    tiles = window_slices(x.shape[2:], inferer.roi_size, 0.0)
    tile_eps = eps * math.sqrt(math.prod(inferer.roi_size) / math.prod(x.shape[2:]))
    attack = create_attack(name, inferer.model, loss=loss,
                           eps=tile_eps if norm == "l2" else eps, **kwargs)  # fmt: skip
    if generator is None:
        generator = torch.Generator(device=x.device).manual_seed(attack.seed)
    x_adv = x.clone()
    for tile in tiles:
        index = (slice(None), slice(None), *tile)
        target = y[index] if y.dim() == x.dim() else y[(slice(None), *tile)]
        x_adv[index] = attack(x[index], target, generator=generator)
    return x_adv


def _padded_tile(name, inferer, x, y, loss, eps, generator, kwargs) -> Tensor:
    """A volume smaller than the window: zero-padded as the inference pads it, attacked whole,
    cropped back (a crop keeps the budget: it drops voxels of the perturbation)."""
    pad = inferer._padding(x.shape[2:])  # F.pad's order: last axis first
    crop = [slice(pad[2 * i], pad[2 * i] + s) for i, s in enumerate(reversed(x.shape[2:]))]
    attack = create_attack(name, inferer.model, loss=loss, eps=eps, **kwargs)
    x_adv = attack(F.pad(x, pad), F.pad(y, pad), generator=generator)
    return x_adv[(slice(None), slice(None), *reversed(crop))].contiguous()


class TiledAttack:
    """A registry attack run by the published tile protocol, with an attack's interface.

    What the evaluation engine (:mod:`advseg.evaluate.engine`) calls: ``attack(x, y,
    generator=)`` gives :func:`attack_through_tiles`'s volumes; every other attribute (``loss``,
    ``seed``, ``single_step``, ``setting``, ``model``: the bare network, so the engine never
    shares a gradient through the inferer for it) is the attack built on the bare network's.
    ``loss_ensemble`` is False: an ensemble's winning member differs per tile, so none is named.
    """

    loss_ensemble = False

    def __init__(
        self,
        name: str,
        inferer: SlidingWindow,
        *,
        loss: str | PerSampleLoss = "bce",
        eps: float = 4 / 255,
        **kwargs,
    ) -> None:
        self.name_given, self.inferer, self.eps_given = name, inferer, eps
        self.loss_given, self.kwargs = loss, kwargs
        self.inner = create_attack(name, inferer.model, loss=loss, eps=eps, **kwargs)

    def __getattr__(self, key: str):
        if key == "inner":  # not set yet (copy, unpickling): no recursion
            raise AttributeError(key)
        return getattr(self.inner, key)

    def __call__(self, x: Tensor, y: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        return attack_through_tiles(self.name_given, self.inferer, x, y, loss=self.loss_given,
                                    eps=self.eps_given, generator=generator,
                                    **self.kwargs)  # fmt: skip
