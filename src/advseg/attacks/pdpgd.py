"""PDPGD: the primal-dual proximal gradient descent minimal-norm attack, for segmentation."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from advseg.attacks.base import ATTACKS
from advseg.attacks.minimal import Best, Decisions, MinimalNorm, norms, per_sample
from advseg.attacks.prox import l2_prox, linf_prox
from advseg.errors import UserError

BETAS = (0.9, 0.999)  # Adam's
PROX_TOLERANCE = 1e-2  # the proximal sub-iterations stop when the relative change is below it


@ATTACKS.register("pdpgd")
class PDPGD(MinimalNorm):
    """PDPGD: the smallest perturbation that makes a share of the pixels wrong, primal-dual.

    Paper: Matyasko & Chau, "PDPGD: Primal-Dual Proximal Gradient Descent Adversarial Attack",
    https://arxiv.org/abs/2106.01538; for segmentation as adv-lib's
    ``attacks.segmentation.pdpgd`` (Rony et al., CVPR 2023, https://arxiv.org/abs/2206.07179,
    use it as a baseline).

    The Lagrangian of "minimise ``||delta||`` subject to every unit's margin below 0" (units: see
    :mod:`advseg.attacks.minimal`) is ``lambda_0 ||delta|| + sum_u lambda_u softplus(m_u)``, whose
    weights ``lambda`` are a softmax over the units' dual variables and one fixed 0 (so
    ``lambda_0 = 1 - sum_u lambda_u``), averaged over the steps. The primal step is Adam on
    ``sum_u lambda_u softplus(m_u)`` (decaying step size), a projection onto the valid range,
    then a few proximal sub-iterations of the norm (proximal Adam, Melchior et al. 2019) with the
    weight ``lambda_0 / sum_u lambda_u`` times the step; the dual step raises the dual variable of
    each unit still kept (``sign(m_u)``) and lowers it for each won one. Each sample keeps its
    smallest successful iterate. The hyper-parameters are the reference's defaults.

    Args:
        model, loss, eps, norm, valid_range, targeted, activation, seed, loss_kwargs,
            record_trace, criterion, threshold: see :class:`~advseg.attacks.minimal.MinimalNorm`.
        steps: iterations (default 500, the reference's).
        primal_lr: Adam's initial step size (0.1), decayed exponentially to ``primal_lr *
            primal_lr_decrease`` (0.01).
        dual_ratio_init: the initial dual weight of all units together, per unit ``1 / (N *
            ratio)`` before the softmax (1).
        dual_lr: the dual step size (0.1), decayed linearly to ``dual_lr * dual_lr_decrease``
            (0.1).
        dual_ema: the moving average of the dual weights (0.9).
        proximal_steps: proximal sub-iterations per step (5).
        constraint_masking: leave the largest ``1 - threshold`` share of the margins out of the
            dual weights, growing linearly over the steps (default false, as the reference).

    Shape:
        - x: ``(B, C, H, W)`` or ``(B, C, D, H, W)``; y: masks ``(B, K, *S)`` (softmax: one-hot
          ``(B, K + 1, *S)`` or indices ``(B, *S)``); output: like ``x``; :attr:`min_eps`:
          ``(B,)``.

    Example:
        >>> attack = PDPGD(model, norm="l2", steps=500)
        >>> x_adv = attack(images, masks)
        >>> attack.min_eps  # (B,) L2 norms; inf where none was found
    """

    name = "pdpgd"

    def __init__(self, model: nn.Module, loss="bce", eps: float | None = None, *,
                 steps: int = 500, primal_lr: float = 0.1, primal_lr_decrease: float = 0.01,
                 dual_ratio_init: float = 1.0, dual_lr: float = 0.1,
                 dual_lr_decrease: float = 0.1, dual_ema: float = 0.9, proximal_steps: int = 5,
                 constraint_masking: bool = False, **kwargs) -> None:  # fmt: skip
        super().__init__(model, loss, eps, steps=steps, **kwargs)
        for key, value in (("primal_lr", primal_lr), ("primal_lr_decrease", primal_lr_decrease),
                           ("dual_ratio_init", dual_ratio_init), ("dual_lr", dual_lr),
                           ("dual_lr_decrease", dual_lr_decrease)):  # fmt: skip
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise UserError(f"{self.name}: {key} must be a number > 0, got {value!r}")
        if not isinstance(dual_ema, (int, float)) or not 0 <= dual_ema < 1:
            raise UserError(f"{self.name}: dual_ema must be in [0, 1), got {dual_ema!r}")
        if isinstance(proximal_steps, bool) or not isinstance(proximal_steps, int) or (
                proximal_steps < 1):  # fmt: skip
            raise UserError(f"{self.name}: proximal_steps must be an integer >= 1")
        self.primal_lr, self.primal_lr_decrease = float(primal_lr), float(primal_lr_decrease)
        self.dual_ratio_init = float(dual_ratio_init)
        self.dual_lr, self.dual_lr_decrease = float(dual_lr), float(dual_lr_decrease)
        self.dual_ema = float(dual_ema)
        self.proximal_steps = proximal_steps
        self.constraint_masking = bool(constraint_masking)

    def perturb(self, x: Tensor, y: Tensor, generator: torch.Generator) -> Tensor:
        units = Decisions(y, self.activation, x.dim(), self.targeted)
        batch, count, steps = len(x), units.count, self.steps
        sign = -1.0 if self.targeted else 1.0
        prox = linf_prox if self.norm == "linf" else l2_prox
        bound = -math.log(1e-12)  # the dual variables stay in [-bound, bound]
        delta = torch.zeros_like(x)
        first, second = torch.zeros_like(x), torch.zeros_like(x)  # Adam's moments
        dual = torch.full((batch, count), -math.log(count * self.dual_ratio_init),
                          device=x.device, dtype=torch.double)  # fmt: skip
        weights = softmax_plus_one(dual)
        mask = torch.ones(batch, count, dtype=torch.bool, device=x.device)
        best = Best(x, self.goal)
        for i in range(steps):
            x_in = (x + delta).requires_grad_(True)
            logits = self.logits(x_in)
            self.note(logits, y)
            margins = sign * units.margin(logits)  # (B, N), > 0 where the unit is kept
            with torch.no_grad():
                best.update(x_in.detach(), norms(delta, self.norm),
                            self.score(logits, units.wrong(logits), y, x.dim()))  # fmt: skip
                m = margins.detach()
                if self.constraint_masking:
                    dropped = int((1 - self.share) * count * i / max(steps - 1, 1))
                    if dropped > 0:
                        mask = m <= m.topk(dropped, dim=1).values[:, -1:]
                if i:
                    masked = dual.masked_fill(~mask, -math.inf)
                    weights = torch.lerp(weights, softmax_plus_one(masked), 1 - self.dual_ema)
                kept = weights * mask
            value = (F.softplus(margins) * kept.float()).sum()
            (grad,) = torch.autograd.grad(value, x_in)
            with torch.no_grad():
                b1, b2 = BETAS
                first = torch.lerp(first, grad, 1 - b1)
                second = b2 * second + (1 - b2) * grad**2
                denom = (second.sqrt() / math.sqrt(1 - b2 ** (i + 1))) + 1e-8
                step = self.primal_lr * self.primal_lr_decrease ** (i / steps)
                delta = delta - step / (1 - b1 ** (i + 1)) * first / denom
                delta = self.clip(x + delta) - x
                delta = self.proximal(delta, denom, kept.sum(1), step, prox, x)
                progress = (steps - 1 - i) / max(steps - 1, 1)
                rate = self.dual_lr * (progress * (1 - self.dual_lr_decrease) +
                                       self.dual_lr_decrease)  # fmt: skip
                dual = (dual + rate * m.sign().double() * mask).clamp(-bound, bound)
        return self.finish(best, x, y, generator)

    def proximal(self, r: Tensor, denom: Tensor, total: Tensor, step: float, prox, x: Tensor
                 ) -> Tensor:  # fmt: skip
        """Proximal Adam's sub-iterations: ``z <- range(prox(z - H (z - r), mu))`` with the
        metric ``H = denom / max(denom)`` and ``mu = (1 - total) / total * step / max(denom)``,
        until the relative change is below 1e-2 (at most ``proximal_steps``)."""
        top = denom.flatten(1).amax(1)  # (B,)
        mu = ((1 - total) / total).float() * step / top
        metric = denom / per_sample(top, denom)
        z = r
        change = torch.ones(len(r), device=r.device)
        for _ in range(self.proximal_steps):
            new = prox(z - metric * (z - r), mu)
            new = self.clip(x + new) - x
            moving = change > PROX_TOLERANCE
            previous, z = z, torch.where(per_sample(moving, z), new, z)
            change = (z - previous).flatten(1).norm(dim=1) / z.flatten(1).norm(dim=1)
            if bool((change < PROX_TOLERANCE).all()):
                break
        return z


def softmax_plus_one(values: Tensor) -> Tensor:
    """``softmax([0, v_1, ..., v_N])`` without its first entry, per row of ``(B, N)``: the units'
    weights, the remainder ``1 - sum`` the norm's."""
    padded = F.pad(values, (1, 0), value=0.0)
    return padded.softmax(dim=1)[:, 1:]
