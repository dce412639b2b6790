"""APGD: Auto-PGD, PGD with momentum and a step size that adapts itself at checkpoints."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from advseg.attacks.base import ATTACKS, Attack
from advseg.attacks.bim import check_steps
from advseg.attacks.metric import sample_dice
from advseg.attacks.segpgd import segpgd_weigh
from advseg.errors import UserError
from advseg.losses import LOSSES, create_loss, loss_activation

_NORM_EPS = 1e-12  # APGD's guard in the L2 normalisations (the reference implementation's value)

RADIUS_SCHEDULE = ((0.3, 2.0), (0.3, 1.5), (0.4, 1.0))
"""Progressive radius reduction (SEA): (share of the steps, radius as a multiple of eps)."""

BEST = ("loss", "dice")
"""What picks the returned iterate: the highest objective, or the lowest Dice (the metric)."""
WEIGHTINGS = ("none", "segpgd")


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

    With ``best="dice"`` each sample returns the iterate of lowest Dice it visited (highest Dice
    to the target when targeted; :func:`advseg.attacks.metric.sample_dice`, scored as the records
    score), not the one of highest loss: masked losses fall as pixels flip, so the two disagree,
    and the reference SEA returns the lowest-accuracy iterate (``x_best_adv`` of
    ``apgd_train`` in nmndeep/robust-segmentation, ties to the later iterate, as here). The step
    size schedule still follows the loss (so does the reference), and a run stops early once
    every sample's Dice is 0 (the reference's ``early_stop``). A progressive stage starts from
    the previous stage's returned point, so from its lowest-Dice point here.

    ``track_loss`` names another loss whose value drives the checkpoints and the restarts from
    the best point (the reference SEA tracks plain cross-entropy for its masked, SegPGD and JS
    members); by default the attack's own loss. ``weighting="segpgd"`` weighs the loss's
    gradient per element as SegPGD does (Gu et al., ECCV 2022): at step ``t`` of a run of ``T``
    steps, right elements ``1 - t / (2 T)``, wrong ones ``t / (2 T)`` (the reference's
    ``segpgd_loss``, its ``T`` each stage's own steps); the loss's value is unchanged.

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
        best: ``loss`` (default: the highest-objective iterate, as torchattacks) or ``dice``
            (the lowest-Dice iterate).
        track_loss: the loss name whose value drives the checkpoints (default: the attack's).
        weighting: ``none`` (default) or ``segpgd`` (SegPGD's time-weighted gradient).

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
                 random_start: bool = True, progressive: bool = False, best: str = "loss",
                 track_loss: str | None = None, weighting: str = "none",
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
        if best not in BEST:
            raise UserError(f"{self.name}: best {best!r} is not one of {', '.join(BEST)}")
        if weighting not in WEIGHTINGS:
            raise UserError(
                f"{self.name}: weighting {weighting!r} is not one of {', '.join(WEIGHTINGS)}"
            )
        self.best = best
        self.weighting = weighting
        self.track_loss = None
        if track_loss is not None:
            if track_loss not in LOSSES:
                raise UserError(f"{self.name}: track_loss {LOSSES.unknown_message(track_loss)}")
            extra = {"activation": self.activation} if loss_activation(track_loss) is None else {}
            self.track_loss = create_loss(track_loss, reduction="none", **extra)
        self._run_steps = self.steps  # the steps of the current run (SegPGD's T)

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
        eps: float | Tensor,
        steps: int,
        start: Tensor | None,
        generator: torch.Generator,
    ) -> tuple[Tensor, Tensor]:
        """One APGD run in the ball of radius ``eps``: a number, or per sample a tensor
        ``(B, 1, ..., 1)`` (the minimal-norm attacks' bisection, :mod:`advseg.attacks.refine`).

        Returns:
            ``(x_best (B, C, H, W), value_best (B,))``: each sample's best iterate and its value,
            higher better for the attacker (the objective, or the Dice negated untargeted).
        """
        self._run_steps = steps
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

        grad, loss, logits = self.gradient(x_adv, y)
        loss = self.tracked(loss, logits, y)
        by_dice = self.best == "dice"
        if by_dice:
            x_low = x_adv.clone()  # the best iterate by the metric, the one returned
            score_best = self.score(logits, y)
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
                grad, loss, logits = self.gradient(x_adv, y, i + 1)
            else:  # the last gradient would never be used: only the objective
                with torch.no_grad():
                    logits = self.logits(x_adv)
                    loss = self.objective(logits, y)
            loss = self.tracked(loss, logits, y)

            with torch.no_grad():
                if by_dice:
                    score = self.score(logits, y)
                    lower = score >= score_best  # ties: the later iterate (the reference's <=)
                    x_low[lower] = x_adv[lower]
                    score_best = torch.maximum(score, score_best)
                    if bool((score_best >= self.score_ceiling).all()):
                        break  # every sample fully broken: nothing left to find
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
        if by_dice:
            return x_low, score_best
        return x_best, loss_best

    @property
    def score_ceiling(self) -> float:
        """The best :meth:`score` there is: Dice 0 (untargeted), or 1 to the target."""
        return 1.0 if self.targeted else 0.0

    def score(self, logits: Tensor, y: Tensor) -> Tensor:
        """The metric as a value to raise, ``(B,)``: minus the Dice, or the Dice to the target."""
        dice = sample_dice(logits.detach(), y, self.activation)
        return dice if self.targeted else -dice

    def tracked(self, loss: Tensor, logits: Tensor, y: Tensor) -> Tensor:
        """The value the checkpoints compare: the objective, or ``track_loss``'s at ``logits``."""
        if self.track_loss is None:
            return loss
        with torch.no_grad():
            values = self.track_loss(logits, y)
        return -values if self.targeted else values

    def weigh(self, logits: Tensor, y: Tensor, t: int) -> Tensor:
        """SegPGD's weights at step ``t`` of the current run (``weighting="segpgd"``)."""
        if self.weighting == "none":
            return logits
        return segpgd_weigh(logits, y, t / (2 * self._run_steps), self.activation, self.targeted)

    def apgd_start(self, x: Tensor, eps: float | Tensor, generator: torch.Generator) -> Tensor:
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
        eps: float | Tensor,
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
