"""PAdam: projected Adam (AMSGrad) on the perturbation; a fixed budget, no step size to tune."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from advseg.attacks.base import ATTACKS, Attack
from advseg.attacks.bim import check_steps
from advseg.attacks.metric import sample_dice
from advseg.errors import UserError

PADAM_BEST = ("last", "dice")


@ATTACKS.register("padam")
class PAdam(Attack):
    """Projected Adam: AMSGrad ascent on the perturbation, projected after every step.

    Paper: Halmosi, Mohos & Jelasity, "Evaluating the Adversarial Robustness of Semantic
    Segmentation: Trying Harder Pays Off", ECCV 2024, https://arxiv.org/abs/2407.09150 (code:
    szegedai/Robust-Segmentation-Evaluation, ``rse/attacks.py``). With ``loss="ce"`` (``bce``
    for sigmoid models) it is their PAdam-CE, with ``loss="cosine"`` their PAdam-Cos.

    The perturbation ``delta`` starts at a uniform point of the ball (clipped to the valid
    range); each step takes the gradient ``g`` of the objective averaged over the batch and
    applies ``torch.optim.Adam(amsgrad=True, maximize=True)``::

        m <- b1 m + (1 - b1) g,   v <- b2 v + (1 - b2) g^2,   v_max <- max(v_max, v)
        delta <- delta + lr (m / (1 - b1^t)) / (sqrt(v_max) / sqrt(1 - b2^t) + 1e-8)

    then ``delta`` is clipped to ``[-eps, eps]`` and ``x + delta`` to the valid range (Adam's
    moments are kept). No step size to tune: Adam's normalised step moves each pixel by about
    ``lr``, a fixed share of the budget, ``eps / 4`` (the reference's ``2/255`` at ``8/255``).
    The reference returns the last iterate (``best="last"``); ``best="dice"`` returns each
    sample's lowest-Dice iterate instead (one more forward, on the last point), as SEA's
    members do.

    Distance measure: L-inf (the reference's; its projection is the clip), or L2 (advseg's
    extension: projected onto the ball, and the default ``lr`` is ``eps / (4 sqrt(n))`` for
    ``n = C H W``, so that a step's L2 length is again about ``eps / 4``).

    Args:
        model, loss, eps, valid_range, targeted, activation, seed, loss_kwargs, record_trace:
            see :class:`~advseg.attacks.base.Attack`.
        steps: iterations (default 200, the reference's).
        lr: Adam's learning rate (default ``eps / 4``, L2 ``eps / (4 sqrt(C H W))``).
        random_start: start from a uniform point of the ball (default true), else from ``x``.
        best: ``last`` (default) or ``dice`` (the lowest-Dice iterate).

    Shape:
        - x: ``(B, C, H, W)``; y: ``(B, K, H, W)`` (or ``(B, H, W)`` indices for softmax
          losses); output: ``(B, C, H, W)``.

    Example:
        >>> attack = PAdam(model, loss="cosine", eps=8 / 255, activation="softmax")
        >>> x_adv = attack(images, targets)
    """

    name = "padam"

    def __init__(self, model: nn.Module, loss="bce", eps: float = 0.009, *, steps: int = 200,
                 lr: float | None = None, random_start: bool = True, best: str = "last",
                 **kwargs) -> None:  # fmt: skip
        super().__init__(model, loss, eps, **kwargs)
        self.steps = check_steps(steps, self.name)
        if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float))
                               or not 0 < lr < float("inf")):  # fmt: skip
            raise UserError(f"{self.name}: lr must be a finite number > 0, got {lr!r}")
        self.lr = None if lr is None else float(lr)
        if best not in PADAM_BEST:
            raise UserError(f"{self.name}: best {best!r} is not one of {', '.join(PADAM_BEST)}")
        self.random_start = bool(random_start)
        self.best = best

    def perturb(self, x: Tensor, y: Tensor, generator: torch.Generator) -> Tensor:
        start = self.random_point(x, generator) if self.random_start else x
        delta = (start - x).detach().requires_grad_(True)
        lr = self.lr
        if lr is None:
            n = 1 if self.norm == "linf" else math.prod(x.shape[1:])
            lr = self.eps / (4 * math.sqrt(n))
        adam = torch.optim.Adam([delta], lr=lr, amsgrad=True, maximize=True)
        by_dice = self.best == "dice"
        x_low, dice_low = x.clone(), None
        for t in range(self.steps):
            x_adv = x + delta
            logits = self.logits(x_adv)
            self.note(logits, y)
            if by_dice:
                dice_low = self.keep_lowest(x_adv, logits, y, x_low, dice_low)
            value = self.objective(self.weigh(logits, y, t), y).mean()  # the reference's mean
            (delta.grad,) = torch.autograd.grad(value, delta)
            adam.step()
            with torch.no_grad():  # L-inf: the clamp, then the valid range (the reference's)
                delta.copy_(self.project(x + delta, x) - x)
        x_adv = self.clip((x + delta).detach())  # x + (low - x) can round one ulp past low
        if by_dice:
            with torch.no_grad():
                self.keep_lowest(x_adv, self.logits(x_adv), y, x_low, dice_low)
            return self.clip(x_low)
        return x_adv

    def keep_lowest(
        self, x_adv: Tensor, logits: Tensor, y: Tensor, x_low: Tensor, dice_low: Tensor | None
    ) -> Tensor:
        """Write into ``x_low`` the samples whose Dice at ``x_adv`` is at most their lowest so far
        (the highest Dice to the target, targeted); returns the new lowest ``(B,)``."""
        dice = sample_dice(logits.detach(), y, self.activation)
        value = -dice if self.targeted else dice
        lower = torch.ones_like(value, dtype=torch.bool) if dice_low is None else value <= dice_low
        x_low[lower] = x_adv.detach()[lower]
        return value if dice_low is None else torch.minimum(value, dice_low)

    def __repr__(self) -> str:
        return (f"PAdam(loss={self.loss.name!r}, eps={self.eps:g}, norm={self.norm!r}, "
                f"steps={self.steps}, lr={self.lr})")  # fmt: skip
