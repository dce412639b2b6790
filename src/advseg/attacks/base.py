"""The base of every attack: the model, the loss, the budget and the valid range.

An attack is a small subclass whose :meth:`Attack.perturb` is its algorithm and nothing else (the
torchattacks pattern). The base owns everything around it:

- the loss, by name from :data:`advseg.losses.LOSSES` or any callable ``(logits, target) -> (B,)``,
  always per sample, so that restarts can keep the worst case of each sample;
- the threat model: ``eps`` under the ``linf`` or ``l2`` norm, and the valid pixel range;
- untargeted (raise the loss against the true mask) or targeted (lower the loss toward a given
  target mask, e.g. the true mask with one organ erased);
- the model state: during an attack the model is in eval mode and its parameters do not require
  grad (only the input gradient is computed); both are restored afterwards;
- randomness: a random start draws from a ``torch.Generator`` seeded by the attack's ``seed`` (or
  one passed to the call), never from the global generator.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from advseg.errors import UserError
from advseg.losses import LOSSES, Loss, PerSampleLoss, create_loss, loss_activation
from advseg.metrics import dice_score, hard_prediction
from advseg.registry import Registry

Norm = Literal["linf", "l2"]
Activation = Literal["sigmoid", "softmax"]

ATTACKS: Registry[type[Attack]] = Registry("attack")

_DIVISION_EPS = 1e-10  # keeps L2 normalisation finite on a zero gradient (torchattacks' value)


@contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and no parameter gradients inside the block; the previous state afterwards.

    Every submodule's training flag and every parameter's ``requires_grad`` are restored, so a
    model that was partly frozen before stays exactly as it was.
    """
    modes = [(module, module.training) for module in model.modules()]
    flags = [(param, param.requires_grad) for param in model.parameters()]
    model.eval()
    for param, _ in flags:  # one by one: a TorchScript module has no requires_grad_()
        param.requires_grad_(False)
    try:
        yield model
    finally:
        for param, flag in flags:
            param.requires_grad_(flag)
        for module, mode in modes:
            module.training = mode


def model_logits(model: nn.Module, x: Tensor) -> Tensor:
    """The model's logits ``(B, K, H, W)``, from a tensor, a tuple (first item) or a dict."""
    out = model(x)
    if isinstance(out, dict):
        out = out["out"] if "out" in out else next(iter(out.values()))
    elif isinstance(out, (tuple, list)):
        out = out[0]
    return out


