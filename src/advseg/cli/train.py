"""``advseg train``: train a zoo model on a data set, as in the paper, on one process or many."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.table import Table

from advseg import catalogue
from advseg.cli.console import console
from advseg.cli.data import (
    CACHE_HELP,
    DATA_HELP,
    LABELS_HELP,
    RESIZE_HELP,
    STRICT_HELP,
    label_settings,
    no_data,
)
from advseg.cli.flags import flag_of, options_named, seed_flag
from advseg.config import from_dict, load_yaml, to_dict
from advseg.errors import UserError
from advseg.threads import THREADS_HELP

if TYPE_CHECKING:
    from advseg.train import TrainConfig

_FLAGS = {
    "num_workers": "--workers",
    "adversarial.method": "--adv-train",
    "adversarial.select_by": "--select-by",
    "adversarial.select_attack": "--select-attack",
    "adversarial.select_steps": "--select-steps",
}
"""Settings whose option is not ``--key`` (``adversarial.eps`` is ``--adv-eps``)."""


def train(
    out: Path = typer.Option(..., "--out", help="Run directory (checkpoints, log.csv)."),
    data: str | None = typer.Option(None, "--data", help=DATA_HELP),
    cache_dir: Path | None = typer.Option(None, "--cache-dir", help=CACHE_HELP),
    labels: str | None = typer.Option(None, "--labels", help=LABELS_HELP),
    strict_labels: bool = typer.Option(False, "--strict-labels", help=STRICT_HELP),
    config: Path | None = typer.Option(
        None,
        "--config",
        help="YAML file of training settings (TrainConfig keys; default: none, the defaults "
        "named here). Options given here override it.",
    ),
    model: str | None = typer.Option(
        None, "--model", help="Zoo name (see `advseg models`; default unet)."
    ),
    encoder_weights: str | None = typer.Option(
        None,
        "--encoder-weights",
        help="'imagenet' (downloaded, needs internet) or a local safetensors file of encoder "
        "weights (e.g. model.safetensors of the smp-hub/<encoder>.imagenet repository; nothing "
        "is downloaded). Default: none, random initialisation.",
    ),
    activation: str | None = typer.Option(
        None,
        "--activation",
        help="sigmoid (the paper's: one output per class, multi-label) or softmax (a background "
        "output first, one class per pixel; overlapping pixels take the first of their classes). "
        "Default: sigmoid.",
    ),
    loss: str | None = typer.Option(
        None, "--loss", help="Training loss (default: dicefocal for sigmoid, dicece for softmax)."
    ),
    epochs: int | None = typer.Option(None, "--epochs", help="Epochs (default 15)."),
    batch_size: str | None = typer.Option(
        None,
        "--batch-size",
        help="Images per step per rank, a number or the paper's names: text (64, the paper's "
        "text), notebook (16, its notebook) (default 16).",
    ),
    lr: float | None = typer.Option(None, "--lr", help="AdamW learning rate (default 3e-4)."),
    weight_decay: float | None = typer.Option(
        None, "--weight-decay", help="AdamW weight decay (default 1e-2)."
    ),
    patience: int | None = typer.Option(
        None, "--patience", help="Early stopping patience in epochs (default 5); 0 never stops."
    ),
    grad_accum: int | None = typer.Option(
        None, "--grad-accum", help="Micro-batches per step (default 1)."
    ),
    precision: str | None = typer.Option(
        None, "--precision", help="auto (default), fp32, bf16 or fp16."
    ),
    channels_last: bool | None = typer.Option(
        None, "--channels-last/--no-channels-last", help="Memory format (default: on a GPU)."
    ),
    workers: int | None = typer.Option(
        None, "--workers", help="DataLoader worker processes (default 0)."
    ),
    seed: int | None = typer.Option(
        None, "--seed", callback=seed_flag, help="Training seed (default 0)."
    ),
    device: str | None = typer.Option(None, "--device", help="auto (default), cpu, cuda, cuda:N."),
    augment: str | None = typer.Option(
        None,
        "--augment",
        help="default (the paper's geometric and intensity augmentations), corruptions (those, "
        "then each image with probability 0.5 corrupted by one of `advseg corruptions` at a "
        "random severity 1-5) or none. Default: default.",
    ),
    no_augment: bool = typer.Option(
        False, "--no-augment", help="Turn augmentation off (as --augment none; default: on)."
    ),
    noise_sigma: float | None = typer.Option(
        None, "--noise-sigma", help="Gaussian noise added to training images (default 0)."
    ),
    tensorboard: bool = typer.Option(False, "--tensorboard", help="Also write TensorBoard logs."),
    size: int = typer.Option(224, "--size", help="Image side S after resizing."),
    resize: str = typer.Option("pad", "--resize", help=RESIZE_HELP),
    channels: int = typer.Option(3, "--channels", help="Input channels C (grey copies)."),
    patch: str | None = typer.Option(
        None,
        "--patch",
        help="3D models: training patch D,H,W (or one size), also the validation's sliding "
        "window (default: the model's window, `advseg models`).",
    ),
    spacing: str | None = typer.Option(
        None,
        "--spacing",
        help="3D models: resample volumes to this voxel size D,H,W in mm (default: each "
        "volume's own).",
    ),
    modality: str = typer.Option(
        "auto",
        "--modality",
        help="3D models' normalisation: ct (foreground percentile clip, then z-score, as "
        "nnU-Net), mri (z-score per volume) or auto (ct when dataset.json says CT).",
    ),
    test_fraction: float | None = typer.Option(
        None,
        "--test-fraction",
        help="Share of cases held out for test (default 0.1; at least 2 cases where 4 or more "
        "exist). Not with --folds.",
    ),
    folds: int | None = typer.Option(
        None,
        "--folds",
        help="Case-level cross-validation: K models in OUT/fold0..fold<K-1>, each tested on its "
        "own fold of the cases (every case tested once; evaluate them together to pool). "
        "Default: none, one model and one test split.",
    ),
    val_fraction: float = typer.Option(0.1, "--val-fraction", help="Cases for validation."),
    split_seed: int = typer.Option(
        0, "--split-seed", callback=seed_flag, help="Seed of the case split."
    ),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out."),
    adv_train: str | None = typer.Option(
        None,
        "--adv-train",
        help="Adversarial training: none (default), fgsm-rs, pgd, trades, vaft, or a plausible "
        "attack: biasfield, elastic, gamma (AdvBias / AdvChain).",
    ),
    adv_eps: float | None = typer.Option(
        None,
        "--adv-eps",
        help="Its L-inf eps; for biasfield, elastic, gamma their own bound (log gain, pixels, "
        "log gamma) (default 0.009).",
    ),
    adv_steps: int | None = typer.Option(
        None, "--adv-steps", help="PGD/TRADES/plausible attack steps (default 10)."
    ),
    adv_alpha: float | None = typer.Option(
        None,
        "--adv-alpha",
        help="Attack step size (default: 1.25 eps for fgsm-rs, else 2.5 eps / steps).",
    ),
    adv_beta: float | None = typer.Option(None, "--adv-beta", help="TRADES beta (default 6)."),
    adv_warmup: int | None = typer.Option(
        None, "--adv-warmup", help="Epochs of eps warm-up (default 0)."
    ),
    adv_fraction: float | None = typer.Option(
        None, "--adv-fraction", help="Share of each batch attacked (default 1)."
    ),
    adv_loss: str | None = typer.Option(
        None, "--adv-loss", help="Attack loss (default: the training loss; TRADES: its KL)."
    ),
    adv_attack_mode: str | None = typer.Option(
        None, "--adv-attack-mode", help="Model mode during the attack: eval (default) or train."
    ),
    select_by: str | None = typer.Option(
        None,
        "--select-by",
        help="Best checkpoint and early stopping by clean (default) or robust Dice.",
    ),
    select_attack: str | None = typer.Option(
        None, "--select-attack", help="Robust validation's attack: pgd (default) or fgsm."
    ),
    select_steps: int | None = typer.Option(
        None, "--select-steps", help="Robust validation's PGD steps (default 5)."
    ),
    threads: int | None = typer.Option(None, "--threads", help=THREADS_HELP),
) -> None:
    """Train a model (AdamW, cosine schedule, early stopping on validation Dice, Dice+Focal).

    With --adv-train, adversarially: FGSM-RS (Wong et al. 2020), PGD (Madry et al. 2018),
    TRADES (Zhang et al. 2019) or VAFT (Hanif et al. 2023) at --adv-eps; --select-by robust keeps
    the checkpoint with the best validation Dice under a cheap attack (Rice et al. 2020).

    Run it under torchrun (`torchrun --nproc-per-node N -m advseg train ...`) for
    DistributedDataParallel on several GPUs or machines.
    """
    catalogue.check_names("model", [model], "--model")  # a typo answered before torch loads
    catalogue.check_names("loss", [loss], "--loss")
    catalogue.check_names("loss", [adv_loss], "--adv-loss")
    if data is None:
        raise no_data(out / "checkpoints" / "last" if resume else None)
    from advseg import distributed
    from advseg.augment import corruption_text
    from advseg.data import DataConfig, PreprocessConfig, VolumeConfig
    from advseg.data.location import data_argument
    from advseg.data.record import first_line
    from advseg.defences import describe
    from advseg.threads import set_threads
    from advseg.train import TrainConfig, train_folds, train_on_data

    if folds is not None and test_fraction is not None:
        raise UserError("--test-fraction: not used with --folds (each fold is the test side)")
    if folds is not None and folds < 2:
        raise UserError(f"--folds: need 2 or more folds, got {folds}")
    test_fraction = 0.1 if test_fraction is None else test_fraction
    set_threads(threads)
    settings = {} if config is None else load_yaml(config) or {}
    if not isinstance(settings, dict):
        raise UserError(f"{config}: expected a mapping of train settings (lr: 0.001, ...), got a "
                        f"{type(settings).__name__}")  # fmt: skip
    options = {
        "model": model,
        "encoder_weights": encoder_weights,
        "activation": activation,
        "loss": loss,
        "epochs": epochs,
        "batch_size": _batch_size(batch_size),
        "lr": lr,
        "weight_decay": weight_decay,
        "patience": patience,
        "grad_accum": grad_accum,
        "precision": precision,
        "channels_last": channels_last,
        "num_workers": workers,
        "seed": seed,
        "device": device,
        "noise_sigma": noise_sigma,
    }
    given = {k: v for k, v in options.items() if v is not None}
    values = {**settings, **given}
    adversarial = {
        "method": adv_train,
        "eps": adv_eps,
        "steps": adv_steps,
        "alpha": adv_alpha,
        "beta": adv_beta,
        "warmup": adv_warmup,
        "fraction": adv_fraction,
        "loss": adv_loss,
        "attack_mode": adv_attack_mode,
        "select_by": select_by,
        "select_attack": select_attack,
        "select_steps": select_steps,
    }
    adversarial = {k: v for k, v in adversarial.items() if v is not None}
    if adversarial:
        saved = values.get("adversarial") or {}
        if not isinstance(saved, dict):
            raise UserError(f"{config}: adversarial: expected a mapping")
        values["adversarial"] = {**saved, **adversarial}
        _refuse_idle(adversarial, values["adversarial"])
    if tensorboard:
        values["tensorboard"] = True
    typed = {**given, "test_fraction": test_fraction, "val_fraction": val_fraction}
    typed.update(size=size, channels=channels, resize=resize)
    typed.update({f"adversarial.{key}": value for key, value in adversarial.items()})
    with options_named(typed, file=config, flags=_FLAGS):
        train_config = from_dict(TrainConfig, values)
        if train_config.encoder_weights is not None and not resume:  # before any data is read
            from advseg.models.zoo import check_encoder_weights

            check_encoder_weights(train_config.model, train_config.encoder_weights)
        _set_augment(train_config, augment, no_augment)
        data_config = DataConfig(
            path=data_argument(data),
            **label_settings(labels, strict_labels),
            preprocess=PreprocessConfig(size=size, channels=channels, resize=resize),
            cache_dir=cache_dir,
            volume=VolumeConfig(
                patch=_triple(patch, "--patch", int),  # type: ignore[arg-type]
                spacing=_triple(spacing, "--spacing", float),  # type: ignore[arg-type]
                modality=modality,  # type: ignore[arg-type]
            ),
        )
        distributed.init()
        if distributed.is_main():  # first: which data (the phantom said plainly)
            console().print(first_line(data_config), highlight=False, soft_wrap=True)
        if folds is not None:
            results = train_folds(
                data_config,
                train_config,
                out,
                folds,
                val_fraction=val_fraction,
                split_seed=split_seed,
                resume=resume,
                progress=True,
            )
        else:
            result = train_on_data(
                data_config,
                train_config,
                out,
                test_fraction=test_fraction,
                val_fraction=val_fraction,
                split_seed=split_seed,
                resume=resume,
                progress=True,
            )
    if not distributed.is_main():
        return
    if folds is not None:
        console().print(_folds_table(train_config, results, out), soft_wrap=True)
        return
    rows = result.data.get("rows", {})
    table = Table(title=f"advseg train: {train_config.model}", show_header=False)
    robust = train_config.adversarial.select_by == "robust"
    what = "best robust validation Dice" if robust else "best validation Dice"
    what += " (global)"  # TP, FP, FN summed over the validation pixels, as the epochs print it
    table.add_row(what, f"{result.best_dice:.4f} (epoch {result.best_epoch})")
    table.add_row("activation", f"{train_config.activation} (loss {train_config.loss})")
    overlap = result.data.get("overlap")
    if overlap:
        table.add_row(
            "overlapping pixels",
            f"{overlap['pixels']} in training, each labelled {overlap['labelled']}",
        )
    table.add_row("adversarial training", describe(train_config.adversarial))
    if train_config.augment.enabled and train_config.augment.corruptions:
        table.add_row("corruption augmentation", corruption_text(train_config.augment))
    stop = " (stopped early)" if result.stopped_early else ""
    table.add_row("epochs", f"{result.epochs_run} of {train_config.epochs}{stop}")
    unit = "volumes" if "volumes" in result.data else "slices"
    table.add_row(unit, ", ".join(f"{k} {v}" for k, v in rows.items()))
    for line in result.data.get("excluded", []):
        table.add_row("excluded", line)
    table.add_row("time", f"{result.seconds:.1f} s")
    table.add_row("best checkpoint", str(result.best_path))
    table.add_row("last checkpoint", str(result.last_path))
    table.add_row("settings", ", ".join(f"{k}={v}" for k, v in to_dict(train_config).items()))
    console().print(table)


def _folds_table(train_config, results: list, out: Path) -> Table:
    """One row per fold: its test cases and slices, best validation Dice, epochs, time."""
    table = Table(title=f"advseg train --folds {len(results)}: {train_config.model}")
    for column in ("fold", "test cases", "test slices", "best val Dice (global)", "epochs", "s"):
        table.add_column(column)
    for fold, result in enumerate(results):
        cases = result.data["split"]["cases"]["test"]
        table.add_row(
            str(fold),
            ", ".join(map(str, cases)),
            str(result.data["rows"]["test"]),
            f"{result.best_dice:.4f} (epoch {result.best_epoch})",
            f"{result.epochs_run} of {train_config.epochs}",
            f"{result.seconds:.1f}",
        )
    cases = sum(len(r.data["split"]["cases"]["test"]) for r in results)
    table.caption = (
        f"{cases} cases, each the test case of the one fold model that did not train on it. "
        "Score them pooled, as one model: advseg evaluate "
        f"{out}/fold*/checkpoints/best.safetensors ..."
    )
    return table


_TRAINING_ONLY = ("steps", "alpha", "beta", "warmup", "fraction", "loss", "attack_mode")
_ROBUST_SELECTION = ("eps", "select_attack", "select_steps")


def _refuse_idle(given: dict[str, object], merged: dict[str, object]) -> None:
    """Refuse an adversarial option that would do nothing: ``--adv-eps`` without ``--adv-train``
    (or ``--select-by robust``, whose validation attack takes eps) is silently plain training."""
    if merged.get("method", "none") != "none":
        return
    robust = merged.get("select_by") == "robust"
    for key in given:
        if key in _TRAINING_ONLY or (key in _ROBUST_SELECTION and not robust):
            needs = "--adv-train" if key in _TRAINING_ONLY else "--adv-train or --select-by robust"
            raise UserError(
                f"{flag_of('adversarial.' + key, _FLAGS)}: does nothing without {needs} "
                "(plain training attacks nothing)"
            )


AUGMENT_CHOICES = ("default", "corruptions", "none")


def _set_augment(config: TrainConfig, augment: str | None, no_augment: bool) -> None:
    """``--augment`` / ``--no-augment`` onto ``config.augment`` (a config file's settings stay
    unless an option is given)."""
    if augment is not None and augment not in AUGMENT_CHOICES:
        raise UserError(f"--augment: {augment!r} is not one of {', '.join(AUGMENT_CHOICES)}")
    if no_augment and augment not in (None, "none"):
        raise UserError(f"--no-augment: contradicts --augment {augment}")
    settings = config.augment
    if no_augment or augment == "none":
        settings.enabled = False
        settings.corruptions = []
    elif augment == "default":
        settings.enabled = True
        settings.corruptions = []
    elif augment == "corruptions":
        from advseg.corruptions.augment import corruption_names

        settings.enabled = True
        settings.corruptions = corruption_names(["all"], "--augment")


def _triple(text: str | None, flag: str, kind: type) -> tuple | None:
    """``D,H,W`` (or one number for all three) as a tuple of ``kind``; None stays None."""
    if text is None:
        return None
    parts = [p.strip() for p in text.split(",")]
    try:
        values = tuple(kind(p) for p in parts)
    except ValueError:
        raise UserError(f"{flag}: {text!r} is not D,H,W or one number") from None
    if len(values) == 1:
        values = values * 3
    if len(values) != 3:
        raise UserError(f"{flag}: {text!r} is not D,H,W or one number")
    return values


def _batch_size(given: str | None) -> int | str | None:
    """``--batch-size``: a whole number, or a name of the paper's batch sizes (checked here)."""
    from advseg.train.config import PAPER_BATCH_SIZES

    if given is None or given in PAPER_BATCH_SIZES:
        return given
    if given.isdigit():
        return int(given)
    names = ", ".join(f"{k} ({v})" for k, v in PAPER_BATCH_SIZES.items())
    raise UserError(f"--batch-size: {given!r} is no whole number and no name: {names}")
