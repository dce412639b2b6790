"""An experiment is checked whole before its run directory is written (issue: nothing is lost).

Each bad experiment below used to be refused only when its cell started, after training, and its
config.yaml then locked the run directory against the corrected file. Now each is refused with
one line naming the key, and the run directory is not created.
"""

from __future__ import annotations

import json

import pytest

from advseg.augment import AugmentConfig
from advseg.config import from_dict, to_dict
from advseg.data import write_synthetic
from advseg.errors import UserError
from advseg.experiment import (
    ExperimentConfig,
    check_config,
    holds_work,
    prepare_run_dir,
    run_experiment,
)
from advseg.experiment.preflight import check_experiment


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    path = tmp_path_factory.mktemp("phantom") / "data"
    write_synthetic(path, cases=3, scans=1, slices=4, seed=0)
    return path


def _config(phantom, tmp_path, **changes) -> ExperimentConfig:
    data = {
        "data": {"path": str(phantom), "cache_dir": str(tmp_path / "cache"),
                 "preprocess": {"size": 16}},
        "split": {"test_fraction": 0.34, "val_fraction": 0.5},
        "train": {"epochs": 1, "batch_size": 4, "device": "cpu",
                  "augment": to_dict(AugmentConfig(enabled=False))},
        "models": [{"arch": "unet-tiny"}],
        "attacks": [{"name": "pgd", "losses": ["bce"], "eps": [0.01], "kwargs": {"steps": 2}}],
        "evaluation": {"batch_size": 4, "examples": 0},
    }  # fmt: skip
    for key, value in changes.items():
        section, _, field = key.partition(".")
        if field:
            target = data[section][0] if isinstance(data[section], list) else data[section]
            target[field] = value
        else:
            data[section] = value
    return check_config(from_dict(ExperimentConfig, data))


BAD = {
    "steps -1": ({"attacks.kwargs": {"steps": -1}}, "attacks[0] (pgd): pgd: steps"),
    "norm l3": ({"attacks.kwargs": {"norm": "l3"}}, "norm 'l3' is not one of linf, l2"),
    "restarts 0": ({"attacks.kwargs": {"restarts": 0}}, "restarts must be an integer >= 1"),
    "update foo": (
        {"attacks": [{"name": "fgsm", "losses": ["bce"], "kwargs": {"update": "foo"}}]},
        "update 'foo' is not 'sign' or 'notebook'",
    ),
    "valid_range reversed": ({"attacks.kwargs": {"valid_range": [1, 0]}}, "valid_range"),
    "unknown device": ({"train.device": "tpu"}, "train.device: 'tpu' is not a device"),
    "bad exclusion list": ({"data.exclude": "hosts"}, "data: exclude: unknown list 'hosts'"),
    "mistyped data path": ({"data.path": "/nonexistent/uwmgi"}, "no such data directory"),
    "missing checkpoint": (
        {"models.checkpoint": "/nonexistent/best"},
        "models[0].checkpoint: /nonexistent/best.safetensors: checkpoint file not found",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_experiment_is_refused_before_anything_is_written(phantom, tmp_path, case):
    changes, message = BAD[case]
    config = _config(phantom, tmp_path, **changes)
    run_dir = tmp_path / "run"
    with pytest.raises(UserError) as err:
        run_experiment(config, run_dir)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not run_dir.exists()


def test_a_good_experiment_passes(phantom, tmp_path):
    check_experiment(_config(phantom, tmp_path), tmp_path / "run")


@pytest.mark.parametrize("where", ["is a file", "under a file"])
def test_a_run_directory_that_cannot_be_one_is_refused(phantom, tmp_path, where):
    (tmp_path / "taken").write_text("a file")
    run_dir = tmp_path / "taken" if where == "is a file" else tmp_path / "taken" / "run"
    with pytest.raises(UserError, match="taken"):
        check_experiment(_config(phantom, tmp_path), run_dir)


def test_an_unwritable_run_directory_is_refused(phantom, tmp_path):
    parent = tmp_path / "locked"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        import os

        if os.access(parent, os.W_OK):
            pytest.skip("running as a user who may write anywhere (root)")
        with pytest.raises(UserError, match="no write permission"):
            check_experiment(_config(phantom, tmp_path), parent / "run")
    finally:
        parent.chmod(0o700)


def test_only_finished_work_locks_a_run_directory(phantom, tmp_path):
    run_dir = tmp_path / "run"
    prepare_run_dir(_config(phantom, tmp_path), run_dir)
    assert not holds_work(run_dir)
    (run_dir / "models" / "unet-tiny" / "checkpoints").mkdir(parents=True)
    (run_dir / "models" / "unet-tiny" / "checkpoints" / "last.json").write_text(json.dumps({}))
    assert holds_work(run_dir)


def test_a_checkpoint_trained_stretched_is_refused_on_padded_non_square_data(phantom, tmp_path):
    import torch

    from advseg.data import UWMGI_CLASSES, PreprocessConfig, build_index
    from advseg.experiment.preflight import check_geometry
    from advseg.models import create_model
    from advseg.models.checkpoint import CheckpointMeta, save_checkpoint

    config = _config(phantom, tmp_path)
    index, _ = build_index(config.data)
    assert (index["width"] != index["height"]).any()  # the phantom has 360x310 scans
    torch.manual_seed(0)
    data = {"test_fraction": 0.34, "split_seed": 0, "config": {"path": str(phantom)}}
    old = CheckpointMeta("unet-tiny", 3, list(UWMGI_CLASSES), preprocessing={"size": 16}, data=data)
    save_checkpoint(tmp_path / "old", create_model("unet-tiny"), old)
    config = _config(phantom, tmp_path, **{"models.checkpoint": str(tmp_path / "old")})
    with pytest.raises(UserError, match=r"models\[0\]\.checkpoint: .*old: trained on non-square "
                       "slices resized with 'stretch'.*resize is 'pad'"):  # fmt: skip
        check_experiment(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    config.data.preprocess.resize = "stretch"
    check_experiment(config, tmp_path / "run")  # the same geometry: accepted
    square = index[index["width"] == index["height"]]
    check_geometry({"size": 16}, tmp_path / "old", PreprocessConfig(resize="pad"), square)
