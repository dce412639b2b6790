"""Adversarial training: the attack step inside a training step (FGSM-RS, PGD, TRADES, VAFT).

The one training loop (:func:`advseg.train.train`) asks :class:`AdversarialTraining` for each
micro-batch's loss; with ``method: none`` that is the plain ``loss(model(x), y)``, so an undefended
and a defended run share every other line (optimiser, schedule, DDP, resume, checkpoints).

Methods (``train.adversarial.method``, ``advseg train --adv-train``):

- ``fgsm-rs``: Wong, Rice & Kolter, "Fast is better than free: revisiting adversarial training",
  ICLR 2020, https://arxiv.org/abs/2001.03994. One FGSM step of size ``1.25 eps`` from a uniform
  random start in the L-inf ball, projected back; the model trains on the result.
- ``pgd``: Madry et al., "Towards Deep Learning Models Resistant to Adversarial Attacks",
  ICLR 2018, https://arxiv.org/abs/1706.06083. ``steps`` projected signed steps of ``alpha``
  (default ``2.5 eps / steps``) from a random start; the model trains on the result.
- ``biasfield``, ``elastic``, ``gamma``: adversarial data augmentation with a physically
  plausible change (Chen et al., "Realistic Adversarial Data Augmentation for MR Image
  Segmentation", MICCAI 2020, https://arxiv.org/abs/2006.13322; AdvChain, MedIA 2022,
  https://arxiv.org/abs/2108.03429): the registry's attack of that name
  (:mod:`advseg.attacks.plausible`), ``steps`` signed steps on its parameters from a random
  start at the bound, ``eps`` in its own terms (log gain, pixels, log gamma); the model trains
  on the result, and for ``elastic`` on the masks warped by the same field
  (:meth:`~advseg.attacks.Attack.adversarial_truth`), as AdvChain warps the labels.
- ``trades``: Zhang et al., "Theoretically Principled Trade-off between Robustness and Accuracy",
  ICML 2019, https://arxiv.org/abs/1901.08573. Loss = ``L(f(x), y) + beta * D(f(x), f(x'))``
  where ``x'`` maximises ``D`` by PGD and ``D`` is the per-pixel KL divergence between the clean
  and the adversarial prediction (:func:`trades_divergence`), averaged over pixels.
- ``vaft``: Hanif et al., "Frequency Domain Adversarial Training for Robust Volumetric Medical
  Segmentation", MICCAI 2023, https://arxiv.org/abs/2307.07269. Loss = ``L(f(x), y) +
  L(f(x'), y) + ||DCT(f(x)) - DCT(f(x'))||_1 / ||DCT(f(x))||_1``
  (:func:`advseg.defences.vaft.frequency_consistency`) where ``x'`` is the registry's VAFA
  (:class:`advseg.attacks.VAFA`: ``eps`` its largest quantisation step, ``steps`` steps of
  ``alpha``, default 1/255, on the table; its SSIM bound 0.95). Volumes or slices.

Both the attack inside a step and the attack of robust validation are the registry's
:class:`~advseg.attacks.PGD` and :class:`~advseg.attacks.FGSM`, with any registry loss (default:
the training loss), so training attacks and evaluation attacks are the same code.

Model state during the attack (``attack_mode``):

- ``eval`` (default): the attack runs with the model in eval mode (BatchNorm uses its running
  statistics, dropout is off) and its parameters frozen (``requires_grad`` off), as every advseg
  attack does and as the TRADES reference code does. The attack targets the model as it is
  deployed, and the running statistics are updated only by the training forward.
- ``train``: the attack runs in train mode (BatchNorm uses the batch's statistics, as in Wong et
  al.'s and Madry et al.'s code); the running statistics are saved before the attack and put back
  after it, so again only the training forward updates them.

In both modes parameters are frozen only during the attack and get their gradients from the
training forward that follows. Under DDP the attack runs on the unwrapped model on each rank's own
samples: it needs no gradient synchronisation, and only the training forward goes through DDP.

Extras: ``warmup`` ramps eps linearly from ``eps / (warmup * steps_per_epoch)`` to ``eps`` over the
first ``warmup`` epochs (per step); ``fraction`` of each batch is attacked (the first
``round(fraction * B)`` samples of the shuffled batch), the rest stays clean; ``select_by: robust``
picks the best checkpoint and early-stops on validation Dice under a cheap attack at the full eps
(PGD with ``select_steps`` steps, or FGSM), as Rice, Wong & Kolter, "Overfitting in adversarially
robust deep learning", ICML 2020, https://arxiv.org/abs/2002.11569, recommend.

Randomness: each step's random start comes from its own generator, seeded from (seed, epoch,
step, rank); a resumed run repeats the draws of an uninterrupted one, and the global generator
(augmentation, dropout) sees the same draws as an undefended run.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from advseg.attacks import (
    FGSM,
    PGD,
    VAFA,
    Attack,
    check_eps,
    create_attack,
    frozen,
    model_logits,
)
from advseg.defences.vaft import frequency_consistency
from advseg.errors import UserError
from advseg.losses import LOSSES, SOFTMAX_LOSSES, Loss
from advseg.registry import Registry

ADVERSARIAL_TRAINING: Registry[str] = Registry("adversarial training method")
"""The methods by name; each entry's value is its one-line description."""

