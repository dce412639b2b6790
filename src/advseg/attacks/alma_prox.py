"""ALMA prox: the proximal splitting minimal-norm attack on segmentation of Rony et al. (2023)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from advseg.attacks.base import ATTACKS
from advseg.attacks.minimal import Best, Decisions, MinimalNorm, norms, per_sample
from advseg.attacks.prox import l2_prox_box, linf_prox_box
from advseg.errors import UserError

TAU = 0.95  # a constraint "improves" when it falls below TAU times its value M steps ago
GAMMA = 2.0  # the penalty parameter's growth where a constraint did not improve
ALPHA = 0.8  # the moving averages of the multipliers and of the squared gradient
SCALE_MAX = 1.0
SCALE_RATE = 0.02  # the constraint scale's change per step
LOGIT_TOLERANCE = 1e-4


@ATTACKS.register("alma-prox")
class ALMAProx(MinimalNorm):
    """ALMA prox: the smallest perturbation that makes a share of the pixels wrong.

    Paper: Rony et al., "Proximal Splitting Adversarial Attack for Semantic Segmentation",
    CVPR 2023, https://arxiv.org/abs/2206.07179 (reference code: adv-lib's
    ``attacks.segmentation.alma_prox``, by the first author).

    One constraint per unit (pixel, or (pixel, class) for sigmoid models; see
    :mod:`advseg.attacks.minimal`): its difference of logits ratio, scaled by a per-sample
    constraint scale ``w`` that shrinks while the sample is adversarial and grows while it is not,
    should fall below 0. Each step takes a gradient step on the augmented Lagrangian penalty
    ``sum P2(w c, rho, mu)`` (ALMA's penalty-Lagrangian, Rony et al. 2021), preconditioned by
    the RMS of past gradients ``H``, then the proximal step of ``lr * ||delta||`` plus the valid
    range in the metric ``H`` (:mod:`advseg.attacks.prox`). The multipliers ``mu`` follow the
    penalty's derivative (moving average); ``rho`` doubles every ``check_steps`` for constraints
    that neither improved nor were met; the step size decays once a sample is first adversarial;
    with constraint masking the largest ``1 - threshold`` share of the constraints (growing
    linearly over the steps) is left out. Each sample keeps its smallest successful iterate.

    As the reference: the penalty's derivative on the satisfied side is ``mu y + 2 mu rho y +
    rho^2 y^2 / 2`` (the reference's backward; the analytic derivative has ``mu`` for ``mu y``),
    and the hyper-parameters are its defaults. Beyond it: the L2 norm (the proximal point in the
    metric ``H`` by a bisection, :func:`~advseg.attacks.prox.l2_prox_box`), sigmoid models (their
    binary decisions have no logit ratio: the plain margin), the ``dice`` criterion, and
    volumes.

    Args:
        model, loss, eps, norm, valid_range, targeted, activation, seed, loss_kwargs,
            record_trace, criterion, threshold: see :class:`~advseg.attacks.minimal.MinimalNorm`.
        steps: iterations (default 500, the reference's).
        lr: the initial step size (default 0.001), per pixel (the step is RMS-normalised).
        lr_reduction: the final step size's share of ``lr`` (default 0.1).
        mu_init, rho_init: the initial multiplier (1) and penalty parameter (0.01).
        check_steps: steps between the checks of the constraints' progress (10).
        scale_init, scale_min: the initial (1) and smallest (0.1) constraint scale.
        constraint_masking: leave the hardest constraints out (default true).

    Shape:
        - x: ``(B, C, H, W)`` or ``(B, C, D, H, W)`` in the valid range; y: masks ``(B, K, *S)``
          (softmax: one-hot ``(B, K + 1, *S)`` or indices ``(B, *S)``); output: like ``x``;
          :attr:`min_eps`: ``(B,)``.

    Example:
        >>> attack = ALMAProx(model, loss="ce", activation="softmax", steps=500)
        >>> x_adv = attack(images, target)  # the smallest found
        >>> attack.min_eps  # (B,) L-inf norms; inf where none was found
    """

    name = "alma-prox"

    def __init__(self, model: nn.Module, loss="bce", eps: float | None = None, *,
                 steps: int = 500, lr: float = 0.001, lr_reduction: float = 0.1,
                 mu_init: float = 1.0, rho_init: float = 0.01, check_steps: int = 10,
                 scale_init: float = 1.0, scale_min: float = 0.1, constraint_masking: bool = True,
                 **kwargs) -> None:  # fmt: skip
        super().__init__(model, loss, eps, steps=steps, **kwargs)
        for key, value in (("lr", lr), ("mu_init", mu_init), ("rho_init", rho_init),
                           ("scale_init", scale_init), ("scale_min", scale_min)):  # fmt: skip
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise UserError(f"{self.name}: {key} must be a number > 0, got {value!r}")
        if not isinstance(lr_reduction, (int, float)) or not 0 < lr_reduction <= 1:
            raise UserError(f"{self.name}: lr_reduction must be in (0, 1], got {lr_reduction!r}")
        if isinstance(check_steps, bool) or not isinstance(check_steps, int) or check_steps < 1:
            raise UserError(f"{self.name}: check_steps must be an integer >= 1")
        self.lr, self.lr_reduction = float(lr), float(lr_reduction)
        self.mu_init, self.rho_init = float(mu_init), float(rho_init)
        self.check_steps = check_steps
        self.scale_init, self.scale_min = float(scale_init), float(scale_min)
        self.constraint_masking = bool(constraint_masking)

    def perturb(self, x: Tensor, y: Tensor, generator: torch.Generator) -> Tensor:
        units = Decisions(y, self.activation, x.dim(), self.targeted)
        batch, count, steps = len(x), units.count, self.steps
        sign = -1.0 if self.targeted else 1.0
        lower, upper = self.valid_range[0] - x, self.valid_range[1] - x
        prox = linf_prox_box if self.norm == "linf" else l2_prox_box
        delta = torch.zeros_like(x)
        square = torch.zeros_like(x)  # moving average of the squared gradient
        lr = torch.full((batch,), self.lr, device=x.device)
        mu = torch.full((batch, count), self.mu_init, device=x.device, dtype=torch.double)
        rho = torch.full_like(mu, self.rho_init)
        scale = torch.full((batch,), self.scale_init, device=x.device)
        best = Best(x, self.goal)
        step_found = torch.full((batch,), steps // 2, device=x.device)
        won_since = torch.zeros(batch, count, dtype=torch.bool, device=x.device)
        mask = torch.ones_like(won_since)
        previous = None
        for i in range(steps):
            x_in = (x + delta).requires_grad_(True)
            logits = self.logits(x_in)
            self.note(logits, y)
            with torch.no_grad():
                won = units.wrong(logits)
                won_since |= won
                found_before = best.found.clone()
                success = best.update(x_in.detach(), norms(delta, self.norm),
                                      self.score(logits, won, y, x.dim()))  # fmt: skip
                if i < steps // 2:
                    step_found = torch.where(~found_before & success, i, step_found)
                factor = torch.where(success, 1 + SCALE_RATE, 1 - SCALE_RATE)
                scale = (scale / factor).clamp(min=self.scale_min, max=SCALE_MAX)
            constraints = scale[:, None] * sign * units.ratio(logits, LOGIT_TOLERANCE)  # (B, N)
            with torch.no_grad():
                c = constraints.detach()
                if self.constraint_masking:
                    dropped = int((1 - self.share) * count * i / max(steps - 1, 1))
                    if dropped > 0:
                        cut = c.topk(dropped, dim=1).values[:, -1:]  # the dropped-th largest
                        mask = c <= cut
                if i == 0:
                    previous = c
                elif (i + 1) % self.check_steps == 0:
                    improved = c * mask <= TAU * previous
                    rho = torch.where(~(won_since | improved), GAMMA * rho, rho)
                    previous = c
                    won_since.zero_()
                if i:
                    slope = torch.where(mask, penalty_slope(c.double(), rho, mu), 0)
                    mu = torch.lerp(mu, slope, 1 - ALPHA).clamp(1e-12, 1)
                weights = torch.where(mask, penalty_slope(c.double(), rho, mu), 0).float()
            (grad,) = torch.autograd.grad((weights * constraints).sum(), x_in)
            with torch.no_grad():
                tangent = self.lr_reduction / (1 - self.lr_reduction) * (steps - step_found).clamp(
                    min=1)  # fmt: skip
                decay = tangent / ((i - step_found).clamp(min=0) + tangent)
                lam = lr * decay if self.lr_reduction != 1 else lr
                square = ALPHA * square + (1 - ALPHA) * grad**2
                metric = (square / (1 - ALPHA ** (i + 1))).sqrt().clamp(min=1e-8)
                delta = delta - per_sample(lam, x) * grad / metric
                delta = prox(delta, lam, lower, upper, metric)
        return self.finish(best, x, y, generator)


def penalty(y: Tensor, rho: Tensor, mu: Tensor) -> Tensor:
    """ALMA's penalty-Lagrangian ``P2(y, rho, mu)``: ``mu y + mu rho y^2 + rho^2 y^3 / 6`` for
    ``y >= 0``, ``mu y / (1 - max(rho, 1) y)`` below (Rony et al. 2021, as the reference)."""
    above = mu * y + mu * rho * y**2 + rho**2 * y**3 / 6
    below = mu * y / (1 - rho.clamp(min=1) * y.clamp(max=0))
    return torch.where(y >= 0, above, below)


def penalty_slope(y: Tensor, rho: Tensor, mu: Tensor) -> Tensor:
    """The derivative of :func:`penalty` in ``y`` as the reference's backward computes it."""
    above = mu * y + 2 * mu * rho * y + rho**2 * y**2 / 2
    below = mu / (1 - rho.clamp(min=1) * y.clamp(max=0)) ** 2
    return torch.where(y >= 0, above, below)
