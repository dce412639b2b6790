"""Training a 3D model from a data set's volumes: the branch of ``train_on_data`` taken when
``train.model`` is a 3D network (``advseg models``: ``unet3d``, ``segresnet``, ``unetr``,
``swinunetr``, ``unet3d-tiny``).

The same loop, losses, checkpoints, resume, DDP and adversarial training as slices
(:func:`advseg.train.loop.train`); what differs is the data: the split is by case over the
volumes (:func:`advseg.data.split_train_val_test` on the volume index), training items are
patches (``data.volume.patch``, default the model's window; ``data.volume.foreground`` of them
centred on foreground; mirrored at random when augmentation is on), validation predicts each
whole validation volume through the sliding window (Gaussian blending, ``data.volume.overlap``),
and the adversarial training's attacks keep to the volumes' valid range (CT: the z-scored clip).
A checkpoint stores, beside the slices' data record, ``data.volumes``
(:func:`advseg.data.volume_note`: normalisation, valid range, volume settings with the patch
used, spacing per scan) and the held-out cases (``data.split``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from torch.utils.data import Dataset

from advseg import distributed
from advseg.data import DataConfig, VolumeData
from advseg.errors import UserError
from advseg.models.zoo import resolve
from advseg.train.config import TrainConfig


def is_volumetric(model: str) -> bool:
    """Whether the zoo model ``model`` is a 3D network (trained on volumes)."""
    return resolve(model).spatial_dims == 3


@dataclass
class VolumeSets:
    """What :func:`advseg.train.train_on_data` trains a 3D model on.

    Attributes:
        data: the loaded volumes (``data.config.patch`` set to the patch used).
        config: the data config as the checkpoint stores it (the patch filled in).
        train, val: the training patches and the whole validation volumes.
        rows: ``(train_rows, val_rows, test_rows)``, positions in ``data.index``.
        patch: the training patch, also the validation's sliding window.
    """

    data: VolumeData
    config: DataConfig
    train: Dataset
    val: Dataset
    rows: tuple[np.ndarray, np.ndarray, np.ndarray]
    patch: tuple[int, int, int]


def volume_sets(
    data_config: DataConfig,
    config: TrainConfig,
    *,
    test_fraction: float,
    val_fraction: float,
    split_seed: int,
) -> VolumeSets:
    """Load the volumes (rank 0 fills the cache first), split them by case, and make the
    training patches and validation volumes (see the module's docstring)."""
    from advseg.data import load_volumes, split_train_val_test

    if config.adversarial.select_by == "robust":
        raise UserError(
            "train.adversarial.select_by: robust selection of a 3D model is not built yet "
            "(its attack would have to run through the sliding window); use clean"
        )
    entry = resolve(config.model)
    volume = data_config.volume
    patch = tuple(volume.patch or entry.roi)
    if entry.arch == "UNETR" and patch != tuple(entry.roi):
        raise UserError(f"data.volume.patch: {config.model} takes windows of {entry.roi} only")
    if not distributed.is_main():
        distributed.barrier()  # rank 0 fills the cache first
    data = load_volumes(data_config)
    if distributed.is_main():
        distributed.barrier()
    rows = split_train_val_test(data.index, test_fraction, val_fraction, split_seed)
    stored = replace(data_config, volume=replace(volume, patch=patch))
    data.config = stored.volume
    return VolumeSets(
        data=data,
        config=stored,
        train=data.patches(rows[0], patch, flip=config.augment.enabled),
        val=data.dataset(rows[1]),
        rows=rows,
        patch=patch,  # type: ignore[arg-type]
    )
