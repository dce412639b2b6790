"""Real-world corruptions by name and severity, through TorchIO: ``corrupt(x, "motion", 3)``.

Not attacks (no gradient, no budget): what a scanner or a patient does to an image. Each name
(:data:`CORRUPTIONS`: motion, ghosting, spike, biasfield, noise, blur, gamma, anisotropy) has five
severities, each a documented range of one strength parameter (:mod:`advseg.corruptions.kinds`,
``advseg corruptions`` lists them); the parameters are drawn from a seeded ``torch.Generator`` and
the image is TorchIO's deterministic transform of it (:mod:`advseg.corruptions.base`).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import torch
from torch import Tensor

from advseg.corruptions import kinds  # noqa: F401  (fills the registry)
from advseg.corruptions.base import (
    CORRUPTIONS,
    SEVERITIES,
    Corruption,
    Geometry,
    check_severity,
    from_torchio,
    to_torchio,
)
from advseg.errors import UserError

__all__ = ["CORRUPTIONS", "NO_LOSS", "SEVERITIES", "Corruption", "Geometry", "check_severity",
           "corrupt", "corruption_label", "corruption_of", "corruption_seed", "create_corruption",
           "parse_corruptions"]  # fmt: skip


def create_corruption(name: str) -> Corruption:
    """The corruption registered as ``name``; an unknown name lists the valid ones."""
    return CORRUPTIONS.get(name)()


def corrupt(
    x: Tensor,
    name: str,
    severity: int,
    *,
    generator: torch.Generator | None = None,
    seed: int = 0,
    valid_range: tuple[float, float] | None = (0.0, 1.0),
    spacing: Sequence[float] | None = None,
) -> Tensor:
    """Corrupted images: each image of the batch with its own parameters, drawn in turn.

    The images are mapped from ``valid_range`` to [0, 1], transformed by TorchIO, clipped to
    [0, 1] and mapped back, so the severities mean the same on any intensity scale.

    Args:
        x: slices ``(B, C, H, W)`` or volumes ``(B, C, D, H, W)``, in ``valid_range``.
        name: a corruption name (see :data:`CORRUPTIONS`).
        severity: 1 (mild) to 5 (severe).
        generator: draws the parameters (a CPU generator); by default one seeded with ``seed``.
        seed: seeds the default generator.
        valid_range: the images' ``(low, high)``; None: each image's own minimum and maximum
            (images with no fixed range, e.g. MRI volumes z-scored one by one).
        spacing: volumes only: the voxel size ``(D, H, W)`` in mm, handed to TorchIO, so that
            blur, motion and anisotropy act in mm (:class:`~advseg.corruptions.base.Geometry`);
            default one unit per voxel.

    Returns:
        Images of ``x``'s shape, dtype and device, in ``valid_range``.

    Example:
        >>> x_c = corrupt(images, "motion", 3, seed=0)  # (B, C, H, W)
        >>> v_c = corrupt(volume, "blur", 3, valid_range=(-2.2, 3.4), spacing=(2.5, 0.8, 0.8))
    """
    corruption = create_corruption(name)
    severity = check_severity(severity, name)
    if x.dim() not in (4, 5):
        raise ValueError(f"corrupt: expected (B, C, H, W) or (B, C, D, H, W), got {tuple(x.shape)}")
    if spacing is not None and x.dim() != 5:
        raise ValueError("corrupt: a spacing is for volumes (B, C, D, H, W)")
    ranges = [valid_range] * len(x)
    if valid_range is None:  # each image's own range (a flat image: a unit range)
        ranges = [(float(v.min()), float(v.max()) if v.max() > v.min() else float(v.min()) + 1)
                  for v in x.detach()]  # fmt: skip
    for low, high in ranges:
        if not float(low) < float(high):
            raise UserError(f"{name}: valid_range {valid_range} must be (low, high), low < high")
    if generator is None:
        generator = torch.Generator().manual_seed(int(seed))
    volume = x.dim() == 5
    geometry = Geometry(volume)
    if spacing is not None:
        geometry = Geometry(volume, tuple(float(s) for s in spacing))
    out = []
    for image, (low, high) in zip(x.detach(), ranges, strict=True):  # (C, H, W) or (C, D, H, W)
        low, high = float(low), float(high)
        unit = ((image.float() - low) / (high - low)).cpu()
        params = corruption.draw(severity, generator, geometry)
        changed = corruption.apply(to_torchio(unit), params, geometry)
        changed = from_torchio(changed, geometry.volume).float().clamp(0.0, 1.0)
        out.append(changed * (high - low) + low)
    return torch.stack(out).to(device=x.device, dtype=x.dtype)


NO_LOSS = "none"
"""The ``loss`` column of a corruption cell's records: nothing is optimised."""


def corruption_label(name: str, severity: int) -> str:
    """The records' ``attack`` of a corruption cell, e.g. ``corruption:motion:3``."""
    return f"corruption:{name}:{severity}"


def corruption_of(label: str) -> tuple[str, int] | None:
    """``corruption:motion:3`` -> ``("motion", 3)``; None for an attack's label."""
    parts = str(label).split(":")
    if len(parts) == 3 and parts[0] == "corruption" and parts[2].isdigit():
        return parts[1], int(parts[2])
    return None


def corruption_seed(seed: int, name: str, severity: int, slice_id: str) -> int:
    """The seed of one image's corruption: stable across runs, batch sizes and shards."""
    return zlib.crc32(f"{seed}/{name}/{severity}/{slice_id}".encode())


def parse_corruptions(specs: Sequence[str], flag: str = "--corruption") -> list[tuple[str, int]]:
    """``["motion:3", "noise"]`` -> ``[("motion", 3), ("noise", 1), ..., ("noise", 5)]``.

    ``NAME:SEVERITY`` is one cell, ``NAME`` all five severities, ``all`` every corruption at
    every severity. Each (name, severity) once, in the order given.

    Raises:
        UserError: an unknown name, a bad severity, or a cell given twice.
    """
    cells: list[tuple[str, int]] = []
    for spec in specs:
        name, sep, level = str(spec).strip().partition(":")
        names = CORRUPTIONS.names() if name == "all" and not sep else [name]
        if name not in CORRUPTIONS and name != "all":
            raise UserError(f"{flag}: {CORRUPTIONS.unknown_message(name)}, or all")
        if sep:
            try:
                severity = int(level)
            except ValueError:
                raise UserError(f"{flag} {spec}: severity {level!r} is not 1 to 5") from None
            if name == "all":
                raise UserError(f"{flag} {spec}: 'all' takes no severity")
            levels = [check_severity(severity, f"{flag} {spec}")]
        else:
            levels = list(SEVERITIES)
        for one in names:
            for severity in levels:
                if (one, severity) in cells:
                    raise UserError(f"{flag}: {one}:{severity} is given twice")
                cells.append((one, severity))
    return cells
