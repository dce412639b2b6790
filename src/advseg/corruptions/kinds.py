"""The corruptions: MRI/CT acquisition artefacts and image degradations, each TorchIO's transform.

Each class gives its strength parameter's five ranges (severity 1 to 5, both ends rising) and
how the other parameters are drawn. Intensities are those of the image mapped to [0, 1] (the
valid range's low to high), lengths are in pixels (a volume with a known voxel size: in-plane
pixels, as mm along every axis; :class:`advseg.corruptions.base.Geometry`). The artefact models
are TorchIO's
(Pérez-García et al., CMPB 2021, https://arxiv.org/abs/2003.04696): motion after Shaw et al.
(MIDL 2019), ghosting, spikes (herringbone) and the polynomial bias field after Sudre et al.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torchio as tio
from torch import Tensor

from advseg.corruptions.base import (
    CORRUPTIONS,
    PLANE,
    Corruption,
    Geometry,
    choice,
    sign,
    subject_of,
    uniform,
)


@CORRUPTIONS.register("motion", help="patient motion (tio.Motion)")
class Motion(Corruption):
    """Patient motion during the acquisition (tio.Motion: k-space mixed from moved copies).

    Two movements, at a third and two thirds of the acquisition (the centre third of k-space
    keeps the still image, as TorchIO orders it); each rotates by the strength in degrees
    (random sign) about the axis normal to the slice plane and moves by the strength in pixels
    in a random in-plane direction; in a volume each also turns about the two other axes and
    moves through the plane by up to the strength (lengths in in-plane pixels, as mm: TorchIO
    moves the volume in mm on its voxel grid).
    """

    name = "motion"
    strength = "degrees and pixels per movement"
    levels = ((0.5, 1.0), (1.0, 2.0), (2.0, 4.0), (4.0, 6.0), (6.0, 9.0))
    movements = 2

    def parameters(self, value: float, generator: torch.Generator, geometry: Geometry):
        degrees, translation = [], []
        for _ in range(self.movements):
            other = [uniform(generator, -value, value) for _ in range(2)]
            other = other if geometry.volume else [0.0, 0.0]  # a slice turns in its plane only
            degrees.append([sign(generator) * value, *other])
            angle = uniform(generator, 0.0, 2 * math.pi)
            through = uniform(generator, -value, value) if geometry.volume else 0.0
            shift = [through, value * math.cos(angle), value * math.sin(angle)]
            translation.append([geometry.pixel * s for s in shift])  # mm
        times = np.arange(1, self.movements + 1) / (self.movements + 1)  # k-space in thirds
        return {"degrees": np.array(degrees), "translation": np.array(translation),
                "times": times, "image_interpolation": "linear"}  # fmt: skip

    def transform(self, **params: Any) -> tio.Transform:
        return tio.Motion(**params)


@CORRUPTIONS.register("ghosting", help="ghosts along the phase axis (tio.Ghosting)")
class Ghosting(Corruption):
    """Ghosts along an in-plane (phase-encoding) axis (tio.Ghosting: every n-th k-space line
    scaled), four ghosts, the k-space centre restored (2%) as in tio.RandomGhosting."""

    name = "ghosting"
    strength = "ghost intensity"
    levels = ((0.05, 0.1), (0.1, 0.2), (0.2, 0.35), (0.35, 0.55), (0.55, 0.8))

    def parameters(self, value: float, generator: torch.Generator, geometry: Geometry):
        return {"num_ghosts": 4, "axis": choice(generator, PLANE), "intensity": value,
                "restore": 0.02}  # fmt: skip

    def transform(self, **params: Any) -> tio.Transform:
        return tio.Ghosting(**params)


@CORRUPTIONS.register("spike", help="k-space spike: herringbone stripes (tio.Spike)")
class Spike(Corruption):
    """A k-space spike: herringbone stripes (tio.Spike), one spike at a uniform k-space position,
    its intensity relative to the spectrum's maximum."""

    name = "spike"
    strength = "spike intensity (x spectrum max)"
    levels = ((0.02, 0.05), (0.05, 0.1), (0.1, 0.2), (0.2, 0.35), (0.35, 0.5))

    def parameters(self, value: float, generator: torch.Generator, geometry: Geometry):
        positions = torch.rand(1, 3, generator=generator).numpy().astype(np.float64)
        return {"spikes_positions": positions, "intensity": value}

    def transform(self, **params: Any) -> tio.Transform:
        return tio.Spike(**params)


