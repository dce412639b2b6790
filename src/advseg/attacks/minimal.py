"""What the minimal-norm attacks share: the decisions they flip, their success criterion, the best
iterate, and the budget.

A minimal-norm attack (``alma-prox``, ``pdpgd``) looks for the *smallest* perturbation that breaks
a slice (or a volume), instead of the most damaging one within a fixed ``eps``. After a call,
:attr:`MinimalNorm.min_eps` holds per sample the norm of the smallest breaking perturbation it
found (``inf`` where it found none, 0 where the clean image already counts as broken): one run
gives every sample's minimal eps, and so a whole robustness curve
(:mod:`advseg.stats.curves`).

The decisions (the constraints of the optimisation, one per *unit*):

- softmax models: one per pixel (voxel), the argmax against the label map (the one-hot ``y``'s
  argmax, or class indices ``(B, *S)``), background included, as adv-lib;
- sigmoid models: one per (pixel, class), the sign of the logit ``z`` against the mask bit ``t``,
  read as a two-way softmax with logits ``(-z/2, z/2)``: the margin of the right side is
  ``(2t - 1) z``.

The criterion (what "broken" means, the records' ``min_eps_criterion``):

- ``pixels`` (the papers'): at least ``threshold`` of the units are wrong (untargeted) or at the
  target (targeted); default 0.99, adv-lib's ``adv_threshold``;
- ``dice``: the sample's foreground Dice to ``y`` (mean over the K classes of the hard prediction's
  Dice, 1 where both are empty; softmax: the classes after the background) is at most
  ``threshold`` (default 0.5); untargeted only. The optimisation is the same (it pushes the units
  toward wrong, discarding the hardest ``1 - 0.99`` with constraint masking); the criterion
  decides success and which iterate is kept.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

from advseg.attacks.apgd import APGD
from advseg.attacks.base import Activation, Attack
from advseg.attacks.bim import check_steps
from advseg.attacks.metric import sample_dice
from advseg.attacks.refine import bisect, norms, parse_refine
from advseg.errors import UserError

Criterion = Literal["pixels", "dice"]
CRITERIA: tuple[str, ...] = ("pixels", "dice")
DEFAULT_THRESHOLD = {"pixels": 0.99, "dice": 0.5}
MASKED_SHARE = 0.99
"""With the ``dice`` criterion, the share of units the constraint masking aims at (adv-lib's)."""


def per_sample(values: Tensor, like: Tensor) -> Tensor:
    """``(B,)`` values shaped to broadcast against ``like`` ``(B, ...)``."""
    return values.view(-1, *([1] * (like.dim() - 1)))


class Decisions:
    """The units an attack flips and their margins, for one batch.

    Args:
        y: the masks ``(B, K, *S)`` (sigmoid), the one-hot ``(B, K + 1, *S)`` or class indices
            ``(B, *S)`` (softmax); the target when targeted.
        activation: the model's.
        image_dims: ``x.dim()`` (4 for slices, 5 for volumes).
        targeted: whether ``y`` is a target.
    """

    def __init__(self, y: Tensor, activation: Activation, image_dims: int, targeted: bool) -> None:
        self.activation = activation
        self.targeted = targeted
        if activation == "sigmoid":
            self.labels = y > 0.5  # (B, K, *S)
        else:
            self.labels = (y.argmax(1) if y.dim() == image_dims else y).long()  # (B, *S)

    @property
    def count(self) -> int:
        """Units per sample."""
        return self.labels[0].numel()

    def margin(self, logits: Tensor) -> Tensor:
        """``(B, N)``: the label's logit minus the best other one (positive where it is kept)."""
        if self.activation == "sigmoid":
            return ((2 * self.labels.to(logits.dtype) - 1) * logits).flatten(1)
        own = logits.gather(1, self.labels.unsqueeze(1))
        others = logits.scatter(1, self.labels.unsqueeze(1), float("-inf")).amax(1, keepdim=True)
        return (own - others).flatten(1)

    def ratio(self, logits: Tensor, tolerance: float) -> Tensor:
        """``(B, N)``: the margin plus ``tolerance`` over the spread of the top logits: the
        difference of logits ratio (Croce & Hein 2020) as adv-lib's segmentation ALMA prox uses it
        (top-1 minus top-3; targeted, top-1 minus the mean of top-3 and top-4). A binary decision
        (sigmoid, or fewer than 3 or 4 channels) has no such spread: its plain margin plus
        ``tolerance``."""
        value = self.margin(logits) + tolerance
        needed = 4 if self.targeted else 3
        if self.activation == "sigmoid" or logits.shape[1] < needed:
            return value
        top = logits.topk(needed, dim=1).values
        spread = top[:, 0] - (top[:, 2:].mean(1) if self.targeted else top[:, 2])
        return value / (spread.flatten(1) + 1e-8)

    def wrong(self, logits: Tensor) -> Tensor:
        """``(B, N)`` bool: the units the attack has won (wrong, or at the target)."""
        if self.activation == "sigmoid":
            same = (logits > 0) == self.labels
        else:
            same = logits.argmax(1) == self.labels
        return (same if self.targeted else ~same).flatten(1)


class Best:
    """Each sample's best iterate so far (adv-lib's rule): the smallest successful one; until one
    succeeds, the one closest to success."""

    def __init__(self, x: Tensor, goal: float) -> None:
        self.goal = goal
        self.images = x.clone()
        self.dist = torch.full((len(x),), math.inf, device=x.device)
        self.score = torch.zeros(len(x), device=x.device)
        self.found = torch.zeros(len(x), dtype=torch.bool, device=x.device)

    def update(self, images: Tensor, dist: Tensor, score: Tensor) -> Tensor:
        """Take ``images`` where better; returns ``(B,)`` bool, which samples succeed at them."""
        success = score >= self.goal
        better = (success & (dist <= self.dist)) | (~self.found & (score >= self.score.clamp(
            max=self.goal)))  # fmt: skip
        self.found |= success
        self.dist = torch.where(better, dist, self.dist)
        self.score = torch.where(better, score, self.score)
        self.images = torch.where(per_sample(better, images), images.detach(), self.images)
        return success


class MinimalNorm(Attack):
    """Base of the minimal-norm attacks (see the module's docstring).

    Args:
        model, loss, norm, valid_range, targeted, activation, seed, loss_kwargs, record_trace:
            see :class:`~advseg.attacks.base.Attack`; ``loss`` only names the records (the
            attacks optimise their own constraints).
        eps: the budget of the returned images: a sample whose smallest breaking perturbation
            is larger gets its best one shrunk into the ``eps`` ball (L-inf: clipped; L2:
            scaled). None (the default): no budget. Whatever
            ``eps``, :attr:`min_eps` is the norm the search found.
        steps: iterations (forward and backward passes).
        criterion: ``pixels`` or ``dice`` (see the module's docstring).
        threshold: the criterion's threshold (default 0.99 of the units wrong; Dice 0.5).
        refine: lower each sample's norm by an APGD bisection below it
            (:mod:`advseg.attacks.refine`): ``"ROUNDSxSTEPS"`` (default ``"6x20"``: 6 rounds
            of 20 APGD steps; ``True``/``"on"``: the same), or ``False``/``"off"``. APGD
            raises the attack's ``loss`` and, with the ``dice`` criterion, keeps its lowest-Dice
            iterate. A sample the search did not break is tried once at a finite ``eps`` first.

    After a call: :attr:`min_eps` ``(B,)`` and :attr:`min_eps_upper` ``(B,)``.
    """

    def __init__(self, model: nn.Module, loss="bce", eps: float | None = None, *, steps: int,
                 criterion: Criterion = "pixels", threshold: float | None = None,
                 refine: bool | str = "6x20", **kwargs) -> None:  # fmt: skip
        super().__init__(model, loss, 0.0 if eps is None else eps, **kwargs)
        if eps is None:
            self.eps = math.inf
        self.steps = check_steps(steps, self.name)
        if criterion not in CRITERIA:
            raise UserError(f"{self.name}: criterion {criterion!r} is not one of "
                            f"{', '.join(CRITERIA)}")  # fmt: skip
        if criterion == "dice" and self.targeted:
            raise UserError(f"{self.name}: criterion 'dice' is untargeted; use 'pixels'")
        value = DEFAULT_THRESHOLD[criterion] if threshold is None else threshold
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise UserError(f"{self.name}: threshold must be a number in [0, 1], got {value!r}")
        self.criterion: Criterion = criterion
        self.threshold = float(value)
        self.refinement = parse_refine(refine, self.name)
        self.min_eps: Tensor = torch.empty(0)
        """After a call, per sample ``(B,)``: the smallest breaking perturbation's norm found
        (``inf``: none found; NaN: not searched, ``eps`` 0), after the refinement if any."""
        self.min_eps_upper: Tensor = torch.empty(0)
        """After a call, ``(B,)``: the norm the search itself found, before the refinement (the
        upper bound it started from; equal to :attr:`min_eps` with ``refine`` off)."""

    @property
    def setting(self) -> str:
        """The records' ``attack_setting``: the search's steps and the refinement, e.g.
        ``steps=500 refine=apgd-bisection 6x20`` (``refine=off``)."""
        how = "off" if self.refinement is None else self.refinement.label
        return f"steps={self.steps} refine={how}"

    @property
    def criterion_label(self) -> str:
        """The criterion as the records name it: ``pixels>=0.99`` or ``dice<=0.5``."""
        sign = ">=" if self.criterion == "pixels" else "<="
        return f"{self.criterion}{sign}{self.threshold:g}"

    @property
    def share(self) -> float:
        """The share of units the constraint masking aims to win."""
        return self.threshold if self.criterion == "pixels" else MASKED_SHARE

    def __call__(self, x: Tensor, y: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """The adversarial images ``(B, C, *S)`` for images ``x`` (``S``: ``(H, W)`` or
        ``(D, H, W)``) and masks ``y``; sets :attr:`min_eps`."""
        self.min_eps = torch.full((len(x),), math.nan, device=x.device)
        self.min_eps_upper = self.min_eps.clone()
        return super().__call__(x, y, generator=generator)

    def score(self, logits: Tensor, won: Tensor, y: Tensor, image_dims: int) -> Tensor:
        """Per sample ``(B,)``, in [0, 1], success when at least :attr:`goal`: the share of units
        won (``pixels``) or 1 minus the foreground Dice (``dice``)."""
        if self.criterion == "pixels":
            return won.float().mean(1)
        return 1 - sample_dice(logits, y, self.activation).float()

    @property
    def goal(self) -> float:
        return self.threshold if self.criterion == "pixels" else 1 - self.threshold

    def broken(self, logits: Tensor, y: Tensor) -> Tensor:
        """``(B,)`` bool: whether the criterion counts the samples at ``logits`` as broken."""
        units = Decisions(y, self.activation, logits.dim(), self.targeted)
        return self.score(logits, units.wrong(logits), y, logits.dim()) >= self.goal

    def refine(self, x: Tensor, y: Tensor, images: Tensor, upper: Tensor,
               generator: torch.Generator) -> tuple[Tensor, Tensor]:  # fmt: skip
        """``(min_eps (B,), images)``: ``upper`` and ``images`` lowered by the bisection."""
        if self.refinement is None:
            return upper, images
        keep = "dice" if self.criterion == "dice" else "loss"
        search = APGD(self.model, self.loss, 0.0, norm=self.norm, activation=self.activation,
                      valid_range=self.valid_range, best=keep)  # fmt: skip
        return bisect(search, x, y, images, upper, self.broken, self.refinement, generator,
                      self.eps)  # fmt: skip

    def finish(self, best: Best, x: Tensor, y: Tensor, generator: torch.Generator) -> Tensor:
        """Set :attr:`min_eps_upper` from ``best``, refine it into :attr:`min_eps`, and return
        the images at it within the budget and range."""
        self.min_eps_upper = torch.where(
            best.found, best.dist, torch.full_like(best.dist, math.inf)
        )
        self.min_eps, images = self.refine(x, y, best.images, self.min_eps_upper, generator)
        delta = images - x
        if self.norm == "linf":
            delta = delta.clamp(-self.eps, self.eps)
        else:
            size = norms(delta, "l2")
            delta = delta * per_sample((self.eps / size.clamp(min=1e-30)).clamp(max=1), delta)
        return self.clip(x + delta)
