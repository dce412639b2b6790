"""SEA: the worst case, per slice, over an ensemble of APGD runs with segmentation losses."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from advseg.attacks.apgd import APGD
from advseg.attacks.base import ATTACKS, Attack
from advseg.attacks.bim import check_steps
from advseg.attacks.metric import sample_dice
from advseg.attacks.padam import PAdam
from advseg.errors import UserError
from advseg.losses import LOSSES, loss_activation

DEFAULT_MEMBERS: tuple[str, ...] = ("masked-bce", "segpgd-bce", "js", "masked-spherical")
"""SEA's four members as its authors run them (nmndeep/robust-segmentation, ``tools/infer.py``:
``mask-ce-avg``, ``segpgd-loss``, ``js-avg``, ``mask-norm-corrlog-avg``), in their sigmoid forms
(softmax models get :data:`SOFTMAX_FORMS`)."""

OPTIONAL_MEMBERS: tuple[str, ...] = ("balanced-bce", "padam-bce", "padam-cosine")
"""Further members one may add (sigmoid forms): the class-balanced cross-entropy, PAdam-CE and
PAdam-Cos (Halmosi et al., ECCV 2024)."""

PRESETS: dict[str, int] = {"reference": 300, "fast": 25}
"""Steps per member: the reference's 300, or ``fast`` (advseg's earlier 100 in all, 25 each)."""
DEFAULT_PRESET = "reference"

PLAUSIBLE_KINDS = ("biasfield-", "gamma-")
"""Member prefixes of a plausible ensemble: ``biasfield-L`` / ``gamma-L`` is the registry's
plausible attack with loss L (:mod:`advseg.attacks.plausible`), eps in its own terms. An
ensemble's members all share one kind of budget, so plausible members are all of one kind.
``elastic`` is no member: it moves the truth, and SEA ranks members against the unmoved one."""

MEMBER_KINDS = ("segpgd-", "padam-", *PLAUSIBLE_KINDS)
"""Member name prefixes: ``segpgd-L`` is APGD with loss L under SegPGD's weighting, ``padam-L``
is :class:`~advseg.attacks.padam.PAdam` with loss L, ``biasfield-L`` / ``gamma-L`` a plausible
attack (:data:`PLAUSIBLE_KINDS`); a bare loss name is APGD with that loss."""

SOFTMAX_FORMS: dict[str, str] = {
    f"{kind}{a}": f"{kind}{b}"
    for a, b in (("bce", "ce"), ("masked-bce", "masked-ce"), ("balanced-bce", "balanced-ce"))
    for kind in ("", *MEMBER_KINDS)
}
SIGMOID_FORMS: dict[str, str] = {v: k for k, v in SOFTMAX_FORMS.items()}

WORST_CASE_LOSS = "worst-case"
"""The ``loss`` of an ensemble attack's records: its members carry their own losses."""

NO_MEMBER = "none"
"""The winner of a slice that no member made worse than the clean image."""