class Attack:
    """Base class of the attacks.

    Args:
        model: a segmentation model mapping images ``(B, C, H, W)`` to logits ``(B, K, H, W)``.
        loss: a loss name (``bce``, ``focal``, ``dice``, ``dicefocal``, ``ce``) or a callable
            ``(logits, target) -> (B,)``.
        eps: the perturbation budget under ``norm`` (0 leaves the images unchanged).
        norm: ``linf`` or ``l2``.
        valid_range: the ``(low, high)`` range the model's inputs live in: the images given must
            lie in it (else a :class:`UserError`: an image outside it would be clipped, moving
            pixels by more than ``eps``) and the adversarial images are clipped to it. The
            default ``(0, 1)`` is what advseg's preprocessing gives
            (:attr:`advseg.data.PreprocessConfig.value_range`); for a model fed z-scored or HU
            images pass their range, or ``None`` (no bounds: nothing is clipped, and no L-inf
            ``eps`` is too large).
        targeted: if true, the attack's ``y`` is a target mask and the loss toward it is lowered.
        activation: ``sigmoid`` (multi-label, one decision per class) or ``softmax`` (one class
            per pixel); by default ``softmax`` for the softmax losses (``ce``, ``masked-ce``,
            ``balanced-ce``) and ``sigmoid`` otherwise. The attacks that look at the prediction
            (SegPGD, CosPGD, SEA) use it, and so do the losses made for both kinds (``js``,
            ``masked-spherical``), which get it unless ``loss_kwargs`` names another.
        seed: seeds the attack's own random generator (random starts).
        loss_kwargs: keyword arguments of the named loss (e.g. ``{"gamma": 2.0}``).
        record_trace: keep, after each call, :attr:`trace`: per step the mean loss and the mean
            Dice over the batch (did the attack converge?).
    """

    name: ClassVar[str] = "attack"
    norms: ClassVar[tuple[str, ...]] = ("linf", "l2")
    pixel_budget: ClassVar[bool] = True
    """True when ``eps`` bounds pixel values (so an L-inf budget above the valid range's width is
    refused); False for budgets in their own terms (pixels of displacement, a log gain)."""
    single_step: ClassVar[bool] = False
    moves_anatomy: ClassVar[bool] = False
    """True for a spatial attack: its images are scored against :meth:`adversarial_truth`."""
    """True for attacks made of one step from the clean gradient: they provide
    ``apply_gradient(x, grad)``, so that an evaluation can share one forward over losses."""

    def __init__(
        self,
        model: nn.Module,
        loss: str | PerSampleLoss = "bce",
        eps: float = 0.009,
        *,
        norm: Norm = "linf",
        valid_range: tuple[float, float] | None = (0.0, 1.0),
        targeted: bool = False,
        activation: Activation | None = None,
        seed: int = 0,
        loss_kwargs: dict | None = None,
        record_trace: bool = False,
    ) -> None:
        if norm not in self.norms:
            raise UserError(f"{self.name}: norm {norm!r} is not one of {', '.join(self.norms)}")
        low, high = (-math.inf, math.inf) if valid_range is None else _range(valid_range)
        if not low < high:
            raise UserError(
                f"{self.name}: valid_range {valid_range} must be (low, high), low < high"
            )
        self.eps = check_eps(eps, norm, high - low if self.pixel_budget else math.inf, self.name)
        if activation is None:
            activation = (loss_activation(loss) if isinstance(loss, str) else None) or "sigmoid"
        if activation not in ("sigmoid", "softmax"):
            raise UserError(f"{self.name}: activation {activation!r} is not sigmoid or softmax")
        loss_kwargs = dict(loss_kwargs or {})
        if isinstance(loss, str) and loss in LOSSES and loss_activation(loss) is None:
            loss_kwargs.setdefault("activation", activation)  # js, masked-spherical: both kinds
        self.model = model
        self.loss: Loss = create_loss(loss, reduction="none", **loss_kwargs)
        self.norm: Norm = norm
        self.valid_range = (low, high)
        self.targeted = bool(targeted)
        self.activation: Activation = activation
        self.seed = int(seed)
        self.record_trace = bool(record_trace)
        self.trace: list[tuple[float, float]] = []
        """With ``record_trace``: ``(mean loss, mean Dice)`` of the batch after each step of the
        last call, one entry per step (per gradient; restarts one after another), the last one
        the returned images'. The loss is the attack's loss to ``y`` (to the target, when
        targeted), the Dice the mean over (sample, class) of the hard prediction's Dice to ``y``
        (1 where both are empty); softmax: over the classes after channel 0, the background."""
        self._states: list[tuple[float, float]] = []

    def __call__(self, x: Tensor, y: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """Adversarial images ``(B, C, H, W)`` for images ``x`` and masks (or targets) ``y``.

        Args:
            x: images ``(B, C, H, W)`` in the valid range, or volumes ``(B, C, D, H, W)`` (the
                model then maps volumes to logits ``(B, K, D, H, W)``, e.g. through
                :class:`advseg.inference.SlidingWindow`; every shape below gains the D axis).
            y: the true masks ``(B, K, H, W)`` (or class indices ``(B, H, W)`` for ``ce``);
                the target masks when the attack is targeted.
            generator: the random generator for random starts; by default a fresh one seeded
                with the attack's ``seed``, so that a call does not depend on earlier calls.
        """
        if x.dim() not in (4, 5) or y.shape[0] != x.shape[0]:
            raise ValueError(f"{self.name}: expected x (B, C, H, W) or (B, C, D, H, W) and y with "
                             f"the same B, got "
                             f"{tuple(x.shape)} and {tuple(y.shape)}")  # fmt: skip
        x, y = x.detach(), y.detach()
        self.check_range(x)
        if self.eps == 0:
            return x.clone()
        if generator is None:
            generator = torch.Generator(device=x.device).manual_seed(self.seed)
        self._states = []
        with frozen(self.model), torch.enable_grad():  # works inside torch.no_grad() too
            x_adv = self.perturb(x, y, generator)
            if self.record_trace:  # states were taken before each step: shift by one
                with torch.no_grad():
                    self.note(self.logits(x_adv), y)
                self.trace = self._states[1:]
        return x_adv.detach()

    def check_range(self, x: Tensor) -> None:
        """Refuse images outside :attr:`valid_range`, in one line: clipping them to it would move
        pixels by more than ``eps`` (a z-scored image clipped to [0, 1] moves by several units).
        """
        low, high = self.valid_range
        if x.numel() == 0 or (math.isinf(low) and math.isinf(high)):
            return
        least, most = (float(v) for v in torch.aminmax(x.detach()))
        if least < low or most > high:
            raise UserError(
                f"{self.name}: the images span [{least:.4g}, {most:.4g}], outside valid_range "
                f"({low:g}, {high:g}); pass valid_range=(low, high) of the model's inputs, or "
                "valid_range=None for unbounded inputs (z-scored, HU), instead of clipping them"
            )

    def perturb(self, x: Tensor, y: Tensor, generator: torch.Generator) -> Tensor:
        """The attack's algorithm; runs with the model frozen. Subclasses override it."""
        raise NotImplementedError

    def adversarial_truth(self, y: Tensor) -> Tensor:
        """The truth the last call's images are scored against, for masks ``y`` ``(B, K, ...)``
        of that batch: ``y`` itself, as an attack that changes intensities leaves the anatomy
        where it is (a spatial attack, :class:`~advseg.attacks.elastic.Elastic`, moves it)."""
        return y

    def logits(self, x: Tensor) -> Tensor:
        """The model's logits ``(B, K, H, W)`` in float32."""
        return model_logits(self.model, x).float()

    def objective(self, logits: Tensor, y: Tensor) -> Tensor:
        """The per-sample value the attack raises, ``(B,)``: the loss, negated when targeted."""
        values = self.loss(logits, y)
        return -values if self.targeted else values

    def gradient(self, x: Tensor, y: Tensor, t: int = 0) -> tuple[Tensor, Tensor, Tensor]:
        """The input gradient of the summed objective at step ``t`` (0-based).

        Returns:
            ``(grad (B, C, H, W), objective (B,), logits (B, K, H, W))``, all detached.
        """
        x = x.detach().requires_grad_(True)
        logits = self.logits(x)
        self.note(logits, y)
        values = self.objective(self.weigh(logits, y, t), y)
        (grad,) = torch.autograd.grad(values.sum(), x)
        return grad, values.detach(), logits.detach()

    def note(self, logits: Tensor, y: Tensor) -> None:
        """Keep the batch's mean loss and mean Dice at ``logits`` for the trace (when asked).

        The iterative attacks call it on each step's forward (:meth:`gradient` does), so a trace
        costs no model call but the one on the returned images.
        """
        if not self.record_trace:
            return
        with torch.no_grad():
            logits = logits.detach().float()
            loss = self.loss(logits, y).mean().item()
            pred = hard_prediction(logits, self.activation)  # (B, K, H, W) bool
            if y.dim() != logits.dim():  # (B, H, W) class indices
                y = F.one_hot(y.long(), logits.shape[1]).movedim(-1, 1)
            if self.activation == "softmax":  # channel 0 is the background (advseg.labels)
                pred, y = pred[:, 1:], y[:, 1:]
            dice = float(dice_score(pred, y > 0.5).mean())
        self._states.append((loss, dice))

    def weigh(self, logits: Tensor, y: Tensor, t: int) -> Tensor:
        """Hook for pixel-weighted attacks (SegPGD, CosPGD) at step ``t``; plain ones: identity."""
        return logits

    def step(self, x_adv: Tensor, grad: Tensor, alpha: float) -> Tensor:
        """One ascent step of size ``alpha``: the sign (L-inf) or the unit direction (L2)."""
        if self.norm == "linf":
            return x_adv + alpha * grad.sign()
        norms = grad.flatten(1).norm(p=2, dim=1) + _DIVISION_EPS  # (B,)
        return x_adv + alpha * grad / norms.view(-1, *[1] * (grad.dim() - 1))

    def project(self, x_adv: Tensor, x: Tensor) -> Tensor:
        """Back into the ``eps`` ball around ``x``, then into the valid range.

        Clipping to the valid range after the ball cannot leave the ball: ``x`` is inside the
        range, so clipping only moves each pixel toward ``x``.
        """
        delta = x_adv - x
        if self.norm == "linf":
            delta = delta.clamp(-self.eps, self.eps)
        else:
            norms = delta.flatten(1).norm(p=2, dim=1)  # (B,)
            factor = (self.eps / (norms + _DIVISION_EPS)).clamp(max=1.0)
            delta = delta * factor.view(-1, *[1] * (delta.dim() - 1))
        return self.clip(x + delta)

    def clip(self, x: Tensor) -> Tensor:
        return x.clamp(*self.valid_range)

    def random_point(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """A uniform point of the L-inf ball, or a point of the L2 ball (torchattacks' draws)."""
        if self.norm == "linf":
            noise = torch.empty_like(x).uniform_(-self.eps, self.eps, generator=generator)
            return self.clip(x + noise)
        delta = torch.empty_like(x).normal_(generator=generator)
        norms = delta.flatten(1).norm(p=2, dim=1).view(-1, *[1] * (delta.dim() - 1))
        radius = torch.empty_like(norms).uniform_(0, 1, generator=generator)
        return self.clip(x + delta * radius / norms * self.eps)

    @property
    def setting(self) -> str:
        """The attack's named budget beyond its name, loss and eps, as the records keep it
        (``attack_setting``): empty here; ``sea`` names its preset, steps and members, ``vafa``
        its table's steps, SSIM bound and valid range."""
        return ""

    def __repr__(self) -> str:
        kind = "targeted" if self.targeted else "untargeted"
        return (f"{type(self).__name__}(loss={self.loss.name!r}, eps={self.eps:g}, "
                f"norm={self.norm!r}, {kind})")  # fmt: skip


def _range(valid_range: tuple[float, float]) -> tuple[float, float]:
    """``valid_range`` as two floats (``None`` for either bound: unbounded on that side)."""
    try:
        low, high = valid_range
        return (-math.inf if low is None else float(low), math.inf if high is None else float(high))
    except (TypeError, ValueError):
        raise UserError(f"valid_range {valid_range!r} must be (low, high) or None") from None


def check_eps(eps: float, norm: str, span: float, name: str = "attack") -> float:
    """``eps`` as a float, or a :class:`UserError` for a negative, infinite or absurd budget.

    An L-inf budget above the width of the valid range allows any image at all, so it is refused.
    """
    try:
        value = float(eps)
    except (TypeError, ValueError):
        raise UserError(f"{name}: eps {eps!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise UserError(f"{name}: eps must be a finite number >= 0, got {eps!r}")
    if norm == "linf" and value > span:
        raise UserError(f"{name}: eps {value:g} exceeds the valid range's width {span:g} (L-inf)")
    return value
