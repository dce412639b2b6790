"""Universal perturbations: one noise pattern, fitted on training slices, added to every slice.

On volumes (``window=``) the pattern is one window's size, ``(C, *window)``, and it is laid out
on every tile of the volume (:func:`lay_out`: the non-overlapping tiles of the tile protocol,
MONAI's windows at overlap 0, the last along an axis moved back to end at the volume's edge and
written last), so volumes of any shape take the same perturbation. Under L-inf that keeps the
budget exactly; an L2 budget would grow with the volume's tile count, so it is refused.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from advseg.atomic import atomic_path, write_bytes_atomic
from advseg.attacks.base import ATTACKS, Attack, frozen
from advseg.attacks.bim import check_alpha, check_steps
from advseg.errors import UserError
from advseg.inference import window_slices


@ATTACKS.register("universal")
class Universal(Attack):
    """A universal (input-agnostic) perturbation, fitted by stochastic projected gradient ascent.

    Paper: Metzen, Kumar, Brox & Fischer, "Universal Adversarial Perturbations Against Semantic
    Image Segmentation", ICCV 2017, https://arxiv.org/abs/1704.05712. Their iteration is
    ``xi <- Clip_eps(xi - alpha * sign(grad_D(xi)))`` with ``grad_D`` the gradient of the
    (targeted) loss summed over a mini-batch of training images, starting from ``xi = 0``. Here
    it is untargeted by default (ascend the loss against the true masks; ``targeted=True``
    descends toward given target masks), batches drawn in a seeded order, and the ``l2`` norm is
    offered beside ``linf`` (normalised steps, projection onto the ball).

    Distance measure: L-inf (default) or L2; the same ``delta`` ``(C, H, W)`` for every slice.
    With ``window`` (volumes), ``delta`` is ``(C, *window)``, laid out on every tile of each
    volume (:func:`lay_out`); L-inf only.

    Args:
        model, loss, eps, norm, valid_range, targeted, activation, seed, loss_kwargs: see
            :class:`~advseg.attacks.base.Attack`.
        steps: mini-batch updates (default 50).
        alpha: step size; by default ``eps / 10``.
        fit_batch_size: training slices per update (default 8).
        fit_slices: use at most this many training slices (the first ones given).
        window: volumes: the perturbation's spatial size (the sliding window), laid out over
            inputs of any size; each update then sums the gradient of ``fit_batch_size``
            volumes, each through its own forward (volumes differ in shape).

    Shape:
        - fit: a Dataset of ``{"image": (C, H, W), "mask": (K, H, W)}`` items;
        - x: ``(B, C, H, W)``; output ``x + delta`` clipped to the valid range, ``(B, C, H, W)``.

    Example:
        >>> attack = Universal(model, loss="bce", eps=0.03, steps=50)
        >>> attack.fit(train_set)           # attack.perturbation: (C, H, W)
        >>> x_adv = attack(images, masks)   # the same delta added to every image
    """

    name = "universal"

    def __init__(self, model: nn.Module, loss="bce", eps: float = 0.009, *, steps: int = 50,
                 alpha: float | None = None, fit_batch_size: int = 8,
                 fit_slices: int | None = None, window: Sequence[int] | None = None,
                 **kwargs) -> None:  # fmt: skip
        super().__init__(model, loss, eps, **kwargs)
        if window is not None and (not window or any(int(w) < 1 for w in window)):
            raise UserError(f"{self.name}: window must be sizes >= 1, got {window!r}")
        if window is not None and self.norm != "linf":
            raise UserError(f"{self.name}: a window-sized perturbation takes linf only (laid "
                            "out over a volume, its l2 norm grows with the tiles)")  # fmt: skip
        self.window = None if window is None else tuple(int(w) for w in window)
        self.steps = check_steps(steps, self.name)
        self.alpha = check_alpha(alpha, self.eps / 10, self.name)
        if isinstance(fit_batch_size, bool) or not isinstance(fit_batch_size, int):
            raise UserError(f"{self.name}: fit_batch_size must be an integer >= 1")
        if fit_batch_size < 1:
            raise UserError(f"{self.name}: fit_batch_size must be >= 1, got {fit_batch_size}")
        if fit_slices is not None and (not isinstance(fit_slices, int) or fit_slices < 1):
            raise UserError(f"{self.name}: fit_slices must be an integer >= 1, got {fit_slices!r}")
        self.fit_batch_size = fit_batch_size
        self.fit_slices = fit_slices
        self.perturbation: Tensor | None = None

    def fit(self, dataset: Dataset) -> Tensor:
        """Fit the perturbation on ``dataset`` (training slices); returns it, ``(C, H, W)``.

        Every update draws the next mini-batch of a seeded shuffle (reshuffled after each pass),
        takes the gradient of the summed objective with respect to ``delta`` and steps.
        """
        if self.fit_slices is not None:
            dataset = Subset(dataset, range(min(self.fit_slices, len(dataset))))
        if len(dataset) == 0:
            raise UserError(f"{self.name}: no training slices to fit the perturbation on")
        device = next(self.model.parameters()).device
        generator = torch.Generator().manual_seed(self.seed)
        if self.window is None:
            loader = DataLoader(
                dataset, batch_size=self.fit_batch_size, shuffle=True, generator=generator
            )
            batches = (
                [(b["image"].to(device), b["mask"].to(device).float())] for b in _cycle(loader)
            )
        else:  # volumes of different shapes: one forward each, fit_batch_size per update
            loader = DataLoader(dataset, batch_size=1, shuffle=True, generator=generator)
            volumes = (
                (b["image"].to(device), b["mask"].to(device).float()) for b in _cycle(loader)
            )
            batches = ([next(volumes) for _ in range(self.fit_batch_size)] for _ in _cycle([0]))
        self.perturbation = self._fit(batches)
        return self.perturbation

    def _fit(self, batches: Iterator[list[tuple[Tensor, Tensor]]]) -> Tensor:
        """``steps`` updates from ``delta = 0`` on the batches given (each a list of ``(x, y)``
        whose gradients add up), ``(C, H, W)`` (``(C, *window)`` with a window)."""
        delta: Tensor | None = None
        with frozen(self.model), torch.enable_grad():
            for _, batch in zip(range(self.steps), batches, strict=False):
                if delta is None:  # xi_0 = 0
                    x = batch[0][0]
                    shape = x.shape[1:] if self.window is None else (x.shape[1], *self.window)
                    delta = torch.zeros(shape, dtype=x.dtype, device=x.device)
                delta = self._update(delta, batch)
        assert delta is not None
        return delta.detach()

    def _update(self, delta: Tensor, batch: list[tuple[Tensor, Tensor]]) -> Tensor:
        """One step on the mini-batch gradient (summed over the batch), projected to the
        budget."""
        delta = delta.detach().requires_grad_(True)
        grad: Tensor | None = None
        for x, y in batch:
            x_adv = self.clip(x + self.laid_out(delta, x.shape[2:]))  # delta over the batch
            values = self.objective(self.logits(x_adv), y)  # (B,)
            (part,) = torch.autograd.grad(values.sum(), delta)  # (C, H, W): summed over B
            grad = part if grad is None else grad + part
        assert grad is not None
        stepped = self.step(delta.detach()[None], grad[None], self.alpha)[0]
        return self._project(stepped)

    def laid_out(self, delta: Tensor, shape: Sequence[int]) -> Tensor:
        """``delta`` as added to an input of spatial ``shape``: itself, or with a window laid
        out on the input's tiles (:func:`lay_out`)."""
        return delta if self.window is None else lay_out(delta, shape)

    def _project(self, delta: Tensor) -> Tensor:
        if self.norm == "linf":
            return delta.clamp(-self.eps, self.eps)
        norm = delta.norm(p=2)
        return delta * min(1.0, self.eps / (float(norm) + 1e-12))

    def perturb(self, x: Tensor, y: Tensor, generator: torch.Generator) -> Tensor:
        """``x + delta``; without a fitted ``delta``, one is fitted on this batch itself (a
        perturbation universal over these images) and not kept."""
        delta = self.perturbation
        if delta is None:
            chunks = [[(x[i : i + self.fit_batch_size], y[i : i + self.fit_batch_size])]
                      for i in range(0, len(x), self.fit_batch_size)]  # fmt: skip
            delta = self._fit(_cycle(chunks))
        return self.clip(x + self.laid_out(delta.to(x.device), x.shape[2:]))

    def random_sign(self, seed: int = 0) -> Tensor:
        """The baseline: a random-sign perturbation with the fitted one's norm, ``(C, H, W)``.

        Under ``linf`` every pixel is ``+-||delta||_inf`` (the same L-inf norm); under ``l2`` the
        random signs are scaled to ``||delta||_2``. The damage it does is what noise of that
        size does, so the gap to the fitted perturbation is its universal structure.
        """
        if self.perturbation is None:
            raise UserError(f"{self.name}: fit the perturbation first (attack.fit)")
        generator = torch.Generator().manual_seed(seed)
        delta = self.perturbation.cpu()
        signs = torch.randint(0, 2, delta.shape, generator=generator).float() * 2 - 1
        if self.norm == "linf":
            return signs * delta.abs().max()
        return signs * delta.norm(p=2) / signs.norm(p=2)


