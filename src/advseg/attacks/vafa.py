"""VAFA: an adversarial quantisation of the block DCT of a volume, held to an SSIM bound."""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor, nn

from advseg.attacks.base import ATTACKS, Attack
from advseg.attacks.bim import check_alpha
from advseg.attacks.dct import dctn, from_blocks, idctn, to_blocks
from advseg.errors import UserError
from advseg.metrics import ssim

_BISECTIONS = 14  # the SSIM back-off's resolution: 2^-14 of the way from x to the quantised image


def soft_round(r: Tensor, temperature: float) -> Tensor:
    """A differentiable rounding (AdvDrop's ``phi``): ``floor(r)`` plus a tanh step of width
    ``temperature`` at ``floor(r) + 0.5``; continuous at the integers, ``round`` as it goes to 0.
    """
    k = math.log(2.0 / temperature - 1.0)
    floor = torch.floor(r)
    step = torch.tanh((r - floor - 0.5) * k) / (1.0 - temperature)
    return floor + (step + 1.0) / 2.0


@ATTACKS.register("vafa")
class VAFA(Attack):
    """Volumetric Adversarial Frequency Attack: a quantisation table per block, learned to break
    the model, that drops the DCT information the model needs; the result kept SSIM-similar.

    Paper: Hanif et al., "Frequency Domain Adversarial Training for Robust Volumetric Medical
    Segmentation", MICCAI 2023, https://arxiv.org/abs/2307.07269 (code: asif-hanif/vafa), after
    AdvDrop (Duan et al., ICCV 2021, https://arxiv.org/abs/2108.09034). The image, scaled to
    [0, 1] over the valid range and centred, is cut into ``block^d`` blocks (``d`` = 3 for
    volumes, 2 for slices); each block's orthonormal DCT coefficients ``c`` are quantised as
    ``q * round(c / q)`` with a table ``q`` of its own (one entry per coefficient per block per
    channel), and the inverse DCT gives the adversarial image. ``q`` starts at ``eps`` everywhere
    and takes ``steps`` signed steps of ``alpha`` that raise the attack's loss minus
    ``ssim_weight * (1 - SSIM)`` (the paper's objective), through a soft rounding whose
    temperature falls from 0.1 toward 0 (the paper's schedule), kept in ``[q_min, eps]``. The
    returned image is the hard quantisation with the last table.

    Bound: the table's entries (``q_min <= q <= eps``: a coefficient moves by at most ``eps / 2``
    of the valid range's width) and ``SSIM(x_adv, x) >= ssim_min`` per sample, SSIM as the records
    report it (:func:`advseg.metrics.ssim`, MONAI, Gaussian window 7). Where the quantised image
    falls below ``ssim_min`` it is moved back toward ``x`` (``x + t (x_q - x)``, the largest ``t``
    found by bisection that meets the bound). Differences from the reference code: the output is
    clipped to the valid range instead of each slice being min-max rescaled (which would change
    its contrast), and a volume need not be a multiple of the block (edges are padded).

    Args:
        model, loss, valid_range, targeted, activation, seed, loss_kwargs, record_trace: see
            :class:`~advseg.attacks.base.Attack`; ``norm`` must stay ``linf`` and the valid range
            must be finite (the table is in its units).
        eps: the largest quantisation step, as a fraction of the valid range's width (the
            paper's ``q_max / 255``; default 20/255).
        steps: signed steps on the table (default 20; 0: the plain quantisation by ``eps``).
        alpha: the table's step, in ``eps``'s units (default 1/255: the paper's step of 1).
        q_min: the smallest quantisation step (default ``eps / 4``: the paper's 5 of 20).
        block: the block's side (default 8).
        ssim_min: the SSIM every output keeps to its clean image (default 0.95).
        ssim_weight: the weight of ``1 - SSIM`` in the objective (default 1; 0 leaves it out).

    Shape:
        - x: ``(B, C, D, H, W)`` or ``(B, C, H, W)``; y: masks of the same layout (or class
          indices); output: as x. :attr:`q_table` keeps the last call's tables
          ``(B, C, *blocks, *[block] * d)``.

    Example:
        >>> attack = VAFA(inferer, loss="dice", eps=20 / 255, steps=20, ssim_min=0.95)
        >>> x_adv = attack(volumes, masks)
    """

    name = "vafa"
    norms: ClassVar[tuple[str, ...]] = ("linf",)
    pixel_budget = False

    def __init__(self, model: nn.Module, loss="bce", eps: float = 20 / 255, *, steps: int = 20,
                 alpha: float | None = None, q_min: float | None = None, block: int = 8,
                 ssim_min: float = 0.95, ssim_weight: float = 1.0,
                 **kwargs) -> None:  # fmt: skip
        super().__init__(model, loss, eps, **kwargs)
        if not all(math.isfinite(b) for b in self.valid_range):
            raise UserError(f"vafa: needs a finite valid_range (low, high), got "
                            f"{kwargs.get('valid_range')}")  # fmt: skip
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise UserError(f"vafa: steps must be an integer >= 0, got {steps!r}")
        if isinstance(block, bool) or not isinstance(block, int) or block < 2:
            raise UserError(f"vafa: block must be an integer >= 2, got {block!r}")
        self.steps, self.block = steps, block
        self.alpha = check_alpha(alpha, 1 / 255, "vafa")
        self.q_min = self.eps / 4 if q_min is None else q_min
        valid = isinstance(self.q_min, (int, float)) and 0 < self.q_min <= self.eps
        if self.eps > 0 and not valid:
            raise UserError(f"vafa: q_min must be in (0, eps={self.eps:g}], got {q_min!r}")
        for key, value in (("ssim_min", ssim_min), ("ssim_weight", ssim_weight)):
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise UserError(f"vafa: {key} must be a finite number >= 0, got {value!r}")
        if ssim_min > 1:
            raise UserError(f"vafa: ssim_min must be in [0, 1], got {ssim_min!r}")
        self.ssim_min, self.ssim_weight = float(ssim_min), float(ssim_weight)
        self.q_table: Tensor | None = None
        """The quantisation tables of the last call's images (per sample), for inspection."""

    @property
    def setting(self) -> str:
        """The records' ``attack_setting``: the table's steps and bounds, the SSIM bound and the
        valid range the table and the SSIM are in, e.g. ``steps=20 alpha=0.00392 q_min=0.0196
        block=8 ssim_min=0.95 range=-2.19,3.36`` (volumes: the z-scored range,
        :attr:`advseg.data.VolumeData.valid_range`)."""
        low, high = self.valid_range
        table = f"steps={self.steps} alpha={self.alpha:.3g} q_min={self.q_min:.3g}"
        return f"{table} block={self.block} ssim_min={self.ssim_min:g} range={low:.6g},{high:.6g}"

    def perturb(self, x: Tensor, y: Tensor, generator: torch.Generator) -> Tensor:
        low, high = self.valid_range
        dims = x.dim() - 2
        coeffs = dctn(to_blocks((x - low) / (high - low) - 0.5, self.block), dims)
        q = torch.full_like(coeffs, self.eps)
        for t in range(self.steps):
            q = q.detach().requires_grad_(True)
            x_t = self.render(coeffs, q, x.shape, 0.1 * (1 - t / self.steps))
            logits = self.logits(x_t)
            self.note(logits, y)
            values = self.objective(logits, y)
            if self.ssim_weight:
                values = values - self.ssim_weight * self._ssim_loss(x_t, x)
            (grad,) = torch.autograd.grad(values.sum(), q)
            q = (q.detach() + self.alpha * grad.sign()).clamp(self.q_min, self.eps)
        self.q_table = q.detach()
        return self.within_ssim(x, self.render(coeffs, self.q_table, x.shape, None))

    def render(self, coeffs: Tensor, q: Tensor, shape: torch.Size, temperature: float | None):
        """The image of the quantised coefficients (hard rounding when ``temperature`` is None),
        in the valid range."""
        low, high = self.valid_range
        r = coeffs / q
        rounded = torch.round(r) if temperature is None else soft_round(r, temperature)
        u = from_blocks(idctn(rounded * q, len(shape) - 2), shape) + 0.5
        return self.clip(low + (high - low) * u)

    def _ssim_loss(self, x_adv: Tensor, x: Tensor) -> Tensor:
        """``1 - SSIM(x_adv, x)`` per sample, differentiable (MONAI's SSIMLoss, the records'
        window)."""
        from monai.losses import SSIMLoss  # here: MONAI's import is heavy

        side = min(x.shape[2:])
        win = min(7, side if side % 2 else side - 1)
        low, high = self.valid_range
        loss = SSIMLoss(x.dim() - 2, high - low, win_size=win, reduction="none")
        return loss(x_adv, x).flatten()

    def within_ssim(self, x: Tensor, x_q: Tensor) -> Tensor:
        """``x_q`` where its SSIM to ``x`` meets ``ssim_min``, else ``x + t (x_q - x)`` with the
        largest ``t`` (bisection) whose SSIM does (``t = 0`` always does: SSIM 1)."""
        low, high = self.valid_range
        with torch.no_grad():
            below = ssim(x, x_q, high - low) < self.ssim_min  # (B,)
            if not below.any():
                return x_q
            xs, delta = x[below], x_q[below] - x[below]
            shape = (-1,) + (1,) * (x.dim() - 1)
            lo = torch.zeros(len(xs), dtype=x.dtype, device=x.device)
            hi = torch.ones_like(lo)
            for _ in range(_BISECTIONS):
                mid = (lo + hi) / 2
                ok = ssim(xs, self.clip(xs + mid.view(shape) * delta), high - low) >= self.ssim_min
                lo, hi = torch.where(ok, mid, lo), torch.where(ok, hi, mid)
            out = x_q.clone()
            out[below] = self.clip(xs + lo.view(shape) * delta)
            return out
