"""Resuming a run: the state beside the model (epoch, best Dice, history) and the checks that a
resumed run is the run that was interrupted (same model, classes, settings, data)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from advseg.config import to_dict
from advseg.errors import UserError
from advseg.models.checkpoint import (
    check_compatible,
    checkpoint_exists,
    load_weights,
    read_checkpoint,
)
from advseg.models.zoo import model_spec
from advseg.train.config import EpochStats, TrainConfig

# Settings that may change when a run is resumed: they change speed, not the numbers.
RESUMABLE_CHANGES = {"num_workers", "device", "tensorboard"}


@dataclass
class RunState:
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


def best_metrics(run: RunState) -> dict[str, Any]:
    best = next(s for s in run.history if s.epoch == run.best_epoch)
    return asdict(best)


def restore_run(
    last_path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    config: TrainConfig,
    classes: list[str],
    data: dict[str, Any] | None,
    preprocessing: dict[str, Any] | None = None,
) -> RunState:
    from advseg.data.preprocess import saved_preprocess

    if not checkpoint_exists(last_path):
        raise UserError(f"{last_path}.json: nothing to resume (no last checkpoint)")
    weights, meta, state = read_checkpoint(last_path)

    spec = model_spec(model)
    check_compatible(meta, last_path, spec.name, spec.in_channels, classes)
    saved, now = meta.train, to_dict(config)
    defaults = to_dict(TrainConfig())  # a key newer than the checkpoint had its default value
    changed = sorted(
        k for k in now if k not in RESUMABLE_CHANGES and saved.get(k, defaults[k]) != now[k]
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
            f"{saved_data}, now {data_now}: files replaced, edited or copied anew, or "
            "preprocessed by an advseg whose cache version differs); restore the "
            "data or train in a new directory"
        )
    saved_split, split_now = meta.data.get("split"), (data or {}).get("split")
    if saved_split and split_now and saved_split != split_now:
        raise UserError(
            f"{last_path}.json: the data gives another split than this run trained on (test "
            f"cases {saved_split['cases']['test']}, now {split_now['cases']['test']}); restore "
            "the data or train in a new directory"
        )
    load_weights(model, weights, last_path)
    try:
        optimizer.load_state_dict(state["optimizer"])
        check_optimizer_state(optimizer, last_path)
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        return RunState(
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


def check_optimizer_state(optimizer: torch.optim.Optimizer, last_path: Path) -> None:
    """Refuse an optimiser state whose per-parameter tensors (AdamW's ``exp_avg``,
    ``exp_avg_sq``; SGD's ``momentum_buffer``) do not have their parameter's shape, or hold NaN
    or inf: ``load_state_dict`` checks neither, and the first step ended in a traceback."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for i, param in enumerate(params):
        for key, value in optimizer.state.get(param, {}).items():
            if not torch.is_tensor(value) or value.dim() == 0:  # ``step``: a count
                continue
            where = f"{last_path}.json: training_state optimizer.state.{i}.{key}"
            if value.shape != param.shape:
                raise UserError(
                    f"{where} has shape {tuple(value.shape)}, its parameter "
                    f"{tuple(param.shape)}: the state belongs to another model; train anew"
                )
            if not torch.isfinite(value).all():
                raise UserError(f"{where} holds NaN or inf; train anew")
