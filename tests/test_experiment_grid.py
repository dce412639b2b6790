"""The grid side of the experiment runner: one training path, seeds, compat, torchrun, --data."""

from __future__ import annotations

from dataclasses import replace

import torch
from safetensors.torch import load_file

from advseg.augment import AugmentConfig
from advseg.experiment import AttackSpec, model_train_config, run_experiment
from advseg.models import read_checkpoint
from advseg.train import train_on_data
from test_experiment_run import _config, phantom  # noqa: F401 (phantom: the module's fixture)


def _one_cell(config):
    return replace(
        config, attacks=[AttackSpec(name="fgsm", losses=["bce"], eps=[0.01])], report=False
    )


def test_a_grid_trains_its_model_through_train_on_data(phantom, tmp_path):  # noqa: F811
    config = _one_cell(_config(phantom, tmp_path))
    config.train = replace(config.train, augment=AugmentConfig())  # augmentation on
    run_experiment(config, tmp_path / "run")
    grid = tmp_path / "run" / "models" / "unet-tiny" / "checkpoints" / "best"

    alone = tmp_path / "alone"
    split = config.split
    train_on_data(
        config.data,
        model_train_config(config, config.models[0]),
        alone,
        test_fraction=split.test_fraction,
        val_fraction=split.val_fraction,
        split_seed=split.seed,
    )
    ours, theirs = (load_file(f"{p}.safetensors") for p in (grid, alone / "checkpoints" / "best"))
    assert ours.keys() == theirs.keys()
    for key, value in ours.items():
        assert torch.equal(value, theirs[key]), key  # bit for bit
    _, meta, _ = read_checkpoint(grid)
    _, meta_alone, _ = read_checkpoint(alone / "checkpoints" / "best")
    assert meta.data == meta_alone.data and set(meta.data["rows"]) == {"train", "val", "test"}
    assert meta.train == meta_alone.train