def lay_out(delta: Tensor, shape: Sequence[int]) -> Tensor:
    """A window-sized perturbation ``(C, *window)`` laid out over a volume, ``(C, *shape)``.

    ``delta`` is written on every tile of the volume: the tiles of the tile protocol
    (:func:`advseg.inference.window_slices` at overlap 0; the last along an axis moved back to
    end at the edge, written last, so it overwrites its neighbour's overlap); along an axis
    shorter than the window, the window's first voxels. Differentiable in ``delta``; every voxel
    holds a voxel of ``delta``, so the L-inf norm is at most ``delta``'s.
    """
    window = tuple(delta.shape[1:])
    out = delta.new_zeros((delta.shape[0], *shape))
    for tile in window_slices(shape, window, 0.0):
        sizes = [min(t.stop, s) - t.start for t, s in zip(tile, shape, strict=True)]
        out[(slice(None), *tile)] = delta[(slice(None), *(slice(0, n) for n in sizes))]
    return out


class WindowTiles(Dataset):
    """The non-overlapping tiles of volumes, each a window-sized item: what a universal
    perturbation is fitted on by the tile protocol (the bare network on one tile at a time).

    Tiles are :func:`lay_out`'s (so a fitted ``delta`` lands on the tiles it was fitted on);
    a volume shorter than the window along an axis is zero-padded at its end.

    Args:
        volumes: a Dataset of ``{"image": (C, *S), "mask": (K, *S)}`` volumes.
        window: the tile size.
    """

    def __init__(self, volumes: Dataset, window: Sequence[int]) -> None:
        self.volumes, self.window = volumes, tuple(int(w) for w in window)
        self.items: list[tuple[int, tuple[slice, ...]]] = []
        for i in range(len(volumes)):  # type: ignore[arg-type]
            shape = volumes[i]["image"].shape[1:]
            self.items += [(i, tile) for tile in window_slices(shape, self.window, 0.0)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        volume, tile = self.items[index]
        item = self.volumes[volume]
        return {key: _padded(item[key][(slice(None), *tile)], self.window)
                for key in ("image", "mask")}  # fmt: skip


def _padded(x: Tensor, window: tuple[int, ...]) -> Tensor:
    """``x`` ``(C, *s)`` zero-padded at the end of each axis to ``(C, *window)``."""
    pad = [p for size, w in zip(reversed(x.shape[1:]), reversed(window), strict=True)
           for p in (0, w - size)]  # fmt: skip
    return F.pad(x, pad) if any(pad) else x


def _cycle(items: Iterable) -> Iterator:
    """The items of ``items`` over and over (a DataLoader reshuffles on each pass)."""
    while True:
        yield from items


def save_perturbation(delta: Tensor, stem: str | Path) -> tuple[Path, Path]:
    """Save ``delta`` ``(C, H, W)`` as ``<stem>.npy`` (float32) and ``<stem>.png`` (its first
    channel, mid-grey = 0, the budget's extremes black and white; a window ``(C, D, H, W)``:
    its middle axial slice); returns both paths."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    stem = Path(stem)
    array = delta.detach().float().cpu().numpy()  # volumes: the png shows the middle slice
    picture = array[0] if array.ndim == 3 else array[0, array.shape[1] // 2]
    npy = stem.with_name(stem.name + ".npy")
    with atomic_path(npy) as tmp, open(tmp, "wb") as handle:
        np.save(handle, array)
    png = stem.with_name(stem.name + ".png")
    limit = float(np.abs(array).max()) or 1.0
    buffer = io.BytesIO()
    plt.imsave(buffer, picture, cmap="gray", vmin=-limit, vmax=limit, format="png")
    write_bytes_atomic(png, buffer.getvalue())
    return npy, png
