"""Input defences on volumes: the defence in front of a 3D model's sliding-window inference.

A clinic would filter the scan it has, the whole volume, before the inference splits it into
windows; so the defence is applied once per volume, ``inferer(transform(volume))``, not per window
(:class:`~advseg.defences.transforms.DefendedModel` around the
:class:`~advseg.inference.SlidingWindow`). The attacks then attack the whole pipeline end to end
through the inference (``--through inference``), naive or adaptive exactly as on slices: ``+bpda``
makes the backward of a rounding step (bit depth) the identity and ``+eot`` averages the logits
of a random one (noise) over draws (:mod:`advseg.attacks.adaptive`); the inferer's graph-free
gradient flows through the view as through any differentiable input step.

The transforms that make sense in 3D (``volumetric``) work on ``(B, C, D, H, W)``: ``median:K``
(a ``K^3`` cube), ``blur:SIGMA`` (a 3D Gaussian, sigma in voxels), ``bitdepth:B`` (over the
volumes' valid range: a CT's HU window, an MRI set's z-scored extremes) and ``noise:SIGMA``
(in the model inputs' units). ``jpeg`` is inherently 2D (8x8 blocks of an image) and is refused.
The tile protocol (``--through tiles``) attacks the bare network tile by tile, so it has no place
for a defence of the whole volume: refused for defended models.
"""

from __future__ import annotations

from torch import nn

from advseg.defences.transforms import DEFENCES, create_defence, defend
from advseg.errors import UserError


def volume_defences() -> list[str]:
    """The defences that work on whole volumes (the registry's ``volumetric`` ones)."""
    return [name for name in DEFENCES.names() if DEFENCES.get(name).volumetric]


def check_volume_defence(spec: str, where: str, through: tuple[str, ...] = ("inference",)) -> None:
    """Refuse, in one line naming ``where``, a defence that is inherently 2D, or any defence
    under the tile protocol."""
    transform = create_defence(spec)
    if transform is None:
        return
    if not transform.volumetric:
        raise UserError(f"{where}: defence {transform.name} is inherently 2D; on volumes use "
                        f"{', '.join(volume_defences())}")  # fmt: skip
    if "tiles" in through:
        raise UserError(f"{where}: defence {transform.spec} on volumes is attacked through the "
                        "inference only (the tile protocol attacks the bare network)")  # fmt: skip


def defend_volume(
    inferer: nn.Module, spec: str, valid_range: tuple[float, float] | None, where: str = "defence"
) -> nn.Module:
    """``inferer`` (the 3D model's sliding-window inference) behind the defence ``spec``,
    applied to the whole volume; ``none``: the inferer.

    Args:
        inferer: an :class:`~advseg.inference.SlidingWindow` (or any module on volumes).
        spec: a defence spec (``median:3``, ``bitdepth:5``, ...).
        valid_range: the volumes' ``(low, high)`` (:attr:`advseg.data.VolumeData.valid_range`),
            the range bit depth quantises; None (a source without one) refuses bit depth.
        where: names the model in a refusal.
    """
    check_volume_defence(spec, where)
    return defend(inferer, spec, valid_range, where)