PLAUSIBLE_TRAINING: tuple[str, ...] = ("biasfield", "elastic", "gamma")
"""Methods that train on the registry's plausible attack of that name (AdvBias / AdvChain's
adversarial data augmentation), at ``eps`` in that attack's own terms."""

for _name, _help in (
    ("fgsm-rs", "FGSM from a random start, step 1.25 eps (Wong et al. 2020)"),
    ("pgd", "k-step PGD from a random start (Madry et al. 2018)"),
    ("trades", "clean loss + beta * KL(clean || adversarial), per pixel (Zhang et al. 2019)"),
    ("vaft", "clean + VAFA loss + L1 between their logits' DCT (Hanif et al. 2023)"),
    ("biasfield", "an optimised smooth bias field, max|log gain| <= eps (AdvBias, Chen 2020)"),
    ("elastic", "an optimised smooth deformation <= eps px, masks warped alike (AdvChain)"),
    ("gamma", "an optimised gamma curve, |log gamma| <= eps (AdvChain, Chen et al. 2022)"),
):
    ADVERSARIAL_TRAINING.register(_name, help=_help)(_help)

Activation = Literal["sigmoid", "softmax"]


@dataclass
class AdversarialConfig:
    """Adversarial training settings (``train.adversarial`` in YAML, ``--adv-*`` in the CLI).

    Attributes:
        method: ``none`` (plain training), ``fgsm-rs``, ``pgd``, ``trades``, ``vaft``, or a
            plausible attack: ``biasfield``, ``elastic``, ``gamma`` (:data:`PLAUSIBLE_TRAINING`).
        eps: the L-inf budget trained against, in image units ([0, 1] range); for ``vaft`` the
            VAFA's largest quantisation step, as a fraction of the valid range; for a plausible
            method, its attack's bound in its own terms (``elastic``: pixels).
        steps: attack steps for ``pgd``, ``trades``, ``vaft`` and the plausible methods
            (default 10); ``fgsm-rs`` takes one.
        alpha: step size; default ``1.25 eps`` for ``fgsm-rs``, ``1/255`` (on the quantisation
            table) for ``vaft``, ``2.5 eps / steps`` otherwise.
        beta: the weight of TRADES's divergence term (the paper's 1/lambda; 6 on CIFAR-10).
        warmup: epochs over which eps ramps up linearly to its value (0: full eps at once).
        fraction: share of each batch that is attacked (Madry et al.: 1; Goodfellow et al.: 0.5).
        loss: the attack's objective, a loss registry name; default the training loss (for
            ``trades``: the divergence itself, as in the paper).
        attack_mode: ``eval`` or ``train``: the model's mode during the attack (module docstring).
        select_by: ``clean`` or ``robust``: the "best" checkpoint and early stopping follow clean
            validation Dice, or validation Dice under ``select_attack`` at ``eps``.
        select_attack: ``pgd`` (default) or ``fgsm``: the cheap attack of robust validation.
        select_steps: steps of the ``pgd`` validation attack.
    """

    method: str = "none"
    eps: float = 0.009
    steps: int | None = None
    alpha: float | None = None
    beta: float = 6.0
    warmup: int = 0
    fraction: float = 1.0
    loss: str | None = None
    attack_mode: Literal["eval", "train"] = "eval"
    select_by: Literal["clean", "robust"] = "clean"
    select_attack: Literal["pgd", "fgsm"] = "pgd"
    select_steps: int = 5

    def __post_init__(self) -> None:
        where = "train.adversarial"
        if self.method != "none" and self.method not in ADVERSARIAL_TRAINING:
            message = ADVERSARIAL_TRAINING.unknown_message(self.method)
            raise UserError(f"{where}.method: {message} (or none)")
        plausible = self.method in PLAUSIBLE_TRAINING  # eps in the attack's own terms
        self.eps = check_eps(self.eps, "linf", math.inf if plausible else 1.0, f"{where}.eps")
        if plausible and self.select_by == "robust":
            raise UserError(
                f"{where}.select_by: robust validation attacks with {self.select_attack} at an "
                f"L-inf eps, and {self.method}'s eps is in its own terms; use select_by clean"
            )
        if self.eps == 0 and (self.method != "none" or self.select_by == "robust"):
            raise UserError(f"{where}.eps: must be > 0 for {self.method} / robust selection")
        if self.steps is not None:
            if isinstance(self.steps, bool) or self.steps < 1:
                raise UserError(f"{where}.steps: {self.steps!r} must be an integer >= 1")
            if self.method == "fgsm-rs" and self.steps != 1:
                raise UserError(f"{where}.steps: fgsm-rs takes one step; use pgd for {self.steps}")
        if self.alpha is not None and not self.alpha > 0:
            raise UserError(f"{where}.alpha: {self.alpha!r} must be > 0")
        if self.beta < 0:
            raise UserError(f"{where}.beta: {self.beta!r} must be >= 0")
        if self.warmup < 0:
            raise UserError(f"{where}.warmup: {self.warmup!r} must be >= 0 epochs")
        if not 0 < self.fraction <= 1:
            raise UserError(f"{where}.fraction: {self.fraction!r} must be in (0, 1]")
        if self.loss is not None and self.loss not in LOSSES:
            raise UserError(f"{where}.loss: {LOSSES.unknown_message(self.loss)}")
        for key, valid in (
            ("attack_mode", ("eval", "train")),
            ("select_by", ("clean", "robust")),
            ("select_attack", ("pgd", "fgsm")),
        ):
            if getattr(self, key) not in valid:
                raise UserError(f"{where}.{key}: {getattr(self, key)!r} is not one of {valid}")
        if self.select_steps < 1:
            raise UserError(f"{where}.select_steps: {self.select_steps!r} must be >= 1")

    @property
    def enabled(self) -> bool:
        return self.method != "none"

    @property
    def attack_steps(self) -> int:
        """The attack's steps per training step: 1 for ``fgsm-rs``, else ``steps`` (default 10)."""
        if self.method == "fgsm-rs":
            return 1
        return self.steps or 10

    @property
    def step_size(self) -> float:
        """The attack's step size at full eps."""
        if self.alpha is not None:
            return self.alpha
        if self.method == "fgsm-rs":
            return 1.25 * self.eps
        if self.method == "vaft":
            return 1 / 255
        return 2.5 * self.eps / self.attack_steps


