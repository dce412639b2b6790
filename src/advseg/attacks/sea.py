"""SEA: the worst case, per slice, over an ensemble of APGD runs with segmentation losses."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from advseg.attacks.apgd import APGD
from advseg.attacks.base import ATTACKS, Activation, Attack
from advseg.attacks.bim import check_steps
from advseg.errors import UserError
from advseg.losses import LOSSES, loss_activation

DEFAULT_MEMBERS: tuple[str, ...] = ("masked-bce", "js", "masked-spherical", "balanced-bce")
"""SEA's four losses, in their sigmoid forms (softmax models get :data:`SOFTMAX_FORMS`)."""

SOFTMAX_FORMS: dict[str, str] = {
    "bce": "ce",
    "masked-bce": "masked-ce",
    "balanced-bce": "balanced-ce",
}
SIGMOID_FORMS: dict[str, str] = {v: k for k, v in SOFTMAX_FORMS.items()}

WORST_CASE_LOSS = "worst-case"
"""The ``loss`` of an ensemble attack's records: its members carry their own losses."""

NO_MEMBER = "none"
"""The winner of a slice that no member made worse than the clean image."""


@ATTACKS.register("sea")
class SEA(Attack):
    """Segmentation Ensemble Attack: per slice, the lowest Dice over APGD runs with four losses.

    Paper: Croce, Singh & Hein, "Towards Reliable Evaluation and Fast Training of Robust Semantic
    Segmentation Models", ECCV 2024, https://arxiv.org/abs/2306.12941 (Section 3: a single loss
    leaves slices that another loss breaks; their union is the reliable worst case).

    Each member is an :class:`~advseg.attacks.apgd.APGD` run (with SEA's progressive radius
    reduction unless ``progressive=False``) with its own loss and its share of ``steps``. After
    each member, every slice keeps the image with the lowest Dice so far (the metric itself: hard
    predictions, per class ``2 tp / (2 tp + fp + fn)``, 1 for a class empty in both, the mean over
    the classes), and :attr:`winners` names the member that found it (``none`` if none beat the
    clean image). A slice whose Dice is already 0 is not attacked by the later members
    (``skip_broken``): nothing is left to break, and its share of the work is saved. When
    targeted, the score is ``1 - Dice`` to the target instead.

    Distance measure: L-inf or L2 (each member projects onto the ball).

    Args:
        model, eps, norm, valid_range, targeted, activation, seed: see
            :class:`~advseg.attacks.base.Attack`.
        loss: not used to attack (the members carry their own losses); accepted so that SEA is
            created like every attack. Evaluation records label it ``worst-case``.
        members: loss names, one APGD run each; by default ``masked-bce``, ``js``,
            ``masked-spherical``, ``balanced-bce``, each replaced by its softmax form
            (``masked-ce``, ``balanced-ce``) on softmax models and back.
        steps: the total budget of steps, split evenly over the members (the first members take
            the remainder); at least one per member. Default 100.
        progressive: progressive radius reduction inside each member (default true).
        skip_broken: do not attack slices whose Dice is already 0 (default true).
        loss_kwargs: ignored (the members' losses take none).

    Shape:
        - x: ``(B, C, H, W)``; y: ``(B, K, H, W)`` (or ``(B, H, W)`` indices for softmax
          models); output: ``(B, C, H, W)``.

    Example:
        >>> attack = SEA(model, eps=8 / 255, steps=400)
        >>> x_adv = attack(images, masks)
        >>> attack.winners  # the member that won each slice
    """

    name = "sea"
    loss_ensemble = True

    def __init__(self, model: nn.Module, loss="bce", eps: float = 0.009, *,
                 members: Sequence[str] | None = None, steps: int = 100,
                 progressive: bool = True, skip_broken: bool = True,
                 **kwargs) -> None:  # fmt: skip
        super().__init__(model, loss, eps, **kwargs)
        names = list(DEFAULT_MEMBERS if members is None else members)
        if isinstance(members, str) or not names:
            raise UserError(f"{self.name}: members must be a list of loss names, got {members!r}")
        forms = SOFTMAX_FORMS if self.activation == "softmax" else SIGMOID_FORMS
        names = [forms.get(n, n) if members is None else n for n in names]
        for n in names:
            if n not in LOSSES:
                raise UserError(f"{self.name}: member {LOSSES.unknown_message(n)}")
            kind = loss_activation(n)
            if kind is not None and kind != self.activation:
                raise UserError(f"{self.name}: member {n!r} is a {kind} loss; this attack's "
                                f"activation is {self.activation}")  # fmt: skip
        if len(set(names)) != len(names):
            raise UserError(f"{self.name}: each member once, got {', '.join(names)}")
        self.steps = check_steps(steps, self.name)
        if self.steps < len(names):
            raise UserError(
                f"{self.name}: steps {steps} is less than one per member ({len(names)} members)"
            )
        shares = [
            self.steps // len(names) + (i < self.steps % len(names)) for i in range(len(names))
        ]
        common = {"norm": self.norm, "valid_range": self.valid_range, "targeted": self.targeted,
                  "activation": self.activation, "seed": self.seed}  # fmt: skip
        self.members = [
            APGD(model, n, eps, steps=s, progressive=progressive, **common)
            for n, s in zip(names, shares, strict=True)
        ]
        self.member_names = names
        self.skip_broken = bool(skip_broken)
        self.winners: list[str] = []
        """The winning member of each slice of the last call."""
        self.attacked: int = 0
        """How many (slice, member) runs the last call made (``skip_broken`` lowers it)."""

    def __call__(self, x: Tensor, y: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        self.winners, self.attacked = [NO_MEMBER] * x.shape[0], 0  # also right when eps is 0
        return super().__call__(x, y, generator=generator)

    def perturb(self, x: Tensor, y: Tensor, generator: torch.Generator) -> Tensor:
        with torch.no_grad():
            best = x.clone()
            best_score = self.score(self.logits(x), y)  # (B,), lower is worse for the model
        winner = torch.full((x.shape[0],), -1, dtype=torch.long, device=x.device)
        self.attacked = 0
        for m, member in enumerate(self.members):
            todo = best_score > 0 if self.skip_broken else torch.ones_like(best_score, dtype=bool)
            rows = todo.nonzero().squeeze(1)
            if rows.numel() == 0:
                break
            self.attacked += rows.numel()
            candidate = member.perturb(x[rows], y[rows], generator)
            with torch.no_grad():
                score = self.score(self.logits(candidate), y[rows])
            current = best_score[rows]
            better = (score < current) | ((score == current) & (winner[rows] < 0))
            chosen = rows[better]
            best[chosen] = candidate[better]
            best_score[chosen] = score[better]
            winner[chosen] = m
        self.winners = [self.member_names[i] if i >= 0 else NO_MEMBER for i in winner.tolist()]
        return best

    def score(self, logits: Tensor, y: Tensor) -> Tensor:
        """What SEA minimises per slice, ``(B,)``: the Dice to ``y`` (``1 - Dice`` targeted)."""
        dice = slice_dice(logits, y, self.activation)
        return 1 - dice if self.targeted else dice

    def __repr__(self) -> str:
        return (f"SEA(members={self.member_names}, steps={self.steps}, eps={self.eps:g}, "
                f"norm={self.norm!r})")  # fmt: skip


def slice_dice(logits: Tensor, y: Tensor, activation: Activation) -> Tensor:
    """Dice of the hard prediction per slice, ``(B,)``: the mean over the classes of
    ``2 tp / (2 tp + fp + fn)``, 1 for a class empty in both prediction and mask.

    ``y`` is ``(B, K, H, W)``, or class indices ``(B, H, W)`` for softmax.
    """
    if activation == "sigmoid":
        pred = logits > 0
    else:
        pred = F.one_hot(logits.argmax(1), logits.shape[1]).permute(0, 3, 1, 2).bool()
    if y.dim() != logits.dim():
        y = F.one_hot(y.long(), logits.shape[1]).permute(0, 3, 1, 2)
    target = y > 0.5
    tp = (pred & target).flatten(2).sum(2).double()  # (B, K)
    wrong = (pred ^ target).flatten(2).sum(2).double()  # fp + fn
    denominator = 2 * tp + wrong
    dice = torch.where(denominator > 0, 2 * tp / denominator.clamp(min=1), torch.ones_like(tp))
    return dice.mean(1)
