"""A grid of 3D models (``configs/volumes.yaml``): what such a grid may hold, and its cells.

A grid whose models are 3D networks (``advseg models``: ``unet3d``, ``segresnet``, ``unetr``,
``swinunetr``, ``unet3d-tiny``) runs on volumes end to end: the data is
:func:`advseg.data.load_volumes` (one row per scan), each model trains through
:func:`advseg.train.train_on_data` (patches, sliding-window validation), and each attack cell is
computed once per threat protocol of ``evaluation.through`` (``inference``, ``tiles``;
:mod:`advseg.attacks.through`) on whole held-out volumes through
:class:`advseg.inference.SlidingWindow` with the patch as window, its records naming the
protocol (``<attack>:<through>``) and holding the normalised surface Dice at
``evaluation.nsd_mm``. Corruption cells corrupt each whole volume in 3D
(:func:`advseg.evaluate.corrupted.evaluate_corruptions`), scored once, by the inference.
Transfer cells score the volumes a source crafted (under the same protocol) on the target
through the target's inference, and a universal cell fits one window-sized perturbation on the
training volumes (through the inference, or through the bare network on their tiles) laid out on
every tile of each held-out volume (:mod:`advseg.crossmodel.cells`,
:func:`advseg.attacks.universal.lay_out`). Input defences (``models[i].defences``) filter each
whole volume before the inference (:mod:`advseg.defences.volumes`). What is not built for
volumes yet is refused in one line: 2D and 3D models in one grid, checkpoints given to the grid,
ensembles (models and transfer sources ``a+b``), cross-validation folds, ``compat: notebook``,
JPEG (a 2D defence), a defence under the tile protocol, and transfer or universal cells in a
grid with defended models.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from advseg.crossmodel.transfer import ENSEMBLE_JOIN
from advseg.defences import DefendedModel
from advseg.defences.volumes import check_volume_defence, defend_volume
from advseg.errors import UserError
from advseg.experiment.config import ENSEMBLE_PREFIX
from advseg.models.zoo import MODELS, resolve

if TYPE_CHECKING:
    from torch import nn

    from advseg.experiment.config import ExperimentConfig

THROUGH = ("inference", "tiles")


def is_3d(arch: str) -> bool:
    """Whether the zoo name ``arch`` is a 3D network (an unknown name: no; it is refused
    elsewhere, naming the valid ones)."""
    return arch in MODELS and resolve(arch).spatial_dims == 3


def volumetric(config: ExperimentConfig) -> bool:
    """Whether the grid's models are 3D networks (checked by :func:`check_volumes`)."""
    return any(is_3d(model.arch) for model in config.models)


def check_volumes(config: ExperimentConfig) -> None:
    """Refuse a 3D grid holding what volumes do not support yet, and a bad
    ``evaluation.through`` / ``evaluation.nsd_mm``, in one line naming the key."""
    through = config.evaluation.through
    if not through or any(t not in THROUGH for t in through) or len(set(through)) < len(through):
        raise UserError(f"evaluation.through: {through}: give inference and/or tiles, each once")
    if not 0 < config.evaluation.nsd_mm < 1000:
        raise UserError(f"evaluation.nsd_mm: {config.evaluation.nsd_mm} must lie in (0, 1000)")
    if not volumetric(config):
        return
    for i, model in enumerate(config.models):
        where = f"models[{i}] ({model.name})"
        if model.arch.startswith(ENSEMBLE_PREFIX) or not is_3d(model.arch):
            raise UserError(f"{where}: a grid holds 2D or 3D models, not both (run two grids)")
        if model.checkpoint is not None:
            raise UserError(f"{where}: a 3D grid trains its models; checkpoints are not built")
        for j, spec in enumerate(model.defences):  # JPEG is 2D; tiles attack the bare network
            check_volume_defence(spec, f"models[{i}].defences[{j}]", tuple(through))
        crossed = any(a.transfer or a.sources or a.name == "universal" for a in config.attacks)
        if model.defences and crossed:
            raise UserError(f"{where}: transfer or universal cells with defended 3D models are "
                            "not built")  # fmt: skip
    for i, attack in enumerate(config.attacks):
        for j, source in enumerate(attack.sources):
            if ENSEMBLE_JOIN in source:
                raise UserError(f"attacks[{i}].sources[{j}]: ensemble sources on volumes are "
                                "not built")  # fmt: skip
        if (attack.compat or config.compat) != "none":
            raise UserError(f"attacks[{i}]: compat notebook is for slices")
    if config.split.folds is not None:
        raise UserError("split.folds: cross-validation trains 2D models")


def volume_model(
    config: ExperimentConfig, net: nn.Module, arch: str, valid_range: tuple[float, float] | None
) -> nn.Module:
    """The model a 3D grid's cell scores volumes with: ``net``'s sliding-window inference
    (:func:`advseg.crossmodel.cells.volume_inferer`); a model variant behind an input defence
    gets the defence in front of the inference, filtering the whole volume
    (:func:`advseg.defences.volumes.defend_volume`), not inside it, window by window."""
    from advseg.crossmodel.cells import volume_inferer

    if isinstance(net, DefendedModel):
        inferer = volume_inferer(config, net.model, arch)
        return defend_volume(inferer, net.spec, valid_range, f"model {arch}+{net.spec}")
    return volume_inferer(config, net, arch)
