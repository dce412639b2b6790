"""The training loop: :func:`train` (epochs, validation, checkpoints, early stopping), one
epoch's pass, validation's global Dice, the epoch log."""

from __future__ import annotations

import contextlib
import csv
import io
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from advseg import distributed
from advseg.atomic import remove_debris, write_text_atomic
from advseg.attacks import Attack
from advseg.config import to_dict
from advseg.defences.adversarial_training import AdversarialTraining
from advseg.errors import UserError
from advseg.labels import (
    class_prediction,
    model_target,
    output_channels,
)
from advseg.losses import create_loss, loss_activation
from advseg.models.checkpoint import (
    checkpoint_exists,
    metadata_for,
    save_checkpoint,
)
from advseg.models.zoo import model_spec
from advseg.train.config import (
    EpochStats,
    TrainConfig,
    TrainResult,
    resolve_device,
    resolve_precision,
)
from advseg.train.display import Bar, eta_text, progress_bar, tensorboard_writer
from advseg.train.state import RunState, best_metrics, restore_run


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
    window: tuple[int, ...] | None = None,
    overlap: float = 0.5,
    valid_range: tuple[float, float] | None = (0.0, 1.0),
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
        window: a 3D model's sliding window: ``train_set`` then holds patches and ``val_set``
            whole volumes ``(1, D, H, W)``, validated one at a time through
            :class:`advseg.inference.SlidingWindow` (Gaussian blending, ``overlap``).
        valid_range: the inputs' range the adversarial training's attacks keep to.

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
    if window is not None:  # 5D tensors: channels_last is 4D only
        memory_format = torch.channels_last_3d if channels_last else torch.contiguous_format

    model = model.to(device, memory_format=memory_format)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=config.epochs, eta_min=config.eta_min
    )
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    run = RunState()
    if distributed.is_main():  # temporary files of an earlier, killed run in this directory
        remove_debris(out_dir, recursive=False)
        remove_debris(out_dir / "checkpoints", recursive=False)
    if resume:
        run = restore_run(
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
        rank=distributed.rank(), activation=config.activation, valid_range=valid_range,
    )  # fmt: skip
    meta_fields = {"preprocessing": preprocessing or {}, "data": data or {}}
    writer = tensorboard_writer(out_dir) if config.tensorboard and distributed.is_main() else None
    show = progress and distributed.is_main()

    started, first_epoch = time.monotonic(), run.epoch + 1
    with progress_bar(show) as bar:
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
                net, val_set, config, val_loss_fn, device, dtype, memory_format, bar, epoch,
                window=window, overlap=overlap,
            )  # fmt: skip
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
                f"val Dice (global) {val_dice:.4f}  "
                + ("" if robust_dice is None else f"robust val Dice (global) {robust_dice:.4f}  ")
                + f"lr {lr:.2e}  {stats.images_per_s:.1f} img/s"
                + eta_text(time.monotonic() - started, epoch - first_epoch + 1, epoch, config)
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
                    "best": best_metrics(run),
                    "last": asdict(stats),
                    "train_seconds": sum(s.seconds for s in run.history),  # all epochs
                    "threads": torch.get_num_threads(),  # the CPU threads they were run with
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
                write_log(out_dir / "log.csv", run.history)
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


def _loader(
    dataset: Dataset,
    config: TrainConfig,
    epoch: int,
    shuffle: bool,
    device: torch.device,
    batch_size: int | None = None,
) -> DataLoader:
    generator = torch.Generator().manual_seed(config.seed + epoch)
    sampler = None
    if distributed.is_distributed() and shuffle:
        sampler = DistributedSampler(dataset, shuffle=True, seed=config.seed)
        sampler.set_epoch(epoch)
    return DataLoader(
        dataset,
        batch_size=batch_size or config.batch_size,
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
    return image, mask  # (B, C, S, S), (B, K, S, S); volumes (B, C, D, H, W)


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
    bar: Bar,
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
    bar: Bar,
    epoch: int,
    attack: Attack | None = None,
    window: tuple[int, ...] | None = None,
    overlap: float = 0.5,
) -> tuple[float, float]:
    """Mean loss and global Dice over the whole validation set (every rank's share summed).

    With ``attack``, of the validation images attacked (robust validation Dice). With
    ``window``, the items are whole volumes, predicted one at a time by a sliding window over
    the unwrapped model (no DDP synchronisation: ranks hold different volumes).
    """
    # the attack, if any, takes its own gradients; inference mode would forbid them
    with torch.no_grad(), torch.inference_mode(attack is None):
        net.eval()
        rows = distributed.shard(list(range(len(dataset))))
        loader = _loader(
            Subset(dataset, rows), config, epoch, shuffle=False, device=device,
            batch_size=None if window is None else 1,
        )  # fmt: skip
        predict = net
        if window is not None:
            from advseg.inference import SlidingWindow

            bare = net.module if isinstance(net, DistributedDataParallel) else net
            predict = SlidingWindow(bare, window, overlap=overlap, memory="graph")
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
                logits = predict(image).float()  # (B, K, S, S); softmax (B, K + 1, S, S)
            loss_sum += loss_fn(logits, target).double()
            predicted = class_prediction(logits, config.activation, config.threshold)  # (B, K, ...)
            truth = mask > 0.5
            dims = (0, *range(2, truth.ndim))  # all but the class axis: slices or volumes
            batch_counts = torch.stack(
                [
                    (predicted & truth).sum(dims),
                    (predicted & ~truth).sum(dims),
                    (~predicted & truth).sum(dims),
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


def write_log(path: Path, history: list[EpochStats]) -> None:
    buffer = io.StringIO()
    fields = list(EpochStats.__dataclass_fields__)
    writer = csv.DictWriter(buffer, fieldnames=fields)
    writer.writeheader()
    for stats in history:
        writer.writerow({k: _round(v) for k, v in asdict(stats).items()})
    write_text_atomic(path, buffer.getvalue())


def _round(value: float | int | None) -> float | int | None:
    return value if value is None or isinstance(value, int) else float(f"{value:.6g}")
