"""Training augmentations, applied to an image and its mask together (MONAI dictionary transforms).

The paper trained with shift / scale / rotate, flips, brightness-contrast and elastic deformation
(its notebook used albumentations). Here the same family comes from MONAI's dictionary
transforms, which move ``image`` and ``mask`` with one random draw: geometry is interpolated
bilinearly for the image and nearest-neighbour for the mask (which stays in {0, 1}); intensity
changes touch the image only, which is clipped back to the valid range [0, 1].

With ``corruptions`` (``advseg train --augment corruptions``), each image is then, with
probability ``p_corruption``, corrupted by one of the named TorchIO corruptions at a random
severity (:class:`advseg.corruptions.augment.RandomCorruption`, which the training code passes in
as ``image_transform``): after the geometry, as a scanner acquires the anatomy it is given.

:class:`Augment` is the ``transform`` hook of ``SliceData.dataset(rows, transform)``: it maps an
item ``{"image": (C, S, S), "mask": (K, S, S), ...}`` to a new item of the same shapes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from advseg.errors import UserError


@dataclass
class AugmentConfig:
    """Probabilities and ranges of the training augmentations (albumentations-like defaults).

    Attributes:
        enabled: False turns every augmentation off.
        p_affine: probability of a random shift / scale / rotation.
        shift: largest shift, as a fraction of the image size.
        scale: largest relative zoom in or out.
        rotate_deg: largest rotation, in degrees.
        p_hflip, p_vflip: probabilities of a left-right / up-down flip.
        p_intensity: probability of each of the brightness and contrast changes.
        brightness: largest offset added to the intensities.
        contrast: largest relative change of the intensities' scale.
        p_elastic: probability of an elastic deformation.
        elastic_spacing: distance in pixels between the control points of the deformation.
        elastic_magnitude: range of the control points' displacement.
        corruptions: corruption names (``advseg corruptions``; ``all`` for every one) applied as
            an augmentation; empty (the default) applies none.
        p_corruption: probability that a training image is corrupted (by one of them, drawn
            uniformly).
        corruption_severities: the severities drawn from, uniformly.
    """

    enabled: bool = True
    p_affine: float = 0.5
    shift: float = 0.0625
    scale: float = 0.1
    rotate_deg: float = 15.0
    p_hflip: float = 0.5
    p_vflip: float = 0.0
    p_intensity: float = 0.5
    brightness: float = 0.1
    contrast: float = 0.1
    p_elastic: float = 0.25
    elastic_spacing: int = 32
    elastic_magnitude: tuple[float, float] = (1.0, 2.0)
    corruptions: list[str] = field(default_factory=list)
    p_corruption: float = 0.5
    corruption_severities: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 5])

    def __post_init__(self) -> None:
        probabilities = (
            "p_affine",
            "p_hflip",
            "p_vflip",
            "p_intensity",
            "p_elastic",
            "p_corruption",
        )
        for name in probabilities:
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise UserError(f"augment.{name}: {value} is not a probability in [0, 1]")
        if self.elastic_spacing < 2:
            raise UserError(f"augment.elastic_spacing: {self.elastic_spacing} must be >= 2")
        if self.corruptions and not self.enabled:
            raise UserError(
                "augment.corruptions: given with augment.enabled false (which turns every "
                "augmentation off)"
            )


def corruption_text(config: AugmentConfig | dict[str, Any]) -> str:
    """The corruption augmentation in words (``""`` when none): ``corruptions p 0.5 at
    severities 1-5 (motion, ghosting, ...)``; ``config`` may be a checkpoint's ``train.augment``
    mapping."""
    get = config.get if isinstance(config, dict) else lambda key, default=None: getattr(config, key)
    names = list(get("corruptions", None) or [])
    if not names or get("enabled", True) is False:
        return ""
    levels = sorted(int(s) for s in get("corruption_severities", None) or [1, 2, 3, 4, 5])
    severities = ", ".join(map(str, levels))
    if levels == list(range(levels[0], levels[-1] + 1)) and len(levels) > 1:
        severities = f"{levels[0]}-{levels[-1]}"
    p = float(get("p_corruption", 0.5))
    return f"corruptions p {p:g} at severities {severities} ({', '.join(names)})"


class Augment:
    """Random augmentation of one item, image and mask together.

    Randomness: MONAI transforms keep their own numpy random state; each call reseeds it with a
    number drawn from torch's generator. So the draws follow ``torch.manual_seed`` (reproducible
    runs), and DataLoader workers, which torch seeds one by one, do not repeat one another.

    Args:
        config: the augmentation settings.
        image_size: S, the side of the square images, to turn the fractional shift into pixels.
        image_transform: ``(C, S, S) -> (C, S, S)`` in [0, 1], applied to the image after the
            MONAI transforms (the corruptions of ``config.corruptions``); None applies none.
    """

    def __init__(
        self,
        config: AugmentConfig,
        image_size: int,
        image_transform: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        from monai.transforms import (  # here: MONAI's package import is heavy
            Compose,
            Rand2DElasticd,
            RandAffined,
            RandFlipd,
            RandScaleIntensityd,
            RandShiftIntensityd,
        )

        self.config = config
        self.image_transform = image_transform
        keys = ["image", "mask"]
        modes = ["bilinear", "nearest"]
        c = config
        self.transform = Compose(
            [
                RandAffined(
                    keys,
                    prob=c.p_affine,
                    rotate_range=math.radians(c.rotate_deg),
                    translate_range=(c.shift * image_size, c.shift * image_size),
                    scale_range=(c.scale, c.scale),
                    mode=modes,
                    padding_mode="zeros",
                ),
                RandFlipd(keys, prob=c.p_hflip, spatial_axis=1),  # axis 1 of (S, S): left-right
                RandFlipd(keys, prob=c.p_vflip, spatial_axis=0),
                RandScaleIntensityd("image", factors=c.contrast, prob=c.p_intensity),
                RandShiftIntensityd("image", offsets=c.brightness, prob=c.p_intensity),
                Rand2DElasticd(
                    keys,
                    spacing=c.elastic_spacing,
                    magnitude_range=c.elastic_magnitude,
                    prob=c.p_elastic,
                    mode=modes,
                    padding_mode="zeros",
                ),
            ]
        )

    def __call__(self, item: dict[str, Any]) -> dict[str, Any]:
        """``{"image": (C, S, S), "mask": (K, S, S), ...}`` -> the same keys, augmented."""
        if not self.config.enabled:
            return item
        from monai.utils import convert_to_tensor

        self.transform.set_random_state(seed=int(torch.randint(2**31, ()).item()))
        out = self.transform({"image": item["image"], "mask": item["mask"]})
        image = convert_to_tensor(out["image"], track_meta=False).float().clamp_(0.0, 1.0)
        mask = convert_to_tensor(out["mask"], track_meta=False).float()
        if self.image_transform is not None:
            image = self.image_transform(image).clamp_(0.0, 1.0)
        return {**item, "image": image, "mask": mask}
