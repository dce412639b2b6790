"""AdvBias: an optimised smooth multiplicative bias field."""

from __future__ import annotations

import itertools

import torch
from torch import Tensor, nn

from advseg.attacks.base import ATTACKS
from advseg.attacks.plausible import PlausibleAttack
from advseg.errors import UserError


def polynomial_basis(shape: tuple[int, ...], order: int, device=None) -> Tensor:
    """Every monomial of total degree ``<= order`` in the coordinates in [-1, 1] of a grid
    of ``shape`` (2 or 3 axes): ``(M, *shape)``, the constant first (TorchIO's BiasField
    field is the same family)."""
    axes = [torch.linspace(-1.0, 1.0, n, device=device) for n in shape]
    grids = torch.meshgrid(*axes, indexing="ij")
    terms = []
    for powers in itertools.product(range(order + 1), repeat=len(shape)):
        if sum(powers) <= order:
            term = torch.ones(shape, device=device)
            for grid, power in zip(grids, powers, strict=True):
                term = term * grid**power
            terms.append(term)
    return torch.stack(terms)


@ATTACKS.register("biasfield")
class BiasField(PlausibleAttack):
    """AdvBias: the image times ``exp(f)``, ``f`` a polynomial field with ``max |f| <= eps``.

    Paper: Chen et al., "Realistic Adversarial Data Augmentation for MR Image Segmentation",
    MICCAI 2020, https://arxiv.org/abs/2006.13322 (a smooth bias field optimised to break the
    model; here a low-order polynomial, as TorchIO's BiasField, instead of their B-splines).

    Distance measure: the field's largest log gain, ``max |log(x_adv / x)|`` (before the valid
    range clips), per sample: eps 0.3 lets intensities scale by 0.74 to 1.35.

    Args:
        model, loss, eps, valid_range, targeted, activation, seed, loss_kwargs, steps, alpha,
            random_start: see :class:`~advseg.attacks.plausible.PlausibleAttack`.
        order: the polynomial's total degree (default 3: 10 coefficients on a slice, 20 on a
            volume).

    Shape:
        - x: ``(B, C, H, W)`` or ``(B, C, D, H, W)``; y: masks of the same layout; output: as x.
        The field is one per sample, shared by its channels.

    Example:
        >>> attack = BiasField(model, loss="dice", eps=0.3, steps=20)
        >>> x_adv = attack(images, masks)
    """

    name = "biasfield"
    pixel_budget = False
    needs_range = "low"

    def __init__(self, model: nn.Module, loss="bce", eps: float = 0.3, *, order: int = 3,
                 **kwargs) -> None:  # fmt: skip
        super().__init__(model, loss, eps, **kwargs)
        if isinstance(order, bool) or not isinstance(order, int) or not 1 <= order <= 6:
            raise UserError(f"{self.name}: order must be an integer from 1 to 6, got {order!r}")
        self.order = order
        self._basis: Tensor | None = None

    def basis(self, x: Tensor) -> Tensor:
        """``(M, *spatial)`` for ``x``'s grid (kept while the grid stays the same)."""
        shape = tuple(x.shape[2:])
        if self._basis is None or tuple(self._basis.shape[1:]) != shape:
            self._basis = polynomial_basis(shape, self.order, x.device)
        return self._basis.to(x.device)

    def field(self, x: Tensor, theta: Tensor) -> Tensor:
        """The log gain ``f``, ``(B, 1, *spatial)``, of coefficients ``theta`` ``(B, M)``."""
        return torch.einsum("bm,m...->b...", theta, self.basis(x)).unsqueeze(1)

    def start(self, x: Tensor, generator: torch.Generator) -> Tensor:
        count = self.basis(x).shape[0]
        theta = torch.empty(len(x), count, device=x.device).uniform_(-1, 1, generator=generator)
        return theta * (self.eps / self.size(x, theta).clamp_min(1e-12)).unsqueeze(1)

    def render(self, x: Tensor, theta: Tensor) -> Tensor:
        low, _ = self.valid_range
        return self.clip(low + (x - low) * torch.exp(self.field(x, theta)))

    def project(self, x: Tensor, theta: Tensor) -> Tensor:
        reach = self.size(x, theta)
        return theta * (self.eps / reach.clamp_min(1e-12)).clamp(max=1.0).unsqueeze(1)

    def size(self, x: Tensor, theta: Tensor) -> Tensor:
        """``max |f|`` per sample, ``(B,)``."""
        return self.field(x, theta).flatten(1).abs().amax(dim=1)
