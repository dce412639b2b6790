"""Models advseg did not train, named in a grid (``models: [{nnunet: DIR, data: RAW, ...}]``):
what such a model may be given (checked before anything runs) and how the grid opens it.

Such a model is not trained: it is opened as ``advseg evaluate --nnunet / --bundle /
--torchscript / --model-factory`` opens it (:func:`advseg.evaluate.external.open_external`) and
attacked by every attack of the grid, its records, report and provenance (``external.json``)
as in ``advseg evaluate``:

- nnU-Net and bundles are scored on their own data (the entry's ``data``: whole volumes in the
  source's units, eps in HU for CT), so a grid holding one holds only such models (the grid's eps
  would mean [0, 1] for the others);
- TorchScript and factory models are scored on the grid's data at the entry's ``size`` (the
  grid's by default) and ``in_channels``, on the grid's held-out test slices.

Transfer, sources and universal cells take a TorchScript or factory model that reads the grid's
own slices (no ``data`` of its own, the grid's size and channels): it is then scored on the
same test slices as the zoo models, so each one's adversarial images are scored on the others
(:class:`advseg.crossmodel.cells.CrossModel`, which checks classes and activation too).
Training options, input defences, adversarial training, the grid's cross-validation folds,
corruptions, 3D grids, and transfer or universal cells with a model scored on its own data are
refused in one line.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from advseg.crossmodel.cells import UNIVERSAL
from advseg.errors import UserError
from advseg.experiment.config import ExperimentConfig, ModelSpec

SOURCE_UNITS = ("nnunet", "bundle")
"""The kinds whose eps are in the source's units (HU for CT), not advseg's [0, 1]."""


def externals(config: ExperimentConfig) -> list[tuple[int, ModelSpec]]:
    """The grid's models advseg did not train, with their position in ``models``."""
    return [(i, m) for i, m in enumerate(config.models) if m.external is not None]


def in_source_units(config: ExperimentConfig) -> bool:
    """Whether the grid's eps are in the source's units (its models are nnU-Net or bundles)."""
    return any(m.external.kind in SOURCE_UNITS for _, m in externals(config))


def check_external(config: ExperimentConfig) -> None:
    """Refuse, in one line naming the key, what does not apply to a model advseg did not train."""
    found = externals(config)
    if not found:
        return
    for i, model in found:
        where, kind = f"models[{i}]", model.external.kind
        for key in ("train", "defences", "adversarial"):
            if getattr(model, key):
                raise UserError(f"{where}.{key}: a {kind} model is not trained or defended here")
        if model.checkpoint is not None:
            raise UserError(f"{where}.checkpoint: a {kind} model is its own checkpoint")
        if kind in SOURCE_UNITS and model.data is None:
            raise UserError(f"{where}.data: a {kind} model needs its data (a raw data set with "
                            "imagesTs/ + labelsTs/, or imagesTr/ + labelsTr/)")  # fmt: skip
    i, model = found[0]
    if in_source_units(config):
        other = [m.name for m in config.models if (m.external is None
                 or m.external.kind not in SOURCE_UNITS)]  # fmt: skip
        if other:
            raise UserError(f"models[{i}]: {model.name}'s eps are in its source's units (HU for "
                            f"CT), {other[0]}'s in [0, 1]; run them in two grids")  # fmt: skip
    if config.split.folds is not None:
        raise UserError(f"models[{i}]: {model.name} is not trained here; not with split.folds")
    if config.corruptions:
        raise UserError(f"corruptions: not built for a model advseg did not train ({model.name})")
    crossing = [j for j, a in enumerate(config.attacks)
                if a.transfer or a.sources or a.name == UNIVERSAL]  # fmt: skip
    for _, model in found if crossing else ():
        ext, j = model.external, crossing[0]
        if ext.kind in SOURCE_UNITS or model.data is not None:
            hint = " (advseg evaluate --transfer crosses nnU-Net folds)" * (ext.kind == "nnunet")
            raise UserError(f"attacks[{j}]: {model.name} is scored on its own data, not the "
                            "grid's slices: no transfer or universal cells with it"
                            + hint)  # fmt: skip
        grid = config.data.preprocess
        if (ext.size, ext.in_channels) != (grid.size, grid.channels):
            raise UserError(f"attacks[{j}]: {model.name} reads slices of size {ext.size} with "
                            f"{ext.in_channels} channel(s), the grid's models {grid.size} with "
                            f"{grid.channels}: they share no images for transfer or universal "
                            "cells")  # fmt: skip


def open_externals(
    config: ExperimentConfig, data: Any, eval_rows: np.ndarray, device: Any
) -> dict[str, Any]:
    """Each external model of the grid opened (name -> :class:`~advseg.evaluate.external.Judged`).

    nnU-Net and bundles: every labelled case of their own ``data`` (at most
    ``evaluation.max_slices``, a draw seeded by the grid's seed). TorchScript and factories: the
    grid's data read at their size and input channels, scored on the grid's evaluated test
    slices (those of the test cases, should the slices differ).
    """
    from advseg.data import spread_rows
    from advseg.evaluate.cells import check_losses
    from advseg.evaluate.external import open_external

    opened = {}
    for _, model in externals(config):
        ext = model.external
        if ext.kind in SOURCE_UNITS:
            judged = open_external(ext, model.data, cache_dir=config.data.cache_dir, device=device)
            most = config.evaluation.max_slices
            if most is not None:
                judged.rows = spread_rows(judged.data.index, judged.rows, most, config.seed)
        else:
            preprocess = replace(config.data.preprocess, size=ext.size, channels=ext.in_channels)
            data_config = replace(config.data, preprocess=preprocess)
            where = model.data if model.data is not None else (config.data.path or "synthetic")
            if model.data is not None:
                data_config = replace(data_config, path=model.data)
            judged = open_external(ext, where, data_config=data_config, device=device)
            if list(judged.data.index["id"]) == list(data.index["id"]):
                judged.rows = np.asarray(eval_rows)
            else:
                cases = set(data.index["case"].iloc[eval_rows])
                judged.rows = np.flatnonzero(judged.data.index["case"].isin(cases).to_numpy())
            if len(judged.rows) == 0:
                raise UserError(f"{model.name}: none of the grid's test cases is in its data")
        judged.name = model.name
        for attack in config.attacks:
            check_losses(attack.losses, judged.activation, model.name)
        opened[model.name] = judged
    return opened
