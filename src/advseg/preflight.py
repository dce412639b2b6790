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
:func:`data_fingerprint` names the data a run computed on, so that a resume on other data is
refused.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
from torch import nn

from advseg.atomic import check_output_dir
from advseg.compat import create_compat_attack
from advseg.data.preprocess import PreprocessConfig, saved_preprocess
from advseg.errors import UserError

if TYPE_CHECKING:
    from advseg.data import SliceData
    from advseg.experiment import ExperimentConfig


def check_experiment(config: ExperimentConfig, run_dir: str | Path) -> None:
    """Refuse, before anything is written, an experiment that would fail part-way.

    Raises:
        UserError: one line naming the key (``attacks[1].kwargs``, ``train.device``,
            ``models[0].checkpoint``, ``data.path``) or the file at fault.
    """
    from advseg.data.load import build_index
    from advseg.experiment import check_held_out
    from advseg.models.checkpoint import check_compatible, read_checkpoint
    from advseg.train import resolve_device

    check_output_dir(run_dir, "run directory")
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


def check_encoders(config: ExperimentConfig) -> None:
    """Refuse encoder weights a model trained here could not start from (a missing file, no
    safetensors file, another encoder's keys or shapes, a model without an encoder), naming the
    model and the file; only the files' headers are read."""
    from advseg.experiment import model_train_config, trained_here
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
    from advseg.experiment import attack_compat

    stand_in = nn.Conv2d(in_channels, classes, 1)
    for i, attack in enumerate(config.attacks):
        mode = attack_compat(attack, config)  # the notebook's losses and options, or the attack's
        for loss in attack.losses:
            for eps in attack.eps:
                try:
                    create_compat_attack(
                        attack.name, stand_in, loss, eps, mode,
                        **{"seed": config.seed, **attack.kwargs},
                    )  # fmt: skip
                except (UserError, TypeError, ValueError) as err:
                    raise UserError(f"attacks[{i}] ({attack.name}): {err}") from None


def data_fingerprint(data: SliceData) -> str:
    """A name for the data a run computes on: the cache key of its index.

    The key hashes the index (ids, image paths, masks, classes), the image files' contents
    (:mod:`advseg.data.content`) and the preprocessing: replaced or edited data gives another
    fingerprint, even with its sizes and modification times kept.
    """
    return data.cache_path.name


def same_data(saved: str, data: SliceData) -> bool:
    """Whether a saved fingerprint names ``data``: its fingerprint now, the one it had before
    content digests (sizes and mtimes), or the one it had before
    data locations were resolved (image paths as spelt relative to the working directory, what a
    run begun with a relative data path, ``advseg demo``'s included, saved)."""
    if saved == data_fingerprint(data):
        return True
    from advseg.data.cache import cache_key

    if saved == cache_key(data.index, data.preprocess, content=False):
        return True  # saved before content digests: the files' sizes and mtimes then
    index = data.index.copy()
    index["image_path"] = [os.path.relpath(p) for p in index["image_path"]]
    return saved == cache_key(index, data.preprocess, content=False)
