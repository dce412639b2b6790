"""The training loop, as in the paper, on one process or many (torchrun).

Paper settings (FACTS.md §1): AdamW (lr 3e-4), cosine annealing to eta_min 5e-6 over the epochs,
15 epochs, early stopping on validation Dice, Dice + Focal loss, augmentation of image and mask
together (:mod:`advseg.augment`). On top: mixed precision (bf16, or fp16 with a gradient scaler)
and channels_last on a GPU, gradient accumulation, DataLoader workers, seeding per epoch (so a
resumed run repeats the draws of an uninterrupted one), DistributedDataParallel under torchrun.

A run directory holds ``checkpoints/best`` and ``checkpoints/last``
(:mod:`advseg.models.checkpoint`: safetensors + JSON, written atomically; ``last`` also holds the
optimiser, scheduler and scaler states for ``resume``), ``log.csv`` (one row per epoch) and,
optionally, TensorBoard events. Only rank 0 writes.

Validation Dice is the "global" protocol: per class, ``2 TP / (2 TP + FP + FN)`` with TP, FP, FN
summed over every validation pixel, then the mean over classes present in the labels or the
predictions. It needs no per-slice convention for empty masks and never is NaN. The prediction is
evaluation's (:func:`advseg.labels.class_prediction`: sigmoid > threshold, or the softmax argmax
without its background channel), scored against the multi-label masks.

``train.activation: softmax`` trains a model of K + 1 outputs (background first) on the masks
made a partition (:func:`advseg.labels.softmax_target`: an overlapping pixel takes the first of
its classes), with a softmax loss (``dicece`` by default, or ``ce``).
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from advseg import distributed
from advseg.atomic import remove_debris, write_text_atomic
from advseg.attacks import Attack
from advseg.augment import Augment, AugmentConfig
from advseg.config import to_dict
from advseg.data import DataConfig, SliceData
from advseg.defences.adversarial_training import AdversarialConfig, AdversarialTraining
from advseg.errors import UserError
from advseg.labels import (
    DEFAULT_LOSS,
    check_activation,
    class_prediction,
    model_target,
    output_channels,
    overlap_pixels,
)
from advseg.losses import LOSSES, create_loss, loss_activation
from advseg.models.checkpoint import (
    check_compatible,
    checkpoint_exists,
    load_weights,
    metadata_for,
    read_checkpoint,
    save_checkpoint,
)
from advseg.models.zoo import create_model, model_spec, resolve
from advseg.progress import IntervalLines, clock_text

Precision = Literal["auto", "fp32", "bf16", "fp16"]

#: The paper's batch sizes by name (FACTS.md section 1): its text says 64, its notebook used 16.
PAPER_BATCH_SIZES = {"text": 64, "notebook": 16}

# Settings that may change when a run is resumed: they change speed, not the numbers.
_RESUMABLE_CHANGES = {"num_workers", "device", "tensorboard"}


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


def train(
    model: nn.Module,
    train_set: Dataset,
    val_set: Dataset,
    config: TrainConfig,
    out_dir: str | Path,
    *,
    classes: list[str],
    preprocessing: dict[str, Any] | None = None,
    data: dict[str, Any] | None = None,
    resume: bool = False,
    progress: bool = False,
) -> TrainResult:
    """Train ``model`` and write its checkpoints and log to ``out_dir``.

    Under torchrun (see :mod:`advseg.distributed`) every rank calls this with the same arguments:
    the model is wrapped in DistributedDataParallel, each rank trains on its share of
    ``train_set`` and validates on its share of ``val_set``, and rank 0 writes the files.

    Args:
        model: a zoo model (:func:`advseg.models.create_model`) named ``config.model``.
        train_set: items ``{"image": (C, S, S), "mask": (K, S, S), ...}``, augmented by the
            dataset's own transform (:class:`advseg.augment.Augment`).
        val_set: items of the same form, not augmented.
        config: the training settings.
        out_dir: the run directory.
        classes: class names in output-channel order (stored in the checkpoints).
        preprocessing, data: the data layer's preprocessing config and source/split, stored in
            the checkpoints so an evaluation prepares images the same way.
        resume: continue the run in ``out_dir`` from ``checkpoints/last``.
        progress: show rich progress bars (rank 0 only).

    Returns:
        The best and last metrics, the history and the checkpoint paths.
    """
    start = time.perf_counter()
    spec = model_spec(model)
    if spec.name != config.model:
        raise UserError(f"train.model is {config.model!r} but the model given is {spec.name!r}")
    if spec.classes != output_channels(len(classes), config.activation):
        raise UserError(
            f"train.activation {config.activation}: {len(classes)} classes need "
            f"{output_channels(len(classes), config.activation)} outputs, the model has "
            f"{spec.classes}"
        )
    if len(train_set) == 0:
        raise UserError("training split is empty: no slices to train on")
    if len(val_set) == 0:
        raise UserError("validation split is empty: early stopping needs validation slices")
    out_dir = Path(out_dir)
    best_path, last_path = out_dir / "checkpoints" / "best", out_dir / "checkpoints" / "last"
    device = resolve_device(config.device)
    dtype = resolve_precision(config.precision, device)
    channels_last = device.type == "cuda" if config.channels_last is None else config.channels_last
    memory_format = torch.channels_last if channels_last else torch.contiguous_format

    model = model.to(device, memory_format=memory_format)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=config.epochs, eta_min=config.eta_min
    )
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    run = _RunState()
    if distributed.is_main():  # temporary files of an earlier, killed run in this directory
        remove_debris(out_dir, recursive=False)
        remove_debris(out_dir / "checkpoints", recursive=False)
    if resume:
        run = _restore(
            last_path, model, optimizer, scheduler, scaler, config, classes, data, preprocessing
        )
    elif checkpoint_exists(last_path):
        raise UserError(f"{out_dir}: already holds a run; resume it or choose another directory")
    distributed.barrier()  # no rank starts before every rank has read the checkpoint

    net: nn.Module = model
    if distributed.is_distributed():
        net = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    both = {"activation": config.activation} if loss_activation(config.loss) is None else {}
    loss_fn = create_loss(config.loss, **both)
    val_loss_fn = create_loss(config.loss, reduction="sum", **both)
    defence = AdversarialTraining(
        config.adversarial, model, loss_fn, train_loss=config.loss, seed=config.seed,
        rank=distributed.rank(), activation=config.activation,
    )  # fmt: skip
    meta_fields = {"preprocessing": preprocessing or {}, "data": data or {}}
    writer = _tensorboard(out_dir) if config.tensorboard and distributed.is_main() else None
    show = progress and distributed.is_main()

    started, first_epoch = time.monotonic(), run.epoch + 1
    with _progress(show) as bar:
        for epoch in range(run.epoch + 1, config.epochs + 1):
            if run.stopped_early:
                break
            torch.manual_seed(config.seed + 10_000 * epoch + distributed.rank())
            lr = optimizer.param_groups[0]["lr"]
            train_loss, images, train_seconds = _train_epoch(
                net, train_set, config, epoch, optimizer, scaler, defence, device, dtype,
                memory_format, bar,
            )  # fmt: skip
            scheduler.step()
            val_loss, val_dice = _validate(
                net, val_set, config, val_loss_fn, device, dtype, memory_format, bar, epoch
            )
            if not (math.isfinite(train_loss) and math.isfinite(val_loss)):
                raise UserError(  # before this epoch's checkpoints: the last saved ones stay good
                    f"epoch {epoch}: the loss is no longer a finite number (train {train_loss}, "
                    f"validation {val_loss}); training stopped. Lower train.lr, or check the "
                    "data for NaN or inf values"
                )
            robust_dice = None
            if defence.validation_attack is not None:  # Rice et al. 2020: select on robust Dice
                _, robust_dice = _validate(
                    net, val_set, config, val_loss_fn, device, dtype, memory_format, bar, epoch,
                    attack=defence.validation_attack,
                )  # fmt: skip
            stats = EpochStats(
                epoch=epoch,
                train_loss=train_loss,
                val_loss=val_loss,
                val_dice=val_dice,
                lr=lr,
                images_per_s=images / max(train_seconds, 1e-9),
                seconds=train_seconds,
                val_robust_dice=robust_dice,
            )
            run.history.append(stats)
            bar.epoch_done(
                f"epoch {epoch}: train loss {train_loss:.4f}  val loss {val_loss:.4f}  "
                f"val Dice {val_dice:.4f}  "
                + ("" if robust_dice is None else f"robust val Dice {robust_dice:.4f}  ")
                + f"lr {lr:.2e}  {stats.images_per_s:.1f} img/s"
                + _eta_text(time.monotonic() - started, epoch - first_epoch + 1, epoch, config)
            )
            run.epoch = epoch
            score = val_dice if robust_dice is None else robust_dice  # what "best" means
            improved = score > run.best_dice
            if improved:
                run.best_dice, run.best_epoch = score, epoch
            if config.patience and epoch - run.best_epoch >= config.patience:
                run.stopped_early = epoch < config.epochs
            if distributed.is_main():
                metrics = {
                    "best": _best_metrics(run),
                    "last": asdict(stats),
                    "train_seconds": sum(s.seconds for s in run.history),  # all epochs
                }
                meta = metadata_for(
                    model, classes, config.activation, **meta_fields, train=to_dict(config),
                    metrics=metrics,
                )  # fmt: skip
                meta.epoch = epoch
                if improved:  # best before last: a crash in between is redone on resume
                    save_checkpoint(best_path, model, meta)
                state = run.training_state(optimizer, scheduler, scaler)
                save_checkpoint(last_path, model, meta, training_state=state)
                _write_log(out_dir / "log.csv", run.history)
                if writer is not None:
                    for key, value in asdict(stats).items():
                        writer.add_scalar(key, value, epoch)
            distributed.barrier()
    if writer is not None:
        writer.close()
    return TrainResult(
        best_dice=run.best_dice,
        best_epoch=run.best_epoch,
        epochs_run=run.epoch,
        stopped_early=run.stopped_early,
        history=run.history,
        best_path=best_path,
        last_path=last_path,
        seconds=time.perf_counter() - start,
        data=data or {},
    )


def new_model(
    config: TrainConfig, in_channels: int, classes: int, encoder_weights: str | None = None
) -> nn.Module:
    """``config.model`` initialised from ``config.seed``: the same config, the same start.

    ``classes`` is the data's class count; a softmax model gets one output more (background).
    """
    torch.manual_seed(config.seed)
    outputs = output_channels(classes, config.activation)  # softmax: a background channel first
    return create_model(
        config.model, in_channels=in_channels, classes=outputs, encoder_weights=encoder_weights
    )


def data_metadata(
    data_config: DataConfig,
    data: SliceData,
    *,
    test_fraction: float,
    val_fraction: float,
    split_seed: int,
    rows: dict[str, int],
) -> dict[str, Any]:
    """What a checkpoint records of its data, so that an evaluation finds the same test cases.

    ``config`` is the whole :class:`DataConfig` (source, exclusions, label mapping, cache) with
    its paths resolved (absolute; ``synthetic`` for the phantom), the split is
    ``split_train_val_test(index, test_fraction, val_fraction, split_seed)``.
    """
    from advseg.data import resolved_config

    return {
        "config": to_dict(resolved_config(data_config)),
        "fingerprint": data.cache_path.name,  # advseg.preflight.data_fingerprint
        "excluded": data.exclusions.lines(),
        "test_fraction": test_fraction,
        "val_fraction": val_fraction,
        "split_seed": split_seed,
        "rows": rows,
    }


def train_on_data(
    data_config: DataConfig,
    config: TrainConfig,
    out_dir: str | Path,
    *,
    test_fraction: float = 0.1,
    val_fraction: float = 0.1,
    split_seed: int = 0,
    resume: bool = False,
    progress: bool = False,
    data: SliceData | None = None,
) -> TrainResult:
    """Load a data set, split it by case, build ``config.model`` and :func:`train` it.

    The one way a model is trained from a data set: ``advseg train`` and the experiment runner
    (``advseg run``) both come here, so a grid's model is the model ``advseg train`` makes with
    the same settings, weight for weight.

    The split is the paper's: ``test_fraction`` of the cases held out for evaluation (the same
    ``split_cases(index, test_fraction, split_seed)`` an evaluation calls), then ``val_fraction``
    of the remaining cases for validation (early stopping); no case is on two sides. The data
    source, exclusions, split and row counts are stored in the checkpoints.

    Under torchrun, rank 0 fills the preprocessing cache before the other ranks read it.

    Args:
        data: ``data_config`` already loaded (the experiment runner's); loaded here when None.
    """
    from advseg.atomic import check_output_dir
    from advseg.data import load_data, split_train_val_test

    for name, value in (("test_fraction", test_fraction), ("val_fraction", val_fraction)):
        if not 0 < value < 1:  # also nan
            raise UserError(f"{name}: {value} must lie in (0, 1)")
    if isinstance(split_seed, bool) or not isinstance(split_seed, int):
        raise UserError(f"split_seed: expected an integer, got {split_seed!r}")
    resolve_device(config.device)  # an unknown device fails before any data is read
    check_output_dir(out_dir, "training output directory")
    distributed.init()
    if data is None:
        if not distributed.is_main():
            distributed.barrier()  # rank 0 fills the cache first
        data = load_data(data_config)
        if distributed.is_main():
            distributed.barrier()
    train_rows, val_rows, test_rows = split_train_val_test(
        data.index, test_fraction, val_fraction, split_seed
    )
    image_size = data_config.preprocess.size
    train_set = data.dataset(train_rows, transform=Augment(config.augment, image_size))
    val_set = data.dataset(val_rows)
    model = new_model(
        config,
        in_channels=data_config.preprocess.channels,
        classes=len(data.classes),
        encoder_weights=None if resume else config.encoder_weights,
    )
    source = data_metadata(
        data_config,
        data,
        test_fraction=test_fraction,
        val_fraction=val_fraction,
        split_seed=split_seed,
        rows={"train": len(train_rows), "val": len(val_rows), "test": len(test_rows)},
    )
    if config.activation == "softmax":  # said, not silently relabelled
        source["overlap"] = {
            "pixels": overlapping_pixels(data.masks, train_rows),
            "labelled": "the first of its classes in the class order",
        }
    if resume:  # a run begun before data paths were resolved keeps the fingerprint it saved
        source["fingerprint"] = _resumed_fingerprint(Path(out_dir), data, source["fingerprint"])
    result = train(
        model,
        train_set,
        val_set,
        config,
        out_dir,
        classes=list(data.classes),
        preprocessing=to_dict(data_config.preprocess),
        data=source,
        resume=resume,
        progress=progress,
    )
    result.data = source
    return result


def overlapping_pixels(masks: Any, rows: Any, chunk: int = 256) -> int:
    """Pixels of ``masks[rows]`` (``(N, K, S, S)``, memory-mapped) in more than one class, read
    ``chunk`` slices at a time: what a softmax training labels with one class of several."""
    rows = list(rows)
    return sum(
        overlap_pixels(torch.from_numpy(masks[rows[i : i + chunk]]))
        for i in range(0, len(rows), chunk)
    )


def _resumed_fingerprint(out_dir: Path, data: SliceData, now: str) -> str:
    """The data fingerprint a resumed run goes on with: the one its last checkpoint saved when
    that names the same data (:func:`advseg.preflight.same_data`), else ``now`` (which
    :func:`_restore` then refuses, if the checkpoint saved another)."""
    from advseg.models.checkpoint import read_metadata
    from advseg.preflight import same_data

    last = out_dir / "checkpoints" / "last"
    if not checkpoint_exists(last):
        return now
    saved = read_metadata(last).data.get("fingerprint")
    return saved if isinstance(saved, str) and saved != now and same_data(saved, data) else now


@dataclass
class _RunState:
    """What a resumed run needs besides the model, optimiser, scheduler and scaler."""

    epoch: int = 0
    best_dice: float = -1.0
    best_epoch: int = 0
    stopped_early: bool = False
    history: list[EpochStats] = field(default_factory=list)

    def training_state(self, optimizer, scheduler, scaler) -> dict[str, Any]:
        return {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "epoch": self.epoch,
            "best_dice": self.best_dice,
            "best_epoch": self.best_epoch,
            "stopped_early": self.stopped_early,
            "history": [asdict(s) for s in self.history],
        }


def _best_metrics(run: _RunState) -> dict[str, Any]:
    best = next(s for s in run.history if s.epoch == run.best_epoch)
    return asdict(best)


def _restore(
    last_path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    config: TrainConfig,
    classes: list[str],
    data: dict[str, Any] | None,
    preprocessing: dict[str, Any] | None = None,
) -> _RunState:
    from advseg.data.preprocess import saved_preprocess

    if not checkpoint_exists(last_path):
        raise UserError(f"{last_path}.json: nothing to resume (no last checkpoint)")
    weights, meta, state = read_checkpoint(last_path)

    spec = model_spec(model)
    check_compatible(meta, last_path, spec.name, spec.in_channels, classes)
    saved, now = meta.train, to_dict(config)
    defaults = to_dict(TrainConfig())  # a key newer than the checkpoint had its default value
    changed = sorted(
        k for k in now if k not in _RESUMABLE_CHANGES and saved.get(k, defaults[k]) != now[k]
    )
    if changed:
        first = changed[0]
        raise UserError(
            f"{last_path}.json: cannot resume with another train config "
            f"({', '.join(changed)} differ; e.g. {first}: {saved.get(first)!r} -> {now[first]!r})"
        )
    if state is None:
        raise UserError(f"{last_path}: holds no training state to resume from")
    saved_data, data_now = meta.data.get("fingerprint"), (data or {}).get("fingerprint")
    if saved_data and data_now and saved_data != data_now:
        was = saved_preprocess(meta.preprocessing, f"{last_path}.json preprocessing").resize
        now_resize = (preprocessing or {}).get("resize", was)
        if was != now_resize:  # non-square slices (square ones give one fingerprint)
            raise UserError(
                f"{last_path}.json: this run trained on slices resized with '{was}', not "
                f"'{now_resize}'; resume with --resize {was} (data.preprocess.resize)"
            )
        raise UserError(
            f"{last_path}.json: the data changed since this run trained on it (fingerprint "
            f"{saved_data}, now {data_now}: files replaced, edited or copied anew); restore the "
            "data or train in a new directory"
        )
    load_weights(model, weights, last_path)
    try:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        return _RunState(
            epoch=int(state["epoch"]),
            best_dice=float(state["best_dice"]),
            best_epoch=int(state["best_epoch"]),
            stopped_early=bool(state["stopped_early"]),
            history=[EpochStats(**row) for row in state["history"]],
        )
    except (KeyError, TypeError, ValueError) as err:
        raise UserError(
            f"{last_path}.json: training_state is damaged ({type(err).__name__}: {err})"
        ) from None


def _loader(
    dataset: Dataset, config: TrainConfig, epoch: int, shuffle: bool, device: torch.device
) -> DataLoader:
    generator = torch.Generator().manual_seed(config.seed + epoch)
    sampler = None
    if distributed.is_distributed() and shuffle:
        sampler = DistributedSampler(dataset, shuffle=True, seed=config.seed)
        sampler.set_epoch(epoch)
    return DataLoader(
        dataset,
        batch_size=config.batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        num_workers=config.num_workers,
        generator=generator,
        pin_memory=device.type == "cuda",
    )


def _to_device(
    batch: dict[str, Tensor], device: torch.device, memory_format: torch.memory_format
) -> tuple[Tensor, Tensor]:
    image = batch["image"].to(device, non_blocking=True).contiguous(memory_format=memory_format)
    mask = batch["mask"].to(device, non_blocking=True)
    return image, mask  # (B, C, S, S), (B, K, S, S)


def _train_epoch(
    net: nn.Module,
    dataset: Dataset,
    config: TrainConfig,
    epoch: int,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    defence: AdversarialTraining,
    device: torch.device,
    dtype: torch.dtype,
    memory_format: torch.memory_format,
    bar: _Bar,
) -> tuple[float, int, float]:
    """One pass over this rank's share; returns (mean loss, images seen by all ranks, seconds)."""
    net.train()
    loader = _loader(dataset, config, epoch, shuffle=True, device=device)
    steps = len(loader)
    bar.start(f"epoch {epoch}/{config.epochs} train", steps)
    total_loss, images = torch.zeros((), device=device), 0
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    for step, batch in enumerate(loader):
        image, mask = _to_device(batch, device, memory_format)
        mask = model_target(mask, config.activation)  # softmax: one-hot with background
        if config.noise_sigma > 0:  # Gaussian augmentation; draws follow the epoch's seed
            image = image + config.noise_sigma * torch.randn_like(image)
        boundary = (step + 1) % config.grad_accum == 0 or step + 1 == steps
        sync = (
            contextlib.nullcontext() if boundary or not hasattr(net, "no_sync") else net.no_sync()
        )
        with sync:
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                # loss(net(image), mask), or with the adversarial training's attack step
                loss = defence.loss(net, image, mask, epoch=epoch, step=step, steps=steps)
            scaler.scale(loss / config.grad_accum).backward()
        if boundary:
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
        total_loss += loss.detach() * image.shape[0]
        images += image.shape[0]
        seconds = time.perf_counter() - start
        bar.advance(
            loss=(total_loss / images).item() if step % 10 == 0 or step + 1 == steps else None,
            lr=optimizer.param_groups[0]["lr"],
            images_per_s=images * distributed.world_size() / max(seconds, 1e-9),
        )
    seconds = time.perf_counter() - start
    counts = distributed.all_reduce_sum(
        torch.stack([total_loss.float(), torch.tensor(float(images), device=device)])
    )
    return (counts[0] / counts[1].clamp(min=1)).item(), int(counts[1].item()), seconds


def _validate(
    net: nn.Module,
    dataset: Dataset,
    config: TrainConfig,
    loss_fn: nn.Module,
    device: torch.device,
    dtype: torch.dtype,
    memory_format: torch.memory_format,
    bar: _Bar,
    epoch: int,
    attack: Attack | None = None,
) -> tuple[float, float]:
    """Mean loss and global Dice over the whole validation set (every rank's share summed).

    With ``attack``, of the validation images attacked (robust validation Dice).
    """
    with torch.inference_mode() if attack is None else torch.no_grad():
        return _validate_pass(
            net, dataset, config, loss_fn, device, dtype, memory_format, bar, epoch, attack
        )


def _validate_pass(
    net: nn.Module,
    dataset: Dataset,
    config: TrainConfig,
    loss_fn: nn.Module,
    device: torch.device,
    dtype: torch.dtype,
    memory_format: torch.memory_format,
    bar: _Bar,
    epoch: int,
    attack: Attack | None,
) -> tuple[float, float]:
    net.eval()
    rows = distributed.shard(list(range(len(dataset))))
    loader = _loader(Subset(dataset, rows), config, epoch, shuffle=False, device=device)
    what = "val" if attack is None else "robust val"
    bar.start(f"epoch {epoch}/{config.epochs} {what}", len(loader))
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    counts = None  # (3, K): TP, FP, FN per class
    for batch in loader:
        image, mask = _to_device(batch, device, memory_format)
        target = model_target(mask, config.activation)  # what the loss and the attack take
        if attack is not None:  # the attack runs on the unwrapped model, in eval mode
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                image = attack(image, target)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            logits = net(image).float()  # (B, K, S, S); softmax (B, K + 1, S, S)
        loss_sum += loss_fn(logits, target).double()
        predicted = class_prediction(logits, config.activation, config.threshold)  # (B, K, ...)
        truth = mask > 0.5
        batch_counts = torch.stack(
            [
                (predicted & truth).sum((0, 2, 3)),
                (predicted & ~truth).sum((0, 2, 3)),
                (~predicted & truth).sum((0, 2, 3)),
            ]
        ).double()  # (3, K)
        counts = batch_counts if counts is None else counts + batch_counts
        bar.advance()
    if counts is None:  # this rank's shard is empty (fewer validation slices than ranks)
        classes = model_spec(net).classes - (config.activation == "softmax")  # no background
        counts = torch.zeros(3, classes, device=device, dtype=torch.float64)
    totals = distributed.all_reduce_sum(torch.cat([loss_sum.view(1), counts.flatten()]))
    loss = (totals[0] / len(dataset)).item()
    return loss, global_dice(totals[1:].view(3, -1))


def global_dice(counts: Tensor) -> float:
    """Mean over classes of ``2 TP / (2 TP + FP + FN)`` from summed counts ``(3, K)``.

    Classes with no positive pixel in labels or predictions are left out of the mean; when no
    class has any, the prediction is perfect and the Dice is 1.
    """
    tp, fp, fn = counts
    denominator = 2 * tp + fp + fn
    present = denominator > 0
    if not present.any():
        return 1.0
    return (2 * tp[present] / denominator[present]).mean().item()


def _write_log(path: Path, history: list[EpochStats]) -> None:
    buffer = io.StringIO()
    fields = list(EpochStats.__dataclass_fields__)
    writer = csv.DictWriter(buffer, fieldnames=fields)
    writer.writeheader()
    for stats in history:
        writer.writerow({k: _round(v) for k, v in asdict(stats).items()})
    write_text_atomic(path, buffer.getvalue())


def _round(value: float | int | None) -> float | int | None:
    return value if value is None or isinstance(value, int) else float(f"{value:.6g}")


def _tensorboard(out_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError(
            "train.tensorboard: the tensorboard package is not installed (pip install tensorboard)"
        ) from None
    return SummaryWriter(str(out_dir / "tensorboard"))


def _eta_text(elapsed: float, epochs_done: int, epoch: int, config: TrainConfig) -> str:
    """``  ETA 0:12:30`` for the epochs left at this run's pace (an upper bound: early stopping)."""
    left = config.epochs - epoch
    if left <= 0:
        return ""
    return f"  ETA {clock_text(elapsed / epochs_done * left)} ({left} epochs left at most)"


class _Bar:
    """A rich progress bar with loss, learning rate and images/s, or nothing at all."""

    def __init__(self, progress=None) -> None:
        self.progress = progress
        self.task = None
        self.fields: dict[str, str] = {}
        self.done = 0
        self.lines: IntervalLines | None = None  # output that is no terminal: a line at intervals

    def start(self, description: str, total: int) -> None:
        if self.progress is None:
            return
        if self.task is not None:
            self.progress.update(self.task, visible=False)
        self.fields = {"stats": ""}
        self.task = self.progress.add_task(description, total=total, stats="")
        self.done = 0
        if not self.progress.console.is_terminal:
            self.lines = IntervalLines(self.epoch_done, description, total)

    def advance(self, loss: float | None = None, **values: float) -> None:
        if self.progress is None:
            return
        parts = [] if loss is None else [f"loss {loss:.4f}"]
        parts += [f"lr {values['lr']:.2e}"] if "lr" in values else []
        parts += [f"{values['images_per_s']:.1f} img/s"] if "images_per_s" in values else []
        if parts:
            self.fields["stats"] = "  ".join(parts)
        self.progress.update(self.task, advance=1, stats=self.fields["stats"])
        self.done += 1
        if self.lines is not None:
            self.lines.update(self.done, extra=self.fields["stats"])

    def epoch_done(self, text: str) -> None:
        if self.progress is not None:
            self.progress.console.print(text, highlight=False, soft_wrap=True)


@contextlib.contextmanager
def _progress(show: bool) -> Iterator[_Bar]:
    if not show:
        yield _Bar()
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[stats]}"),
    )
    with Progress(*columns) as progress:
        yield _Bar(progress)
