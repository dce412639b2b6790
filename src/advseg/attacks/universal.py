"""Universal perturbations: one noise pattern, fitted on training slices, added to every slice."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from advseg.atomic import atomic_path, write_bytes_atomic
from advseg.attacks.base import ATTACKS, Attack, frozen
from advseg.attacks.bim import check_alpha, check_steps
from advseg.errors import UserError


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

    Args:
        model, loss, eps, norm, valid_range, targeted, activation, seed, loss_kwargs: see
            :class:`~advseg.attacks.base.Attack`.
        steps: mini-batch updates (default 50).
        alpha: step size; by default ``eps / 10``.
        fit_batch_size: training slices per update (default 8).
        fit_slices: use at most this many training slices (the first ones given).

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
                 fit_slices: int | None = None, **kwargs) -> None:  # fmt: skip
        super().__init__(model, loss, eps, **kwargs)
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
        loader = DataLoader(
            dataset, batch_size=self.fit_batch_size, shuffle=True, generator=generator
        )
        batches = ((b["image"].to(device), b["mask"].to(device).float()) for b in _cycle(loader))
        self.perturbation = self._fit(batches)
        return self.perturbation

    def _fit(self, batches: Iterator[tuple[Tensor, Tensor]]) -> Tensor:
        """``steps`` updates from ``delta = 0`` on the batches given, ``(C, H, W)``."""
        delta: Tensor | None = None
        with frozen(self.model), torch.enable_grad():
            for _, (x, y) in zip(range(self.steps), batches, strict=False):
                if delta is None:
                    delta = torch.zeros_like(x[0])  # (C, H, W): xi_0 = 0
                delta = self._update(delta, x, y)
        assert delta is not None
        return delta.detach()

    def _update(self, delta: Tensor, x: Tensor, y: Tensor) -> Tensor:
        """One step on the mini-batch gradient, projected to the budget."""
        delta = delta.detach().requires_grad_(True)
        x_adv = self.clip(x + delta)  # (B, C, H, W), delta broadcast over the batch
        values = self.objective(self.logits(x_adv), y)  # (B,)
        (grad,) = torch.autograd.grad(values.sum(), delta)  # (C, H, W): summed over the batch
        stepped = self.step(delta.detach()[None], grad[None], self.alpha)[0]
        return self._project(stepped)

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
            chunks = [(x[i : i + self.fit_batch_size], y[i : i + self.fit_batch_size])
                      for i in range(0, len(x), self.fit_batch_size)]  # fmt: skip
            delta = self._fit(_cycle(chunks))
        return self.clip(x + delta.to(x.device))

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


def _cycle(items: Iterable) -> Iterator:
    """The items of ``items`` over and over (a DataLoader reshuffles on each pass)."""
    while True:
        yield from items


def save_perturbation(delta: Tensor, stem: str | Path) -> tuple[Path, Path]:
    """Save ``delta`` ``(C, H, W)`` as ``<stem>.npy`` (float32) and ``<stem>.png`` (its first
    channel, mid-grey = 0, the budget's extremes black and white); returns both paths."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    stem = Path(stem)
    array = delta.detach().float().cpu().numpy()
    npy = stem.with_name(stem.name + ".npy")
    with atomic_path(npy) as tmp, open(tmp, "wb") as handle:
        np.save(handle, array)
    png = stem.with_name(stem.name + ".png")
    limit = float(np.abs(array).max()) or 1.0
    buffer = io.BytesIO()
    plt.imsave(buffer, array[0], cmap="gray", vmin=-limit, vmax=limit, format="png")
    write_bytes_atomic(png, buffer.getvalue())
    return npy, png
