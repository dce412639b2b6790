"""Torch Datasets over cached volumes: training patches with foreground oversampling, and whole
volumes for sliding-window validation and evaluation.

Items have the slices' form (:mod:`advseg.data.dataset`), one spatial axis more:
``{"image": (1, D, H, W) float32, "mask": (K, D, H, W) float32, "row": int}``.

Patches follow nnU-Net's sampler (Isensee et al. 2021, ``nnUNetDataLoaderBase.get_bbox``): a
share ``foreground`` of them (nnU-Net: 1/3) is centred on a voxel of a class present in the
volume (class drawn uniformly, then one of its voxels; at most :data:`CLASS_VOXELS` voxels per
class kept, as nnU-Net keeps 10,000), the rest drawn uniformly; a volume smaller than the patch
is padded with zeros (the inputs' mean after the z-score; masks background), as the sliding
window pads. Every draw uses torch's generator, so ``torch.manual_seed`` (set per epoch by the
training loop) fixes the patches, and DataLoader workers, which torch seeds one by one, differ.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

#: Foreground voxels remembered per class and volume to centre patches on.
CLASS_VOXELS = 10_000


def crop(array: np.ndarray, start: tuple[int, ...], size: tuple[int, ...]) -> np.ndarray:
    """``array[..., start : start + size]`` over its last ``len(size)`` axes, zero where the box
    leaves the array (``start`` may be negative)."""
    lead = array.ndim - len(size)
    out = np.zeros((*array.shape[:lead], *size), array.dtype)
    src, dst = [slice(None)] * lead, [slice(None)] * lead
    for s, n, total in zip(start, size, array.shape[lead:], strict=True):
        lo, hi = max(s, 0), min(s + n, total)
        src.append(slice(lo, max(hi, lo)))
        dst.append(slice(lo - s, lo - s + max(hi - lo, 0)))
    out[tuple(dst)] = array[tuple(src)]
    return out


def _randint(low: int, high: int) -> int:
    """An integer in ``[low, high]`` from torch's generator."""
    return int(torch.randint(low, high + 1, ()).item())


class PatchDataset(Dataset):
    """``samples`` patches per volume of ``rows``, ``foreground`` of them on foreground.

    Args:
        data: the volumes (:class:`advseg.data.volumes.VolumeData`: ``images``, ``masks``).
        rows: positions in ``data.index`` of the volumes to draw from.
        patch: ``(D, H, W)`` patch size.
        samples: patches per volume (the epoch holds ``len(rows) * samples``).
        foreground: probability that a patch is centred on a foreground voxel.
        flip: mirror each patch along each axis with probability 1/2 (nnU-Net's mirroring).
    """

    def __init__(
        self,
        data: Any,
        rows: np.ndarray | list[int],
        patch: tuple[int, int, int],
        samples: int = 4,
        foreground: float = 1 / 3,
        flip: bool = False,
    ) -> None:
        self.data = data
        self.rows = np.asarray(rows, dtype=np.int64)
        self.patch = tuple(int(n) for n in patch)
        self.samples = samples
        self.foreground = foreground
        self.flip = flip
        self._voxels: dict[int, list[np.ndarray]] = {}

    def __len__(self) -> int:
        return len(self.rows) * self.samples

    def class_voxels(self, row: int) -> list[np.ndarray]:
        """Per class, at most :data:`CLASS_VOXELS` voxel coordinates ``(n, 3)`` of volume
        ``row`` (a seeded draw; empty for a class absent from it)."""
        if row not in self._voxels:
            rng = np.random.default_rng(row)
            found = []
            for mask in self.data.masks[row]:
                where = np.argwhere(mask)
                if len(where) > CLASS_VOXELS:
                    where = where[np.sort(rng.choice(len(where), CLASS_VOXELS, replace=False))]
                found.append(where)
            self._voxels[row] = found
        return self._voxels[row]

    def start(self, row: int) -> tuple[int, ...]:
        """A patch's corner in volume ``row``: on foreground with probability ``foreground``."""
        shape = self.data.images[row].shape
        bounds = [(min(0, n - p), max(0, n - p)) for n, p in zip(shape, self.patch, strict=True)]
        if self.foreground > 0 and torch.rand(()).item() < self.foreground:
            present = [v for v in self.class_voxels(row) if len(v)]
            if present:
                voxels = present[_randint(0, len(present) - 1)]
                centre = voxels[_randint(0, len(voxels) - 1)]
                return tuple(
                    int(np.clip(c - p // 2, lo, hi))
                    for c, p, (lo, hi) in zip(centre, self.patch, bounds, strict=True)
                )
        return tuple(_randint(lo, hi) for lo, hi in bounds)

    def __getitem__(self, i: int) -> dict[str, Any]:
        row = int(self.rows[i // self.samples])
        start = self.start(row)
        image = crop(self.data.images[row], start, self.patch)[None]  # (1, D, H, W)
        mask = crop(self.data.masks[row], start, self.patch).astype(np.float32)  # (K, D, H, W)
        if self.flip:
            axes = [a for a in (1, 2, 3) if torch.rand(()).item() < 0.5]
            if axes:
                image, mask = np.flip(image, axes), np.flip(mask, axes)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)),
            "mask": torch.from_numpy(np.ascontiguousarray(mask)),
            "row": row,
        }


class VolumeDataset(Dataset):
    """Whole volumes of ``rows`` (batch size 1: volumes differ in size)."""

    def __init__(self, data: Any, rows: np.ndarray | list[int]) -> None:
        self.data = data
        self.rows = np.asarray(rows, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        row = int(self.rows[i])
        image, mask = self.data.volume(row)
        return {"image": image, "mask": mask, "row": row}