@CORRUPTIONS.register("biasfield", help="smooth intensity inhomogeneity (tio.BiasField)")
class BiasField(Corruption):
    """A smooth multiplicative intensity inhomogeneity (tio.BiasField: the exponential of a
    polynomial of order 3), every coefficient uniform in plus or minus the strength; a slice
    has no through-plane terms."""

    name = "biasfield"
    strength = "polynomial coefficient bound"
    levels = ((0.05, 0.1), (0.1, 0.2), (0.2, 0.3), (0.3, 0.45), (0.45, 0.6))
    order = 3

    def parameters(self, value: float, generator: torch.Generator, geometry: Geometry):
        coefficients = []
        for x_order in range(self.order + 1):  # TorchIO's order of the terms
            for y_order in range(self.order + 1 - x_order):
                for _ in range(self.order + 1 - (x_order + y_order)):
                    draw = uniform(generator, -value, value)
                    coefficients.append(draw if geometry.volume or x_order == 0 else 0.0)
        return {"coefficients": coefficients, "order": self.order}

    def transform(self, **params: Any) -> tio.Transform:
        return tio.BiasField(**params)


@CORRUPTIONS.register("noise", help="additive Gaussian noise (tio.Noise)")
class Noise(Corruption):
    """Additive Gaussian noise (tio.Noise), zero mean; the strength is its standard deviation
    as a fraction of the valid range."""

    name = "noise"
    strength = "standard deviation"
    levels = ((0.01, 0.02), (0.02, 0.04), (0.04, 0.06), (0.06, 0.09), (0.09, 0.12))

    def parameters(self, value: float, generator: torch.Generator, geometry: Geometry):
        seed = int(torch.randint(2**31 - 1, (), generator=generator))
        return {"mean": 0.0, "std": value, "seed": seed}

    def transform(self, **params: Any) -> tio.Transform:
        return tio.Noise(**params)


@CORRUPTIONS.register("blur", help="Gaussian blur (tio.Blur)")
class Blur(Corruption):
    """Gaussian blur (tio.Blur), the strength its standard deviation in pixels, in the plane
    (and through it, in a volume: the same length in mm, so fewer voxels across thick slices)."""

    name = "blur"
    strength = "standard deviation (pixels)"
    levels = ((0.3, 0.6), (0.6, 0.9), (0.9, 1.3), (1.3, 1.8), (1.8, 2.5))

    def parameters(self, value: float, generator: torch.Generator, geometry: Geometry):
        std = value * geometry.pixel  # mm (TorchIO's unit): pixels on a slice
        return {"std": (std if geometry.volume else 0.0, std, std)}

    def transform(self, **params: Any) -> tio.Transform:
        return tio.Blur(**params)


@CORRUPTIONS.register("gamma", help="contrast curve x ** gamma (tio.Gamma)")
class Gamma(Corruption):
    """A contrast change ``x ** gamma`` (tio.Gamma), ``|log gamma|`` the strength, its sign
    random (darker or brighter)."""

    name = "gamma"
    strength = "|log gamma|"
    levels = ((0.05, 0.1), (0.1, 0.2), (0.2, 0.3), (0.3, 0.45), (0.45, 0.6))

    def parameters(self, value: float, generator: torch.Generator, geometry: Geometry):
        return {"gamma": math.exp(sign(generator) * value)}

    def transform(self, **params: Any) -> tio.Transform:
        return tio.Gamma(**params)


@CORRUPTIONS.register("anisotropy", help="thick slices: down- and upsampled (tio.RandomAnisotropy)")
class Anisotropy(Corruption):
    """Thick slices: one axis downsampled (nearest) and back (linear), as tio.RandomAnisotropy
    does; the strength is the downsampling factor, the axis an in-plane one for a slice and the
    through-plane one for a volume."""

    name = "anisotropy"
    strength = "downsampling factor"
    levels = ((1.5, 2.0), (2.0, 2.5), (2.5, 3.5), (3.5, 4.5), (4.5, 6.0))

    def parameters(self, value: float, generator: torch.Generator, geometry: Geometry):
        return {"axis": 0 if geometry.volume else choice(generator, PLANE), "downsampling": value}

    def apply(
        self, image: Tensor, params: dict[str, Any], geometry: Geometry | None = None
    ) -> Tensor:
        """TorchIO's two resamplings (RandomAnisotropy's, with its axis and factor given)."""
        subject = subject_of(image, geometry)
        spacing = list(subject.spacing)
        spacing[params["axis"]] *= params["downsampling"]
        reference = (subject["image"].spatial_shape, subject["image"].affine.copy())
        down = tio.Resample(target=tuple(float(s) for s in spacing), image_interpolation="nearest")
        up = tio.Resample(target=reference, image_interpolation="linear")
        return up(down(subject))["image"].data
