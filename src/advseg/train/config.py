"""Training settings and results: :class:`TrainConfig` (the paper's defaults), the per-epoch
:class:`EpochStats`, :class:`TrainResult`, and the device and precision a config resolves to."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from advseg import distributed
from advseg.augment import AugmentConfig
from advseg.defences.adversarial_training import AdversarialConfig
from advseg.errors import UserError
from advseg.labels import (
    DEFAULT_LOSS,
    check_activation,
)
from advseg.limits import check_seed
from advseg.losses import LOSSES, loss_activation
from advseg.models.zoo import resolve

Precision = Literal["auto", "fp32", "bf16", "fp16"]

#: The paper's batch sizes by name (FACTS.md section 1): its text says 64, its notebook used 16.
PAPER_BATCH_SIZES = {"text": 64, "notebook": 16}


@dataclass
class TrainConfig:
    """Training settings; the defaults are the paper's.

    Attributes:
        model: zoo name of the model (``advseg models``).
        encoder_weights: None, ``"imagenet"`` or a local safetensors file (see the zoo).
        activation: ``sigmoid`` (the paper's: K outputs, multi-label) or ``softmax`` (K + 1
            outputs, background first, one class per pixel; :mod:`advseg.labels`).
        loss: loss name (``advseg.losses``); None (the default) is ``dicefocal`` for sigmoid
            (the paper's) and ``dicece`` for softmax. It must fit the activation.
        epochs: number of epochs (the paper: 15); the cosine schedule spans them.
        batch_size: images per optimiser step on each process, before accumulation: an integer,
            or a name of :data:`PAPER_BATCH_SIZES` (``text``: 64, the paper's text; ``notebook``:
            16, its notebook), resolved to the number on construction (what configs record).
        lr, weight_decay: AdamW settings (the paper: lr 3e-4).
        eta_min: the cosine schedule's final learning rate (the paper: 5e-6).
        patience: stop after this many epochs without a better validation Dice; 0 never stops.
        grad_accum: micro-batches whose gradients are summed per optimiser step.
        precision: ``auto`` is bf16 on a GPU that has it and fp32 elsewhere; ``fp16`` uses a
            gradient scaler; ``bf16`` also works on a CPU.
        channels_last: memory format of images and weights; None means on a GPU only.
        num_workers: DataLoader worker processes.
        seed: seeds shuffling, augmentation and dropout, per epoch.
        device: ``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda``, ``cuda:1``...
        threshold: probability above which a pixel counts as predicted, for validation Dice
            (sigmoid; a softmax prediction is the argmax).
        augment: the augmentation settings (applied by the dataset's transform).
        noise_sigma: Gaussian noise of this standard deviation added to every training image
            (not clipped): the "augmentation" defence, and the training that randomized
            smoothing (``advseg certify --sigma``) expects. 0 adds none.
        tensorboard: also write TensorBoard events (needs the ``tensorboard`` package).
        adversarial: adversarial training (FGSM-RS, PGD, TRADES) and robust checkpoint selection
            (:mod:`advseg.defences.adversarial_training`); off by default.
    """

    model: str = "unet"
    encoder_weights: str | None = None
    activation: str = "sigmoid"
    loss: str | None = None
    epochs: int = 15
    batch_size: int | str = 16
    lr: float = 3e-4
    weight_decay: float = 1e-2
    eta_min: float = 5e-6
    patience: int = 5
    grad_accum: int = 1
    precision: Precision = "auto"
    channels_last: bool | None = None
    num_workers: int = 0
    seed: int = 0
    device: str = "auto"
    threshold: float = 0.5
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    tensorboard: bool = False
    adversarial: AdversarialConfig = field(default_factory=AdversarialConfig)
    noise_sigma: float = 0.0

    def __post_init__(self) -> None:
        check_seed(self.seed, "train.seed")
        if isinstance(self.batch_size, str):
            if self.batch_size not in PAPER_BATCH_SIZES:
                names = ", ".join(f"{k} ({v})" for k, v in PAPER_BATCH_SIZES.items())
                raise UserError(
                    f"train.batch_size: {self.batch_size!r} is no number and no name: {names}"
                )
            self.batch_size = PAPER_BATCH_SIZES[self.batch_size]
        for name in ("epochs", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise UserError(f"train.{name}: {getattr(self, name)} must be >= 1")
        for name in ("patience", "num_workers"):
            if getattr(self, name) < 0:
                raise UserError(f"train.{name}: {getattr(self, name)} must be >= 0")
        if not self.lr > 0:  # also refuses nan (a finite check is config.from_dict's)
            raise UserError(f"train.lr: {self.lr} must be > 0")
        for name in ("eta_min", "weight_decay"):
            if not getattr(self, name) >= 0:
                raise UserError(f"train.{name}: {getattr(self, name)} must be >= 0")
        if not 0 < self.threshold < 1:
            raise UserError(f"train.threshold: {self.threshold} must lie in (0, 1)")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise UserError(f"train.precision: {self.precision!r} is not auto, fp32, bf16, fp16")
        check_activation(self.activation, "train.activation")
        if self.loss is None:
            self.loss = DEFAULT_LOSS[self.activation]
        if self.loss not in LOSSES:
            raise UserError(f"train.loss: {LOSSES.unknown_message(self.loss)}")
        kind = loss_activation(self.loss)
        if kind is not None and kind != self.activation:
            raise UserError(
                f"train.loss: {self.loss!r} is a {kind} loss; train.activation is "
                f"{self.activation} (its losses: {_losses_for(self.activation)})"
            )
        if not 0 <= self.noise_sigma <= 10:
            raise UserError(f"train.noise_sigma: {self.noise_sigma} must be in [0, 10]")
        if self.augment.corruptions:  # names checked (and `all` expanded) before any data is read
            from advseg.corruptions.augment import RandomCorruption, corruption_names  # TorchIO

            self.augment.corruptions = corruption_names(self.augment.corruptions)
            RandomCorruption(
                self.augment.corruptions,
                self.augment.p_corruption,
                self.augment.corruption_severities,
            )
        resolve(self.model)  # an unknown model name fails here, before any data is read


def _losses_for(activation: str) -> str:
    names = [n for n in LOSSES.names() if loss_activation(n) in (activation, None)]
    return ", ".join(names)


@dataclass
class EpochStats:
    """One row of ``log.csv``."""

    epoch: int
    train_loss: float
    val_loss: float
    val_dice: float
    lr: float
    images_per_s: float
    seconds: float
    val_robust_dice: float | None = None  # with train.adversarial.select_by robust


@dataclass
class TrainResult:
    """What a training run achieved, and where it left its files.

    Attributes:
        best_dice, best_epoch: the best validation Dice and its epoch (1-based); with
            ``train.adversarial.select_by: robust``, the best robust validation Dice.
        epochs_run: epochs completed, counting those before a resume.
        stopped_early: True when early stopping ended the run before ``epochs``.
        history: one :class:`EpochStats` per completed epoch.
        best_path, last_path: the checkpoints (without suffix).
        seconds: wall time of this call (not of earlier, interrupted calls).
        data: the data source and split stored in the checkpoints (row counts, exclusions).
    """

    best_dice: float
    best_epoch: int
    epochs_run: int
    stopped_early: bool
    history: list[EpochStats]
    best_path: Path
    last_path: Path
    seconds: float
    data: dict[str, Any] = field(default_factory=dict)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> this rank's GPU when CUDA is available, else the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", distributed.local_rank())
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(
            f"train.device: {name!r} is not a device (auto, cpu, cuda, cuda:N)"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"train.device: {name!r} asked for, but CUDA is not available")
    return device


def resolve_precision(precision: Precision, device: torch.device) -> torch.dtype:
    """The autocast dtype: ``auto`` is bf16 on a GPU that supports it, else fp32."""
    if precision == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