def describe(config: AdversarialConfig) -> str:
    """A one-line label of the defence, e.g. ``pgd eps 0.03, 10 steps of 0.0075``."""
    if not config.enabled:
        text = "none"
    else:
        steps = config.attack_steps
        text = f"{config.method} eps {config.eps:g}, {steps} step{'s' * (steps > 1)} of "
        text += f"{config.step_size:.3g}"
        if config.method == "trades":
            text += f", beta {config.beta:g}"
        if config.method == "vaft":
            text += ", VAFA SSIM >= 0.95"
        if config.loss:
            text += f", attack loss {config.loss}"
        if config.fraction < 1:
            text += f", {config.fraction:g} of each batch"
        if config.warmup:
            text += f", eps warm-up {config.warmup} epoch{'s' * (config.warmup > 1)}"
        if config.attack_mode == "train":
            text += ", attack in train mode"
    if config.select_by == "robust":
        text += f"; best by robust Dice ({config.select_attack} eps {config.eps:g})"
    return text


def trades_divergence(
    clean_logits: Tensor, adv_logits: Tensor, activation: Activation = "sigmoid"
) -> Tensor:
    """Per-sample TRADES divergence ``KL(p_clean || p_adv)``, averaged over pixels, ``(B,)``.

    - ``sigmoid`` (multi-label, one independent decision per class): the KL divergence of the
      pixel's joint prediction, i.e. the sum over classes of Bernoulli KLs
      ``p log(p / q) + (1 - p) log((1 - p) / (1 - q))``.
    - ``softmax``: ``sum_k p_k log(p_k / q_k)`` over the classes.

    Computed from logits with log-sigmoid / log-softmax, so it stays finite for confident models.

    Args:
        clean_logits, adv_logits: ``(B, K, H, W)``.
        activation: how logits become probabilities.
    """
    a, b = clean_logits.float(), adv_logits.float()
    if activation == "softmax":
        log_p, log_q = F.log_softmax(a, dim=1), F.log_softmax(b, dim=1)
        per_pixel = (log_p.exp() * (log_p - log_q)).sum(1)  # (B, H, W)
    else:
        log_p, log_q = F.logsigmoid(a), F.logsigmoid(b)  # log p, log q
        log_p1, log_q1 = F.logsigmoid(-a), F.logsigmoid(-b)  # log (1 - p), log (1 - q)
        kl = log_p.exp() * (log_p - log_q) + log_p1.exp() * (log_p1 - log_q1)  # (B, K, H, W)
        per_pixel = kl.sum(1)  # (B, H, W)
    return per_pixel.flatten(1).mean(1)  # (B,)


