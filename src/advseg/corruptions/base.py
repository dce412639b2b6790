"""The base of every corruption: a TorchIO transform, a severity table and a seeded draw.

A corruption is what a scanner or a patient does to an image (motion, a bias field, noise...), not
an attack: it has no gradient and no budget, only a *severity* from 1 (mild) to 5 (severe), as in
ImageNet-C (Hendrycks & Dietterich, ICLR 2019, https://arxiv.org/abs/1903.12261) and its medical
followers (MedMNIST-C, ROOD-MRI). Each severity is a range of one *strength* parameter, the
ranges rising with the severity (:attr:`Corruption.levels`); the other parameters (an axis, a
sign, a position) are drawn at every severity alike.

The transform itself is TorchIO's deterministic one (``tio.Motion``, ``tio.Ghosting``, ...):
:meth:`Corruption.draw` draws its parameters from a ``torch.Generator`` (never the global one),
:meth:`Corruption.transform` builds it, so the same seed gives the same images and an image is
exactly TorchIO's transform of it given those parameters (then clipped to the valid range).

Layout: TorchIO works on ``(C, X, Y, Z)``. A slice ``(C, H, W)`` goes in as ``(C, 1, H, W)``
(so that TorchIO's k-space artefacts, which cut k-space along the last axis, stay in the plane),
a volume ``(C, D, H, W)`` as it is. A slice's spacing is one pixel, so its lengths (blur,
translation) are in pixels. A volume may carry its voxel size in mm (:attr:`Geometry.spacing`):
TorchIO then gets it as the image's affine, so that blur and motion act in mm (an anisotropic
voxel blurs and moves less through the plane, in voxels, than in it) and the anisotropy
corruption thickens the real slices; a length strength is then in in-plane pixels, the same
length in mm along every axis (:attr:`Geometry.pixel`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torchio as tio
from torch import Tensor

from advseg.errors import UserError
from advseg.registry import Registry

SEVERITIES = (1, 2, 3, 4, 5)

CORRUPTIONS: Registry[type[Corruption]] = Registry("corruption")


PLANE = (1, 2)
"""TorchIO's two in-plane axes (H, W), for slices and volumes alike (see the layout above)."""


@dataclass(frozen=True)
class Geometry:
    """Whether an image is a slice (TorchIO's X axis has one voxel) or a volume ``(D, H, W)``,
    and its voxel size in mm in TorchIO's axis order (a slice, or a volume without a known
    spacing: one unit per voxel)."""

    volume: bool
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)

    @property
    def pixel(self) -> float:
        """The in-plane voxel size (mean of H and W, mm): the unit of a length strength."""
        return (self.spacing[1] + self.spacing[2]) / 2

    @property
    def affine(self) -> np.ndarray:
        """TorchIO's ``(4, 4)`` affine of this voxel size (no rotation, origin 0)."""
        return np.diag([*map(float, self.spacing), 1.0])


class Corruption:
    """One corruption: its strength parameter's range per severity and its TorchIO transform.

    Subclasses set :attr:`name`, :attr:`strength` (the parameter that grows with the severity,
    with its unit), :attr:`levels` (five ``(low, high)`` ranges, both ends rising) and implement
    :meth:`parameters` and :meth:`transform`.
    """

    name: ClassVar[str] = "corruption"
    strength: ClassVar[str] = ""
    levels: ClassVar[tuple[tuple[float, float], ...]] = ()

    def draw(
        self,
        severity: int,
        generator: torch.Generator,
        geometry: Geometry,
    ) -> dict[str, Any]:
        """The transform's parameters at ``severity``, drawn from ``generator``.

        Args:
            severity: 1 to 5.
            generator: a CPU ``torch.Generator``; every draw comes from it.
            geometry: slice or volume (:class:`Geometry`).
        """
        low, high = self.levels[check_severity(severity, self.name) - 1]
        value = low + (high - low) * uniform(generator)
        return self.parameters(value, generator, geometry)

    def parameters(
        self, value: float, generator: torch.Generator, geometry: Geometry
    ) -> dict[str, Any]:
        """The transform's keyword arguments for strength ``value``; the rest drawn here."""
        raise NotImplementedError

    def transform(self, **params: Any) -> tio.Transform:
        """TorchIO's transform with these parameters."""
        raise NotImplementedError

    def apply(
        self, image: Tensor, params: dict[str, Any], geometry: Geometry | None = None
    ) -> Tensor:
        """One image in TorchIO's layout ``(C, X, Y, Z)`` (float32, CPU) through the transform,
        with ``geometry``'s voxel size (default one unit per voxel)."""
        return self.transform(**params)(subject_of(image, geometry))["image"].data


def subject_of(image: Tensor, geometry: Geometry | None = None) -> tio.Subject:
    """A TorchIO subject of one image ``(C, X, Y, Z)`` with ``geometry``'s voxel size."""
    affine = (geometry or Geometry(volume=True)).affine
    return tio.Subject(image=tio.ScalarImage(tensor=image, affine=affine))


def check_severity(severity: object, name: str = "corruption") -> int:
    """``severity`` as an int from 1 to 5, or a :class:`UserError`."""
    if isinstance(severity, bool) or not isinstance(severity, int) or severity not in SEVERITIES:
        raise UserError(f"{name}: severity must be 1, 2, 3, 4 or 5, got {severity!r}")
    return severity


def uniform(generator: torch.Generator, low: float = 0.0, high: float = 1.0) -> float:
    """One uniform draw in ``[low, high)`` from ``generator``."""
    return low + (high - low) * float(torch.rand((), generator=generator))


def sign(generator: torch.Generator) -> float:
    """+1 or -1, each with probability 1/2."""
    return 1.0 if float(torch.rand((), generator=generator)) < 0.5 else -1.0


def choice(generator: torch.Generator, options: tuple[int, ...]) -> int:
    """One of ``options``, uniformly."""
    return options[int(torch.randint(len(options), (), generator=generator))]


def to_torchio(image: Tensor) -> Tensor:
    """A slice ``(C, H, W)`` as ``(C, 1, H, W)``, a volume ``(C, D, H, W)`` as it is; float32."""
    image = image.detach().float().cpu()
    return image.unsqueeze(1) if image.dim() == 3 else image


def from_torchio(image: Tensor, volume: bool) -> Tensor:
    """The inverse of :func:`to_torchio`."""
    return image if volume else image.squeeze(1)
