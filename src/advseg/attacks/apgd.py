"""APGD: Auto-PGD, PGD with momentum and a step size that adapts itself at checkpoints."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from advseg.attacks.base import ATTACKS, Attack
from advseg.attacks.bim import check_steps
from advseg.errors import UserError

_NORM_EPS = 1e-12  # APGD's guard in the L2 normalisations (the reference implementation's value)

RADIUS_SCHEDULE = ((0.3, 2.0), (0.3, 1.5), (0.4, 1.0))
"""Progressive radius reduction (SEA): (share of the steps, radius as a multiple of eps)."""


@ATTACKS.register("apgd")
class APGD(Attack):
    """Auto-PGD, L-inf or L2, with any loss; keeps the best iterate of each sample.

    Paper: Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of
    diverse parameter-free attacks", ICML 2020, https://arxiv.org/abs/2003.01690.

    No step size to tune: the step starts at ``2 eps``; each step is a projected gradient step
    followed by a momentum step (``x <- x + a (z - x) + (1 - a) (x - x_prev)``, ``a = 0.75``).
    At checkpoints the step size is halved for the samples whose objective rose in at most
    ``rho`` of the steps since the last checkpoint, or did not improve its best since the last
    checkpoint while its step was kept; those samples restart from their best point. The first
    checkpoint comes after ``0.22 N`` steps, the gap shrinking by ``0.03 N`` down to ``0.06 N``.
    The schedule, the random start (a random corner-scaled point of the ball) and the update
    follow the reference implementation (AutoAttack, and torchattacks' APGD) operation by
    operation, so that on a classifier-like model with cross-entropy the iterates are the same
    bit for bit (``tests/test_apgd.py``). Unlike the reference, the last step's gradient is not
    computed (it would not be used).

    With ``progressive``, the steps are split 30/30/40 % over the radii ``2 eps``, ``1.5 eps``
    and ``eps``, each stage starting from the previous stage's best point projected onto its
    smaller ball: SEA's progressive radius reduction (Croce, Singh & Hein, ECCV 2024), which
    finds better points of the final ball on segmentation models.

    Distance measure: L-inf or L2.

    Args:
        model, loss, eps, norm, valid_range, targeted, activation, seed, loss_kwargs: see
            :class:`~advseg.attacks.base.Attack`.
        steps: iterations per restart (default 100); one forward and one backward each.
        restarts: runs from new random starts; each sample keeps its highest-objective run.
        rho: the checkpoint's threshold on the share of steps that raised the objective.
        momentum: ``a`` above (0.75).
        random_start: start from a random point of the ball (default true), else from ``x``.
        progressive: progressive radius reduction (default false).

    Shape:
        - x: ``(B, C, H, W)``; y: ``(B, K, H, W)`` (or ``(B, H, W)`` indices for softmax
          losses); output: ``(B, C, H, W)``.

    Example:
        >>> attack = APGD(model, loss="masked-bce", eps=8 / 255, steps=100)
        >>> x_adv = attack(images, masks)
    """

    name = "apgd"

    def __init__(self, model: nn.Module, loss="bce", eps: float = 0.009, *, steps: int = 100,
                 restarts: int = 1, rho: float = 0.75, momentum: float = 0.75,
                 random_start: bool = True, progressive: bool = False,
                 **kwargs) -> None:  # fmt: skip
        super().__init__(model, loss, eps, **kwargs)
        self.steps = check_steps(steps, self.name)
        if isinstance(restarts, bool) or not isinstance(restarts, int) or restarts < 1:
            raise UserError(f"{self.name}: restarts must be an integer >= 1, got {restarts!r}")
        for label, value in (("rho", rho), ("momentum", momentum)):
            if not isinstance(value, (int, float)) or not 0 < value <= 1:
                raise UserError(f"{self.name}: {label} must be in (0, 1], got {value!r}")
        self.restarts = restarts
        self.rho = float(rho)
        self.momentum = float(momentum)
        self.random_start = bool(random_start)
        self.progressive = bool(progressive)

    def perturb(self, x: Tensor, y: Tensor, generator: torch.Generator) -> Tensor:
        best, best_value = self.schedule(x, y, generator)
        for _ in range(self.restarts - 1):
            candidate, value = self.schedule(x, y, generator)
            better = value > best_value  # (B,)
            best = torch.where(better.view(-1, *[1] * (x.dim() - 1)), candidate, best)
            best_value = torch.where(better, value, best_value)
        return best

    def schedule(self, x: Tensor, y: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """One run: a single APGD run, or the stages of the progressive radius reduction."""
        if not self.progressive:
            return self.run(x, y, self.eps, self.steps, None, generator)
        counts = [int(share * self.steps) for share, _ in RADIUS_SCHEDULE[:-1]]
        counts.append(self.steps - sum(counts))
        start, result = None, None
        for count, (_, factor) in zip(counts, RADIUS_SCHEDULE, strict=True):
            if count == 0:
                continue
            radius = factor * self.eps
            if start is not None:
                start = self.project_to(start, x, radius)
            result = self.run(x, y, radius, count, start, generator)
            start = result[0]
        assert result is not None  # the last stage has at least one step
        return result

    def run(
        self,
        x: Tensor,
        y: Tensor,
        eps: float,
        steps: int,
        start: Tensor | None,
        generator: torch.Generator,
    ) -> tuple[Tensor, Tensor]:
        """One APGD run in the ball of radius ``eps``.

        Returns:
            ``(x_best (B, C, H, W), objective_best (B,))``: each sample's best iterate.
        """
        b = x.shape[0]
        steps_2 = max(int(0.22 * steps), 1)  # the first checkpoint
        steps_min = max(int(0.06 * steps), 1)  # the smallest gap between checkpoints
        size_decr = max(int(0.03 * steps), 1)  # by how much the gap shrinks
        if start is not None:
            x_adv = start.clone()
        elif self.random_start:
            x_adv = self.apgd_start(x, eps, generator)
        else:
            x_adv = x.clone()
        x_adv = self.clip(x_adv)
        x_best = x_adv.clone()
        loss_steps = torch.zeros(steps, b, device=x.device)  # (T, B)

        grad, loss, _ = self.gradient(x_adv, y)
        grad_best = grad.clone()
        loss_best = loss.clone()
        per_sample = [b] + [1] * (x.dim() - 1)
        step_size = (
            eps * torch.ones(per_sample, device=x.device)
            * torch.tensor([2.0], device=x.device).reshape([1] * x.dim())
        )  # fmt: skip
        x_adv_old = x_adv.clone()
        k = steps_2
        counter = 0
        loss_best_last_check = loss_best.clone()
        reduced_last_check = torch.ones(b, dtype=torch.bool, device=x.device)

        for i in range(steps):
            with torch.no_grad():
                momentum_step = x_adv - x_adv_old
                x_adv_old = x_adv.clone()
                a = self.momentum if i > 0 else 1.0
                x_adv = self.apgd_step(x_adv, x, grad, momentum_step, step_size, a, eps)
            if i < steps - 1:
                grad, loss, _ = self.gradient(x_adv, y, i + 1)
            else:  # the last gradient would never be used: only the objective
                with torch.no_grad():
                    loss = self.objective(self.logits(x_adv), y)

            with torch.no_grad():
                loss_steps[i] = loss
                improved = loss > loss_best  # (B,)
                x_best[improved] = x_adv[improved]
                grad_best[improved] = grad[improved]
                loss_best[improved] = loss[improved]
                counter += 1
                if counter == k:
                    rises = torch.zeros(b, device=x.device)
                    for back in range(k):  # index -1 wraps as in the reference
                        rises += (loss_steps[i - back] > loss_steps[i - back - 1]).float()
                    oscillating = rises <= k * self.rho
                    stalled = ~reduced_last_check & (loss_best_last_check >= loss_best)
                    reduce = oscillating | stalled
                    reduced_last_check = reduce.clone()
                    loss_best_last_check = loss_best.clone()
                    if reduce.any():
                        step_size[reduce] /= 2.0
                        back_to_best = reduce.view(per_sample)
                        x_adv = torch.where(back_to_best, x_best, x_adv)
                        grad = torch.where(back_to_best, grad_best, grad)
                    counter = 0
                    k = max(k - size_decr, steps_min)
        return x_best, loss_best

    def apgd_start(self, x: Tensor, eps: float, generator: torch.Generator) -> Tensor:
        """The reference's random start: a uniform draw scaled so that its largest entry
        reaches ``eps`` (L-inf), or a Gaussian direction of length ``eps`` (L2)."""
        b = x.shape[0]
        ones = torch.ones([b] + [1] * (x.dim() - 1), device=x.device)
        dims = tuple(range(1, x.dim()))
        if self.norm == "linf":
            t = 2 * torch.rand(x.shape, generator=generator, device=x.device) - 1
            peak = t.reshape([b, -1]).abs().max(dim=1, keepdim=True)[0].reshape(ones.shape)
            return x + eps * ones * t / peak
        t = torch.randn(x.shape, generator=generator, device=x.device)
        return x + eps * ones * t / ((t**2).sum(dim=dims, keepdim=True).sqrt() + _NORM_EPS)

    def apgd_step(
        self,
        x_adv: Tensor,
        x: Tensor,
        grad: Tensor,
        momentum_step: Tensor,
        step_size: Tensor,
        a: float,
        eps: float,
    ) -> Tensor:
        """A projected gradient step, then the momentum step, projected again."""
        low, high = self.valid_range
        if self.norm == "linf":
            z = x_adv + step_size * torch.sign(grad)
            z = torch.clamp(torch.min(torch.max(z, x - eps), x + eps), low, high)
            z = x_adv + (z - x_adv) * a + momentum_step * (1 - a)
            return torch.clamp(torch.min(torch.max(z, x - eps), x + eps), low, high)
        dims = tuple(range(1, x.dim()))

        def norm(v: Tensor) -> Tensor:
            return (v**2).sum(dim=dims, keepdim=True).sqrt()

        z = x_adv + step_size * grad / (norm(grad) + _NORM_EPS)
        cap = eps * torch.ones(x.shape, device=x.device)
        z = torch.clamp(x + (z - x) / (norm(z - x) + _NORM_EPS) * torch.min(cap, norm(z - x)),
                        low, high)  # fmt: skip
        z = x_adv + (z - x_adv) * a + momentum_step * (1 - a)
        return torch.clamp(
            x + (z - x) / (norm(z - x) + _NORM_EPS) * torch.min(cap, norm(z - x) + _NORM_EPS),
            low,
            high,
        )

    def project_to(self, x_adv: Tensor, x: Tensor, eps: float) -> Tensor:
        """``x_adv`` into the ball of radius ``eps`` around ``x``, then the valid range."""
        delta = x_adv - x
        if self.norm == "linf":
            delta = delta.clamp(-eps, eps)
        else:
            norms = delta.flatten(1).norm(p=2, dim=1)  # (B,)
            factor = (eps / (norms + _NORM_EPS)).clamp(max=1.0)
            delta = delta * factor.view(-1, *[1] * (x.dim() - 1))
        return self.clip(x + delta)
