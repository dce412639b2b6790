"""Checks made before any work: a week of GPU time must not end on a typo found at hour three.

:func:`check_experiment` looks at everything an experiment will need, before its run directory is
written: the output location, the device, the encoder weights of each model trained here (file
headers: keys and shapes), the data (indexed, not decoded: a mistyped path, a bad exclusion list
or label mapping fails here), every checkpoint it loads (readable, fitting the
data's classes, holding out the experiment's test cases, trained on slices of the same geometry:
padded or stretched) and every attack of the grid (built, with each of its losses and budgets, on
a one-layer stand-in model, so that ``steps: -1`` or ``norm: l3`` is refused now rather than when
its cell starts).

:func:`advseg.atomic.check_output_dir` is the output check every command makes before its work.
A resume on other data is refused with :func:`advseg.data.record.same_data`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from torch import nn

from advseg.atomic import check_output_dir
from advseg.data import held_out_rows, split_cases
from advseg.data.preprocess import PreprocessConfig, saved_preprocess
from advseg.errors import UserError
from advseg.evaluate.compat import create_compat_attack

if TYPE_CHECKING:
    from advseg.experiment.config import ExperimentConfig


def check_experiment(config: ExperimentConfig, run_dir: str | Path) -> None:
    """Refuse, before anything is written, an experiment that would fail part-way.

    Raises:
        UserError: one line naming the key (``attacks[1].kwargs``, ``train.device``,
            ``models[0].checkpoint``, ``data.path``) or the file at fault.
    """
    from advseg.data.load import build_index
    from advseg.models.checkpoint import check_compatible, read_checkpoint
    from advseg.train import resolve_device

    check_output_dir(run_dir, "run directory")
    check_cache_dir(config.data.cache_dir)
    resolve_device(config.train.device)
    check_encoders(config)
    try:
        index, _ = build_index(config.data)
    except UserError as err:
        raise UserError(f"data: {err}") from None
    classes = list(index.attrs.get("classes", []))
    for i, model in enumerate(config.models):
        if model.checkpoint is None:
            continue
        where = f"models[{i}].checkpoint"
        try:
            _, meta, _ = read_checkpoint(model.checkpoint)
            check_compatible(meta, model.checkpoint, classes=classes)
            check_held_out(meta.data, model.checkpoint, config, index)
            check_geometry(meta.preprocessing, model.checkpoint, config.data.preprocess, index)
            check_losses_fit(config, meta.activation)
        except UserError as err:
            raise UserError(f"{where}: {err}") from None
    check_attacks(config, in_channels=config.data.preprocess.channels, classes=len(classes) or 1)


def check_cache_dir(cache_dir: str | Path | None) -> None:
    """Refuse a cache directory (``data.cache_dir``, ``--cache-dir``, ``$ADVSEG_CACHE``) that is
    a file or lies under one, before the run writes anything (its config.yaml was left behind).
    A read-only cache passes: entries already built are read from it."""
    from advseg.data.location import cache_root

    path = cache_root(cache_dir)
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        where = "is a file" if existing == path else f"lies under a file ({existing})"
        raise UserError(f"data.cache_dir: {path}: the cache directory {where}")


def check_encoders(config: ExperimentConfig) -> None:
    """Refuse encoder weights a model trained here could not start from (a missing file, no
    safetensors file, another encoder's keys or shapes, a model without an encoder), naming the
    model and the file; only the files' headers are read."""
    from advseg.experiment.config import model_train_config, trained_here
    from advseg.models.zoo import check_encoder_weights

    for i, model in enumerate(config.models):
        if trained_here(model):
            weights = model_train_config(config, model).encoder_weights
            try:
                check_encoder_weights(model.arch, weights)
            except UserError as err:
                raise UserError(f"models[{i}] ({model.name}): encoder weights: {err}") from None


def check_losses_fit(config: ExperimentConfig, activation: str) -> None:
    """Refuse an attack loss made for the other activation than a checkpoint's outputs."""
    from advseg.losses import loss_activation

    for i, attack in enumerate(config.attacks):
        for j, loss in enumerate(attack.losses):
            kind = loss_activation(loss)
            if kind not in (None, activation):
                raise UserError(
                    f"its outputs are {activation}; attacks[{i}].losses[{j}] {loss!r} is for "
                    f"{kind} models"
                )


def check_geometry(
    saved: dict, checkpoint: Path, preprocess: PreprocessConfig, index: pd.DataFrame
) -> None:
    """Refuse a checkpoint trained on non-square slices resized otherwise than the experiment's
    data (``pad`` against ``stretch``): its inputs would have another geometry.

    A checkpoint saved before ``resize`` existed was trained stretched
    (:func:`advseg.data.saved_preprocess`); square slices are the same either way.
    """
    trained = saved_preprocess(saved, f"{checkpoint} preprocessing").resize
    non_square = bool((index["width"] != index["height"]).any())
    if non_square and trained != preprocess.resize:
        raise UserError(
            f"{checkpoint}: trained on non-square slices resized with '{trained}', the "
            f"experiment's data.preprocess.resize is '{preprocess.resize}'; set it to '{trained}' "
            "(or retrain)"
        )


def check_attacks(config: ExperimentConfig, in_channels: int, classes: int) -> None:
    """Build every (attack, loss, eps) of the grid on a 1x1-convolution stand-in model.

    An attack's constructor checks its own options (steps, norm, restarts, update rule, valid
    range, ...): building each one here is the same check its cell would make, made first.
    """
    from advseg.experiment.config import attack_compat
    from advseg.experiment.external import in_source_units

    stand_in = nn.Conv2d(in_channels, classes, 1)
    unbounded = {"valid_range": None} if in_source_units(config) else {}  # eps in HU
    for i, attack in enumerate(config.attacks):
        mode = attack_compat(attack, config)  # the notebook's losses and options, or the attack's
        for loss in attack.losses:
            for eps in attack.eps:
                try:
                    create_compat_attack(
                        attack.name, stand_in, loss, eps, mode,
                        **{"seed": config.seed, **attack.kwargs, **unbounded},
                    )  # fmt: skip
                except (UserError, TypeError, ValueError) as err:
                    raise UserError(f"attacks[{i}] ({attack.name}): {err}") from None


def check_held_out(
    metadata: dict[str, Any],
    checkpoint: Path,
    config: ExperimentConfig,
    index: pd.DataFrame | None = None,
) -> None:
    """Refuse a checkpoint whose training split differs from the experiment's.

    The experiment evaluates its own test cases; a checkpoint trained with another split seed or
    fraction, or on another data source, may have trained on some of them. With ``index`` (the
    data as it is now), the experiment's test rows must also be the rows the checkpoint held out
    (:func:`advseg.data.held_out_rows`): a case added since training moves the seeded split.
    """
    split = config.split
    expected = {"test_fraction": split.test_fraction, "split_seed": split.seed}
    for key, value in expected.items():
        if key not in metadata:
            raise UserError(
                f"{checkpoint}: its metadata does not say which cases it held out (no "
                f"data.{key}); the experiment cannot tell train cases from test cases"
            )
        if metadata[key] != value:
            raise UserError(
                f"{checkpoint}: trained with data.{key} {metadata[key]}, the experiment's split "
                f"has {value}; its test cases would include training cases"
            )
    trained_on = metadata.get("config", {}).get("path")
    ours = None if config.data.path is None else str(config.data.path)
    if trained_on != ours:
        raise UserError(f"{checkpoint}: trained on data {trained_on}, the experiment uses {ours}")
    if index is not None:
        held = held_out_rows(index, metadata, str(checkpoint))
        _, test = split_cases(index, split.test_fraction, split.seed)
        if not np.array_equal(held, test):
            cases = index["case"].to_numpy()
            raise UserError(
                f"{checkpoint}: held out cases {sorted(set(cases[held].tolist()))}, the "
                f"experiment's split of the data now tests {sorted(set(cases[test].tolist()))} "
                "(the data changed since it was trained, or it predates the split's 2 test "
                "cases default); its test cases would include training cases"
            )