@ATTACKS.register("sea")
class SEA(Attack):
    """Segmentation Ensemble Attack: per slice, the lowest Dice over four APGD runs.

    Paper: Croce, Singh & Hein, "Towards Reliable Evaluation and Fast Training of Robust Semantic
    Segmentation Models", ECCV 2024, https://arxiv.org/abs/2306.12941 (Section 3: a single loss
    leaves slices that another loss breaks; their union is the reliable worst case). Run as its
    authors' code runs it (nmndeep/robust-segmentation, ``tools/infer.py`` and
    ``semseg/utils/attacker.py``):

    - four members, each an :class:`~advseg.attacks.apgd.APGD` run of ``steps`` steps (300) with
      the progressive radius reduction (``2 eps``, ``1.5 eps``, ``eps`` over 30/30/40 % of the
      steps): masked cross-entropy, SegPGD's time-weighted cross-entropy (``segpgd-ce``: APGD
      with ``weighting="segpgd"``), Jensen-Shannon, masked spherical; sigmoid models take the
      binary forms (``masked-bce``, ``segpgd-bce``);
    - each member returns its lowest-Dice iterate (``best="dice"``), and its step-size
      checkpoints follow plain cross-entropy (the reference's ``track_loss="ce-avg"``), except
      the spherical member, which follows its own loss;
    - per slice, the lowest Dice over the members, scored as the records score (foreground
      classes only: :func:`advseg.attacks.metric.sample_dice`); :attr:`winners` names the
      member that found it (``none`` if none beat the clean image).

    ``preset="fast"`` keeps the members but runs 25 steps each (advseg's earlier 100 in all),
    for quick looks; the preset is in :meth:`__repr__` and in the options the records keep.
    Further members (:data:`OPTIONAL_MEMBERS`, added with ``extra`` or named in ``members``):
    ``balanced-bce`` / ``balanced-ce``, and PAdam-CE
    / PAdam-Cos as ``padam-bce`` (``padam-ce``) / ``padam-cosine``
    (:class:`~advseg.attacks.padam.PAdam`, also keeping its lowest-Dice iterate). A slice whose
    Dice is already 0 is not attacked by the later members (``skip_broken``), and a member stops
    once all its slices are at 0 (the reference's ``early_stop``). When targeted, the score is
    the Dice to the target, raised.

    A plausible ensemble (members ``biasfield-L`` or ``gamma-L``, all of one kind,
    :data:`PLAUSIBLE_KINDS`) is the same worst case per slice over losses, for the optimised bias
    field or gamma curve at ``eps`` in its own terms.

    Departures from the reference, each small: the random start is APGD's (a uniform draw
    scaled to the ball's corner, torchattacks' and AutoAttack's) rather than a plain uniform
    draw; Dice ranks the iterates where the reference ranks pixel accuracy (the records' metric).

    Distance measure: L-inf or L2 (each member projects onto the ball).

    Args:
        model, eps, norm, valid_range, targeted, activation, seed: see
            :class:`~advseg.attacks.base.Attack`.
        loss: not used to attack (the members carry their own losses); accepted so that SEA is
            created like every attack. Evaluation records label it ``worst-case``.
        members: member names (see :data:`MEMBER_KINDS`), one run each; by default
            :data:`DEFAULT_MEMBERS`, each replaced by its softmax form on softmax models.
        extra: further members after ``members`` (e.g. ``["balanced-bce"]``, the one
            :data:`OPTIONAL_MEMBERS` that won most slices on advseg's small medical models:
            ``benchmarks/sea_budget.py``), each in either activation's form (made the model's).
        preset: ``reference`` (default, 300 steps per member) or ``fast`` (25 per member).
        steps: steps per member (default: the preset's).
        progressive: progressive radius reduction inside each APGD member (default true).
        skip_broken: do not attack slices whose Dice is already 0 (default true).
        loss_kwargs: ignored (the members' losses take none).

    Shape:
        - x: ``(B, C, H, W)``; y: ``(B, K, H, W)`` (or ``(B, H, W)`` indices for softmax
          models); output: ``(B, C, H, W)``.

    Example:
        >>> attack = SEA(model, eps=8 / 255, preset="fast")
        >>> x_adv = attack(images, masks)
        >>> attack.winners  # the member that won each slice
    """

    name = "sea"
    loss_ensemble = True

    def __init__(self, model: nn.Module, loss="bce", eps: float = 0.009, *,
                 members: Sequence[str] | None = None, extra: Sequence[str] | str = (),
                 preset: str = DEFAULT_PRESET,
                 steps: int | None = None, progressive: bool = True, skip_broken: bool = True,
                 **kwargs) -> None:  # fmt: skip
        super().__init__(model, loss, eps, **kwargs)
        names = list(DEFAULT_MEMBERS if members is None else members)
        if isinstance(members, str) or not names:
            raise UserError(f"{self.name}: members must be a list of member names, got {members!r}")
        forms = SOFTMAX_FORMS if self.activation == "softmax" else SIGMOID_FORMS
        names = [forms.get(n, n) if members is None else n for n in names]
        if not isinstance(extra, (str, list, tuple)):
            raise UserError(f"{self.name}: extra must be a member name or a list of them, got "
                            f"{extra!r}")  # fmt: skip
        names += [forms.get(n, n) for n in ([extra] if isinstance(extra, str) else list(extra))]
        if len(set(names)) != len(names):
            raise UserError(f"{self.name}: each member once, got {', '.join(names)}")
        if preset not in PRESETS:
            raise UserError(f"{self.name}: preset {preset!r} is not one of {', '.join(PRESETS)}")
        self.preset = preset
        self.steps = check_steps(PRESETS[preset] if steps is None else steps, self.name)
        common = {"norm": self.norm, "valid_range": self.valid_range, "targeted": self.targeted,
                  "activation": self.activation, "seed": self.seed}  # fmt: skip
        kinds = {next((k for k in PLAUSIBLE_KINDS if n.startswith(k)), "pixel") for n in names}
        if len(kinds) > 1:
            raise UserError(f"{self.name}: members {', '.join(names)} mix budgets (L-inf pixels, "
                            "a bias field's, a gamma's): one kind per ensemble")  # fmt: skip
        self.members = [self.member(model, n, eps, progressive, common) for n in names]
        self.member_names = names
        self.progressive = bool(progressive)
        self.skip_broken = bool(skip_broken)
        self.winners: list[str] = []
        """The winning member of each slice of the last call."""
        self.attacked: int = 0
        """How many (slice, member) runs the last call made (``skip_broken`` lowers it)."""

    def member(
        self, model: nn.Module, name: str, eps: float, progressive: bool, common: dict
    ) -> Attack:
        """The attack of member ``name``: APGD (maybe SegPGD-weighted) or PAdam, keeping its
        lowest-Dice iterate."""
        kind = next((k for k in MEMBER_KINDS if name.startswith(k)), "")
        loss = name[len(kind) :]
        if loss not in LOSSES:
            raise UserError(f"{self.name}: member {name!r}: {LOSSES.unknown_message(loss)}")
        own = loss_activation(loss)
        if own is not None and own != self.activation:
            raise UserError(f"{self.name}: member {name!r} is a {own} loss; this attack's "
                            f"activation is {self.activation}")  # fmt: skip
        if kind == "padam-":
            return PAdam(model, loss, eps, steps=self.steps, best="dice", **common)
        if kind in PLAUSIBLE_KINDS:  # its last iterate; SEA keeps the worst member per slice
            return ATTACKS.get(kind[:-1])(model, loss, eps, steps=self.steps, **common)
        plain = "ce" if self.activation == "softmax" else "bce"
        return APGD(
            model, loss, eps, steps=self.steps, progressive=progressive, best="dice",
            track_loss=None if loss == "masked-spherical" else plain,
            weighting="segpgd" if kind == "segpgd-" else "none", **common,
        )  # fmt: skip

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

    @property
    def setting(self) -> str:
        """The records' ``attack_setting``: which SEA ran, e.g. ``preset=reference steps=300
        members=masked-bce+segpgd-bce+js+masked-spherical`` (``progressive=off`` when off)."""
        members = "+".join(self.member_names)
        text = f"preset={self.preset} steps={self.steps} members={members}"
        return text if self.progressive else f"{text} progressive=off"

    def __repr__(self) -> str:
        return (f"SEA(preset={self.preset!r}, members={self.member_names}, steps={self.steps}, "
                f"eps={self.eps:g}, norm={self.norm!r})")  # fmt: skip


slice_dice = sample_dice
"""The per-slice Dice SEA ranks by (:func:`advseg.attacks.metric.sample_dice`)."""