class AdversarialTraining:
    """The training loss of one micro-batch, with the attack step when a defence is on.

    Args:
        config: the adversarial training settings.
        model: the model being trained, unwrapped (not its DDP wrapper): the attack runs on it.
        loss_fn: the training loss, mean over the batch (:func:`advseg.losses.create_loss`).
        train_loss: the training loss's registry name (the attack's default objective).
        seed: the training seed; each step's random start is drawn from (seed, epoch, step, rank).
        rank: this process's rank under torchrun.
        activation: the model's (``train.activation``); default: softmax for a softmax loss.
        valid_range: the inputs' range the attacks keep to (slices: ``(0, 1)``; CT volumes: the
            z-scored clip, :attr:`advseg.data.VolumeData.valid_range`; None: unbounded).
    """

    def __init__(
        self,
        config: AdversarialConfig,
        model: nn.Module,
        loss_fn: Loss,
        *,
        train_loss: str,
        seed: int = 0,
        rank: int = 0,
        activation: Activation | None = None,
        valid_range: tuple[float, float] | None = (0.0, 1.0),
    ) -> None:
        self.config = config
        self.model = model
        self.loss_fn = loss_fn
        self.seed, self.rank = seed, rank
        if activation is None:
            activation = "softmax" if train_loss in SOFTMAX_LOSSES else "sigmoid"
        self.activation: Activation = activation
        self.attack: Attack | None = None
        if config.method in PLAUSIBLE_TRAINING:
            self.attack = create_attack(
                config.method,
                model,
                config.loss or train_loss,
                config.eps,
                steps=config.attack_steps,
                alpha=config.step_size,
                activation=self.activation,
                valid_range=valid_range,
            )
        elif config.method == "vaft":
            self.attack = VAFA(
                model, config.loss or train_loss, config.eps, steps=config.attack_steps,
                alpha=config.step_size, activation=self.activation, valid_range=valid_range,
            )  # fmt: skip
        elif config.enabled:
            objective = config.loss or train_loss
            if config.method == "trades" and config.loss is None:
                objective = self._divergence
            self.attack = PGD(
                model,
                objective,
                config.eps,
                steps=config.attack_steps,
                alpha=config.step_size,
                random_start=True,
                activation=self.activation,
                valid_range=valid_range,
            )
        self.validation_attack: Attack | None = None
        if config.select_by == "robust":
            loss = config.loss or train_loss
            if config.select_attack == "fgsm":
                self.validation_attack = FGSM(
                    model, loss, config.eps, seed=seed, activation=activation,
                    valid_range=valid_range,
                )  # fmt: skip
            else:
                self.validation_attack = PGD(
                    model, loss, config.eps, steps=config.select_steps, seed=seed,
                    activation=activation, valid_range=valid_range,
                )  # fmt: skip

    def _divergence(self, logits: Tensor, clean_logits: Tensor) -> Tensor:
        """The TRADES attack objective: ``y`` holds the clean logits, not a mask."""
        return trades_divergence(clean_logits, logits, self.activation)

    def eps_at(self, epoch: int, step: int, steps: int) -> float:
        """The budget at ``step`` (0-based) of ``epoch`` (1-based) with ``steps`` per epoch."""
        warmup = self.config.warmup
        if not warmup:
            return self.config.eps
        progress = (epoch - 1 + (step + 1) / max(steps, 1)) / warmup
        return self.config.eps * min(1.0, progress)

    def loss(
        self, net: nn.Module, x: Tensor, y: Tensor, *, epoch: int, step: int, steps: int
    ) -> Tensor:
        """The micro-batch's training loss (a scalar with a graph to the parameters).

        Args:
            net: the model as trained (possibly DDP-wrapped); the training forward goes through it.
            x: images ``(B, C, H, W)``; y: masks ``(B, K, H, W)``.
            epoch, step, steps: where in training this batch is (eps warm-up, seeding).
        """
        if self.attack is None:
            return self.loss_fn(model_logits(net, x).float(), y)
        count = max(1, round(self.config.fraction * x.shape[0]))  # attacked samples
        eps = self.eps_at(epoch, step, steps)
        generator = torch.Generator(device=x.device).manual_seed(self._step_seed(epoch, step))
        if self.config.method == "trades":
            clean_logits = model_logits(net, x).float()  # (B, K, H, W), training forward
            target = y[:count]
            if self.config.loss is None:  # the divergence is maximised from the clean prediction
                with self._attack_state(), torch.no_grad():
                    target = model_logits(self.model, x[:count]).float()
            x_adv = self.perturb(x[:count], target, eps, generator)
            adv_logits = model_logits(net, x_adv).float()
            divergence = trades_divergence(clean_logits[:count], adv_logits, self.activation)
            return self.loss_fn(clean_logits, y) + self.config.beta * divergence.sum() / len(x)
        if self.config.method == "vaft":
            clean_logits = model_logits(net, x).float()  # (B, K, *S), training forward
            x_adv = self.perturb(x[:count], y[:count], eps, generator)
            adv_logits = model_logits(net, x_adv).float()
            consistency = frequency_consistency(clean_logits[:count], adv_logits)
            return self.loss_fn(clean_logits, y) + self.loss_fn(adv_logits, y[:count]) + consistency
        x_adv = self.perturb(x[:count], y[:count], eps, generator)
        batch = torch.cat([x_adv, x[count:]]) if count < len(x) else x_adv
        head = y[:count]
        truth = self.attack.adversarial_truth(head)  # elastic: the masks moved alike
        if truth is not head:
            y = torch.cat([truth, y[count:]]) if count < len(y) else truth
        return self.loss_fn(model_logits(net, batch).float(), y)

    def perturb(self, x: Tensor, y: Tensor, eps: float, generator: torch.Generator) -> Tensor:
        """Adversarial images ``(B, C, H, W)`` within ``eps`` of ``x`` (VAFA: within its table's
        bound and SSIM bound), parameters frozen."""
        attack = self.attack
        assert attack is not None
        attack.eps = eps
        if isinstance(attack, VAFA):  # the table's range follows eps; its step does not
            attack.q_min = eps / 4
        else:
            attack.alpha = self.config.step_size * eps / self.config.eps
        x, y = x.detach(), y.detach()
        with self._attack_state(), torch.enable_grad():
            x_adv = attack.perturb(x, y, generator)
        return x_adv.detach()

    @contextmanager
    def _attack_state(self) -> Iterator[None]:
        if self.config.attack_mode == "eval":
            with frozen(self.model):
                yield
        else:
            with frozen_in_train_mode(self.model):
                yield

    def _step_seed(self, epoch: int, step: int) -> int:
        sequence = np.random.SeedSequence([self.seed, epoch, step, self.rank])
        return int(sequence.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


@contextmanager
def frozen_in_train_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Parameters frozen, the model's modes untouched, and its buffers restored afterwards.

    BatchNorm in train mode updates its running statistics at every forward; the attack's forwards
    must not, so every buffer (running mean, variance, batch count) is copied before and put back.
    """
    flags = [(param, param.requires_grad) for param in model.parameters()]
    saved = [(buffer, buffer.detach().clone()) for buffer in model.buffers()]
    model.requires_grad_(False)
    try:
        yield model
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)
        for param, flag in flags:
            param.requires_grad_(flag)
