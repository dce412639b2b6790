"""Sliding-window inference: logits of a whole image from a model that sees one window at a time.

The windows, their overlap and the Gaussian blending are MONAI's
(``monai.inferers.sliding_window_inference(mode="gaussian")``; the equality is tested), with
nnU-Net's test-time mirroring as an option (each window predicted on every combination of flips
over ``mirror_axes``, flipped back, averaged). The inferer is an ``nn.Module``, so an attack calls
it as "the model": a differentiable function from the image to logits on the image's grid.

Memory does not grow with the image. With gradients on, MONAI keeps every window's graph
(Project-MONAI/MONAI#1420); here :class:`_Recomputed` computes the blended logits window by window
without a graph, and its backward recomputes each window with a graph and back-propagates that
window's share of the incoming gradient. Writing the blend as ``L = sum_w g * P_w(x_w) / C`` (``g``
the window's Gaussian, ``C`` the sum of the Gaussians over the windows covering each voxel), the
input gradient is ``sum_w J_w^T (g * dL / C)``: exact, one window's graph alive at a time. It needs
the model to be deterministic (eval mode, as attacks run it) and gives no parameter gradients, so
training through the inferer (parameters requiring grad) keeps the full graph instead.

The recomputation costs one more forward per window. ``keep_graphs=k`` buys part of it back with a
bounded graph cache: the last ``k`` windows of the forward are computed with their graph, which
the backward uses directly (then frees) before recomputing the others. Memory is bounded by ``k``
window graphs whatever the image's size (and by ``graph_memory`` bytes); the gradient is the same
(the same forward, in the same order; tested in float64 for ``k`` = 0, some and all windows).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Blend = Literal["gaussian", "constant"]
Memory = Literal["auto", "recompute", "graph"]

MIN_WEIGHT = 1e-3  # MONAI's floor of the importance map (compute_importance_map)
# Window graphs a recomputing forward keeps by default: on benchmarks/bench_volume_attack.py's 8
# windows (unet3d-tiny, 32^3, CPU) the one value with the step <= 1.25x its windows' forward +
# backward and its peak memory <= 1.5x that on one window. Lower it for big windows on a GPU.
KEEP_GRAPHS = 4
GRAPH_MEMORY = 2**30  # and no more than 1 GiB of kept activations (big windows on a GPU)


def window_starts(size: int, roi: int, overlap: float) -> list[int]:
    """Start indices of the windows along one axis (MONAI's ``dense_patch_slices`` rule).

    Windows step by ``int(roi * (1 - overlap))`` (at least 1; one window where ``roi == size``)
    until one reaches the end; a window that would run past the end is moved back to end there.
    """
    if roi >= size:
        return [0]
    step = max(int(roi * (1 - overlap)), 1)
    count = next(d for d in range(math.ceil(size / step)) if d * step + roi >= size) + 1
    return [min(d * step, size - roi) for d in range(count)]


def window_slices(
    shape: Sequence[int], roi: Sequence[int], overlap: float
) -> list[tuple[slice, ...]]:
    """Every window of ``roi`` over a spatial ``shape``, as slices, the last axis fastest."""
    starts = [window_starts(s, r, overlap) for s, r in zip(shape, roi, strict=True)]
    return [
        tuple(slice(a, a + r) for a, r in zip(corner, roi, strict=True))
        for corner in itertools.product(*starts)
    ]


def gaussian_weights(
    roi: Sequence[int],
    sigma_scale: float = 0.125,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> Tensor:
    """The blending weight of one window, shape ``roi``: a separable Gaussian of sigma
    ``sigma_scale * roi`` per axis, 1 at the centre, floored at its minimum or 1e-3
    (MONAI's ``compute_importance_map(mode="gaussian")``; nnU-Net uses sigma 1/8 too)."""
    weights = torch.ones((), dtype=torch.float32, device=device)
    for size in roi:
        axis = torch.arange(size, dtype=torch.float32, device=device) - (size - 1) / 2.0
        profile = torch.exp(axis**2 / (-2 * (size * sigma_scale) ** 2))
        weights = weights.unsqueeze(-1) * profile
    floor = max(weights.min().item(), MIN_WEIGHT)
    return weights.clamp(min=floor).to(dtype)


class SlidingWindow(nn.Module):
    """Logits of a whole image by overlapping windows, blended; differentiable, memory-bounded.

    Args:
        model: maps windows ``(N, C, *roi)`` to logits ``(N, K, *roi)``.
        roi_size: the window's spatial size, e.g. ``(96, 96, 96)``; its length is the number of
            spatial axes (3 for volumes ``(B, C, D, H, W)``, 2 for slices).
        overlap: the share of a window its neighbour overlaps, in ``[0, 1)`` (nnU-Net: 0.5).
        blend: ``gaussian`` (centre weighted, as MONAI's ``mode="gaussian"`` and nnU-Net) or
            ``constant`` (a plain mean).
        sigma_scale: the Gaussian's sigma as a share of the window.
        mirror_axes: spatial axes (0-based: 0 is D of a volume) whose flips are averaged in each
            window, every combination of them (nnU-Net's test-time mirroring; 2^n forwards).
        batch_size: windows per model call.
        memory: ``recompute`` (the backward recomputes the windows whose graph was not kept),
            ``graph`` (ordinary autograd through every window, MONAI's behaviour), or ``auto``:
            ``recompute`` unless some model parameter requires grad (training), then ``graph``.
        keep_graphs: with ``recompute``, how many windows (the last ones, in whole batches) the
            forward computes with their graph so the backward needs not recompute them: memory
            grows by that many window graphs (not with the image), time falls by one forward
            each. The gradient is the same for any value.
        graph_memory: the most bytes the kept graphs may hold (the unique storages autograd
            saved, parameters aside); a window whose graph would pass it is not kept (nor any
            after it), so memory is bounded by both. ``None``: no limit in bytes.

    Example:
        >>> inferer = SlidingWindow(model, (32, 32, 32), overlap=0.5, mirror_axes=(0, 1, 2))
        >>> logits = inferer(volume)  # (B, C, D, H, W) -> (B, K, D, H, W)
        >>> x_adv = create_attack("pgd", inferer, loss="dicece", eps=4 / 255)(volume, masks)
    """

    def __init__(
        self,
        model: nn.Module,
        roi_size: Sequence[int],
        *,
        overlap: float = 0.5,
        blend: Blend = "gaussian",
        sigma_scale: float = 0.125,
        mirror_axes: Sequence[int] = (),
        batch_size: int = 1,
        memory: Memory = "auto",
        keep_graphs: int = KEEP_GRAPHS,
        graph_memory: float | None = GRAPH_MEMORY,
    ) -> None:
        super().__init__()
        roi = tuple(int(r) for r in roi_size)
        if not roi or min(roi) < 1:
            raise ValueError(f"roi_size must be positive sizes, got {tuple(roi_size)}")
        if not 0 <= overlap < 1:
            raise ValueError(f"overlap must be in [0, 1), got {overlap}")
        if blend not in ("gaussian", "constant"):
            raise ValueError(f"blend must be gaussian or constant, got {blend!r}")
        axes = tuple(sorted({int(a) for a in mirror_axes}))
        if any(not 0 <= a < len(roi) for a in axes):
            raise ValueError(f"mirror_axes {tuple(mirror_axes)} must be in 0..{len(roi) - 1}")
        if memory not in ("auto", "recompute", "graph"):
            raise ValueError(f"memory must be auto, recompute or graph, got {memory!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if keep_graphs < 0:
            raise ValueError(f"keep_graphs must be >= 0, got {keep_graphs}")
        if graph_memory is not None and graph_memory < 0:
            raise ValueError(f"graph_memory must be >= 0 bytes or None, got {graph_memory}")
        self.model = model
        self.roi_size = roi
        self.overlap = float(overlap)
        self.blend = blend
        self.sigma_scale = float(sigma_scale)
        self.mirror_axes = axes
        self.batch_size = int(batch_size)
        self.memory: Memory = memory
        self.keep_graphs = int(keep_graphs)
        self.graph_memory = graph_memory
        self._cache: dict[tuple, Tensor] = {}  # constant across calls: weights, normaliser

    @property
    def spatial_dims(self) -> int:
        return len(self.roi_size)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(B, K, *S)`` of images ``(B, C, *S)``, any ``S`` (padded if below a window)."""
        if x.dim() != 2 + self.spatial_dims:
            raise ValueError(
                f"SlidingWindow with a {self.spatial_dims}D window expects "
                f"(B, C, {self.spatial_dims} spatial axes), got {tuple(x.shape)}"
            )
        pad = self._padding(x.shape[2:])
        padded = F.pad(x, pad) if any(pad) else x
        logits = _Recomputed.apply(padded, self) if self._recomputes(x) else self.blended(padded)
        if any(pad):  # crop back to the image (F.pad's order: last axis first)
            crop = [slice(pad[2 * i], pad[2 * i] + s) for i, s in enumerate(reversed(x.shape[2:]))]
            logits = logits[(slice(None), slice(None), *reversed(crop))]
        return logits

    def windows(self, shape: Sequence[int]) -> list[tuple[slice, ...]]:
        """The windows over a spatial ``shape`` at least ``roi_size`` large."""
        return window_slices(shape, self.roi_size, self.overlap)

    def weights(self, dtype: torch.dtype, device: torch.device) -> Tensor:
        """One window's blending weights, shape ``roi_size`` (built once per dtype and device;
        not to be written to)."""
        key = ("weights", dtype, device)
        if key not in self._cache:
            if self.blend == "constant":
                self._cache[key] = torch.ones(self.roi_size, dtype=dtype, device=device)
            else:
                self._cache[key] = gaussian_weights(
                    self.roi_size, self.sigma_scale, dtype=dtype, device=device
                )
        return self._cache[key]

    def predict(self, windows: Tensor) -> Tensor:
        """The model's logits of a batch of windows, averaged over the mirrorings."""
        logits = _tensor(self.model(windows))
        flips = [
            tuple(a + 2 for a in combo)
            for n in range(1, len(self.mirror_axes) + 1)
            for combo in itertools.combinations(self.mirror_axes, n)
        ]
        for dims in flips:
            logits = logits + _tensor(self.model(windows.flip(dims))).flip(dims)
        return logits / (len(flips) + 1) if flips else logits

    def blended(self, x: Tensor) -> Tensor:
        """The blended logits of ``x`` (at least one window in every axis), with or without a
        graph as autograd's state says: ``sum_w g * P_w / sum_w g``."""
        return self._blend(x, keep=0)[0]

    def _blend(self, x: Tensor, keep: int) -> tuple[Tensor, list[tuple[int, Tensor, Tensor]]]:
        """:meth:`blended`, the last batches of at most ``keep`` windows in all (and at most
        ``graph_memory`` bytes) computed with a graph (grad enabled, their inputs detached
        leaves): those ``(batch index, inputs, logits)`` are returned beside the blend, which
        holds their logits detached."""
        windows = self.windows(x.shape[2:])
        batches = self._batches(x.shape[0], windows)
        kept_from = len(batches)
        while kept_from and keep >= sum(len(b) for b in batches[kept_from - 1 :]):
            kept_from -= 1
        out: Tensor | None = None
        weights = count = None
        kept: list[tuple[int, Tensor, Tensor]] = []
        budget = math.inf if self.graph_memory is None else self.graph_memory
        for i, batch in enumerate(batches):
            inputs = torch.cat([x[(b, slice(None), *s)][None] for b, s in batch])
            if i >= kept_from:
                with torch.enable_grad():
                    inputs = inputs.detach().requires_grad_(True)
                    logits = self.predict(inputs)
                budget -= saved_bytes(logits, self.model)
                if budget >= 0:
                    kept.append((i, inputs, logits))
                else:  # over the budget: this graph is dropped, no later one is built
                    kept_from = len(batches)
                logits = logits.detach()
            else:
                logits = self.predict(inputs)
            if out is None:
                weights = self.weights(logits.dtype, logits.device)
                count = self._count(windows, x.shape[2:], weights)
                out = logits.new_zeros((x.shape[0], logits.shape[1], *x.shape[2:]))
            for (b, s), window in zip(batch, logits * weights, strict=True):
                out[(b, slice(None), *s)] += window  # in place: autograd records CopySlices
        return out / count, kept

    def _batches(self, images: int, windows: list) -> list[list[tuple[int, tuple[slice, ...]]]]:
        """(image, window) pairs in MONAI's order (image by image), ``batch_size`` at a time."""
        pairs = [(b, s) for b in range(images) for s in windows]
        return [pairs[i : i + self.batch_size] for i in range(0, len(pairs), self.batch_size)]

    def _count(self, windows: list, shape: Sequence[int], weights: Tensor) -> Tensor:
        """The sum of the windows' weights at each voxel, shape ``(1, 1, *shape)`` (built once
        per shape, dtype and device; not to be written to)."""
        key = ("count", tuple(shape), weights.dtype, weights.device)
        if key not in self._cache:
            count = weights.new_zeros((1, 1, *shape))
            for s in windows:
                count[(0, 0, *s)] += weights
            self._cache = {k: v for k, v in self._cache.items() if k[0] != "count"}  # one shape
            self._cache[key] = count
        return self._cache[key]

    def _padding(self, shape: Sequence[int]) -> list[int]:
        """F.pad's list (last axis first) growing each axis smaller than the window to it,
        split as MONAI splits it (the smaller half first)."""
        pad: list[int] = []
        for size, roi in zip(reversed(shape), reversed(self.roi_size), strict=True):
            diff = max(roi - size, 0)
            pad += [diff // 2, diff - diff // 2]
        return pad

    def _recomputes(self, x: Tensor) -> bool:
        if not (torch.is_grad_enabled() and x.requires_grad) or self.memory == "graph":
            return False
        training = any(p.requires_grad for p in self.model.parameters())
        if training and self.memory == "recompute":
            raise ValueError("memory='recompute' gives no parameter gradients; freeze the model "
                             "(attacks do) or use memory='graph'")  # fmt: skip
        return not training

    def extra_repr(self) -> str:
        mirror = f", mirror_axes={self.mirror_axes}" if self.mirror_axes else ""
        return (f"roi_size={self.roi_size}, overlap={self.overlap:g}, blend={self.blend!r}"
                f"{mirror}, batch_size={self.batch_size}, memory={self.memory!r}, "
                f"keep_graphs={self.keep_graphs}, graph_memory={self.graph_memory}")  # fmt: skip


def saved_bytes(out: Tensor, model: nn.Module) -> int:
    """Bytes the graph behind ``out`` holds for its backward: the unique storages of the tensors
    its nodes saved (``grad_fn._saved_*``), the model's parameters and buffers aside."""
    constants = itertools.chain(model.parameters(), model.buffers())
    skip = {t.untyped_storage().data_ptr() for t in constants}
    storages: dict[int, int] = {}
    seen: set = set()
    nodes = [out.grad_fn]
    while nodes:
        node = nodes.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for name in dir(node):
            if not name.startswith("_saved_"):
                continue
            value = getattr(node, name)
            for t in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(t, Tensor) and t.untyped_storage().data_ptr() not in skip:
                    storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        nodes.extend(n for n, _ in node.next_functions)
    return sum(storages.values())


def _tensor(out: Tensor | Sequence[Tensor] | dict) -> Tensor:
    """A model's logits: the tensor, the first of a tuple, or ``out`` of a dict."""
    if isinstance(out, dict):
        return out["out"] if "out" in out else next(iter(out.values()))
    if isinstance(out, (tuple, list)):
        return out[0]
    return out


class _Recomputed(torch.autograd.Function):
    """The blend with no graph in the forward (but the last ``keep_graphs`` windows'); the
    backward back-propagates the kept windows, then recomputes the others window by window."""

    @staticmethod
    def forward(ctx, x: Tensor, inferer: SlidingWindow) -> Tensor:
        ctx.inferer = inferer
        ctx.save_for_backward(x)
        with torch.no_grad():
            out, ctx.kept = inferer._blend(x, keep=inferer.keep_graphs)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        (x,) = ctx.saved_tensors
        inferer: SlidingWindow = ctx.inferer
        kept, ctx.kept = ctx.kept, []  # used once: a second backward recomputes everything
        windows = inferer.windows(x.shape[2:])
        weights = inferer.weights(grad.dtype, grad.device)
        count = inferer._count(windows, x.shape[2:], weights)[0, 0]  # C: (*S)
        batches = inferer._batches(x.shape[0], windows)
        grad_x = torch.zeros_like(x)

        def window_grad(batch: list, inputs: Tensor, logits: Tensor) -> Tensor:
            shares = torch.stack(  # the window's share of dL: g / C
                [grad[(b, slice(None), *s)] * (weights / count[s]) for b, s in batch]
            )
            return torch.autograd.grad(logits, inputs, shares.to(logits.dtype))[0]

        # The kept graphs first, each freed once used; their input gradients (one window each)
        # wait so that grad_x sums the windows in the same order whatever keep_graphs is.
        done = {}
        while kept:
            i, inputs, logits = kept.pop()
            done[i] = window_grad(batches[i], inputs, logits)
            del inputs, logits
        for i, batch in enumerate(batches):
            if i in done:
                grads = done.pop(i)
            else:
                with torch.enable_grad():
                    inputs = torch.cat([x[(b, slice(None), *s)][None] for b, s in batch])
                    inputs = inputs.detach().requires_grad_(True)
                    grads = window_grad(batch, inputs, inferer.predict(inputs))
            for (b, s), g in zip(batch, grads, strict=True):
                grad_x[(b, slice(None), *s)] += g
        return grad_x, None
