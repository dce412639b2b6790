"""The orthonormal DCT-II of blocks of a slice or a volume, differentiable (JPEG's transform).

VAFA (:mod:`advseg.attacks.vafa`) quantises the 3D-DCT coefficients of 8^3 blocks of a volume,
and VAFT (:mod:`advseg.defences.vaft`) compares the DCT of clean and adversarial logits. For such
short axes the transform is one small matrix product per axis: ``dct(x) = M x`` with ``M`` the
orthonormal DCT-II matrix ``M[k, n] = sqrt((1 if k == 0 else 2) / N) * cos(pi (2n + 1) k / 2N)``
(``scipy.fft.dct(..., norm="ortho")``, tested against :func:`scipy.fft.dctn`), and the inverse is
its transpose. Being matrix products, both are exact to rounding and differentiable.

Blocks: :func:`to_blocks` cuts the spatial axes of ``(B, C, *S)`` into ``block``-sized cubes
(after replicate padding to a multiple of ``block``), :func:`from_blocks` puts them back and crops
the padding, so ``from_blocks(to_blocks(x, b), x.shape) == x`` exactly.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def dct_matrix(n: int, *, dtype: torch.dtype = torch.float32, device=None) -> Tensor:
    """The ``(n, n)`` orthonormal DCT-II matrix (rows: frequencies, columns: samples)."""
    k = torch.arange(n, dtype=torch.float64).unsqueeze(1)
    i = torch.arange(n, dtype=torch.float64).unsqueeze(0)
    m = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    m[0] /= math.sqrt(2.0)
    return m.to(dtype=dtype, device=device)


def dctn(x: Tensor, dims: int) -> Tensor:
    """The orthonormal DCT-II over the last ``dims`` axes of ``x`` (any sizes)."""
    return _transform(x, dims, inverse=False)


def idctn(x: Tensor, dims: int) -> Tensor:
    """The inverse of :func:`dctn` (the orthonormal DCT-III) over the last ``dims`` axes."""
    return _transform(x, dims, inverse=True)


def _transform(x: Tensor, dims: int, *, inverse: bool) -> Tensor:
    for axis in range(x.dim() - dims, x.dim()):
        m = dct_matrix(x.shape[axis], dtype=x.dtype, device=x.device)
        moved = x.movedim(axis, -1)
        x = (moved @ m if inverse else moved @ m.T).movedim(-1, axis)
    return x


def to_blocks(x: Tensor, block: int) -> Tensor:
    """Cut ``x (B, C, *S)`` (2 or 3 spatial axes) into blocks ``(B, C, *N, *[block] * d)``.

    Each spatial axis is padded (replicating its edge) up to a multiple of ``block``; ``N`` is the
    number of blocks along each axis.
    """
    spatial = x.shape[2:]
    d = len(spatial)
    pad = [(-s) % block for s in spatial]
    if any(pad):
        flat = [p for extra in reversed(pad) for p in (0, extra)]  # F.pad: last axis first
        x = F.pad(x, flat, mode="replicate")
    counts = [s // block for s in x.shape[2:]]
    split = x.reshape(*x.shape[:2], *[v for n in counts for v in (n, block)])
    order = [0, 1, *range(2, 2 + 2 * d, 2), *range(3, 3 + 2 * d, 2)]
    return split.permute(order)


def from_blocks(blocks: Tensor, shape: torch.Size | tuple[int, ...]) -> Tensor:
    """Put blocks ``(B, C, *N, *[block] * d)`` back into ``(B, C, *S)`` of ``shape`` (cropped)."""
    d = len(shape) - 2
    counts, block = blocks.shape[2 : 2 + d], blocks.shape[-1]
    order = [0, 1, *[v for i in range(d) for v in (2 + i, 2 + d + i)]]
    x = blocks.permute(order).reshape(*blocks.shape[:2], *[n * block for n in counts])
    return x[(slice(None), slice(None), *[slice(0, s) for s in shape[2:]])]
