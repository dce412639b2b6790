"""Training a 3D model through the one training path: patches, sliding-window validation on
whole volumes, checkpoints that store the volumes' preparation and split (tiny: unet3d-tiny, 16^3
patches, 1-2 epochs on five 16-slice synthetic CT volumes)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from advseg.cli import main
from advseg.data import DataConfig, VolumeConfig, load_volumes, write_synthetic_nifti
from advseg.errors import UserError
from advseg.inference import SlidingWindow
from advseg.labels import class_prediction
from advseg.models import load_checkpoint
from advseg.train import TrainConfig, global_dice, train_on_data

PATCH = (16, 16, 16)


@pytest.fixture(scope="module")
def ct(tmp_path_factory):
    root = tmp_path_factory.mktemp("voltrain")
    write_synthetic_nifti(root / "ct", cases=5, slices=16, size=(32, 24), seed=0)
    return root


def data_config(ct, **volume) -> DataConfig:
    return DataConfig(path=ct / "ct", cache_dir=ct / "cache",
                      volume=VolumeConfig(patch=PATCH, samples=2, **volume))  # fmt: skip


def small(**kw) -> TrainConfig:
    base = {"model": "unet3d-tiny", "epochs": 1, "batch_size": 2, "lr": 1e-2, "device": "cpu",
            "patience": 0}  # fmt: skip
    return TrainConfig(**{**base, **kw})


def test_train_validates_whole_volumes_by_sliding_window(ct, tmp_path):
    config = data_config(ct)
    result = train_on_data(config, small(), tmp_path / "run", test_fraction=0.3,
                           val_fraction=0.3)  # fmt: skip
    assert result.data["rows"] == {"train": 2, "val": 1, "test": 2}  # volumes, by case
    model, meta = load_checkpoint(result.best_path)
    assert meta.model == "unet3d-tiny" and meta.in_channels == 1
    volumes = meta.data["volumes"]
    assert volumes["config"]["patch"] == list(PATCH)
    assert volumes["normalisation"]["kind"] == "ct" and len(volumes["valid_range"]) == 2
    assert volumes["spacing"]["case1_day0"] == pytest.approx([2.5, 0.8, 0.8])
    assert meta.data["config"]["volume"]["patch"] == list(PATCH)
    split = meta.data["split"]["cases"]
    assert sorted(split["train"] + split["val"] + split["test"]) == [1, 2, 3, 4, 5]
    # the logged validation Dice is the sliding window's over the whole validation volume
    data = load_volumes(config)
    row = int(np.flatnonzero(data.index["case"] == split["val"][0])[0])
    image, mask = data.volume(row)
    with torch.no_grad():
        logits = SlidingWindow(model, PATCH, overlap=0.5)(image[None])
    predicted, truth = class_prediction(logits, "sigmoid", 0.5), mask[None] > 0.5
    counts = torch.stack([(predicted & truth).sum((0, 2, 3, 4)),
                          (predicted & ~truth).sum((0, 2, 3, 4)),
                          (~predicted & truth).sum((0, 2, 3, 4))]).double()  # fmt: skip
    assert result.history[0].val_dice == pytest.approx(global_dice(counts), abs=1e-6)


def test_checkpoint_round_trip_and_resume(ct, tmp_path):
    config = data_config(ct)
    first = train_on_data(config, small(epochs=2), tmp_path / "run", test_fraction=0.3,
                          val_fraction=0.3)  # fmt: skip
    model, _ = load_checkpoint(first.last_path)  # shared DynUNet blocks stored once, restored
    again = train_on_data(config, small(epochs=2), tmp_path / "run", test_fraction=0.3,
                          val_fraction=0.3, resume=True)  # fmt: skip
    assert again.epochs_run == 2 and len(again.history) == 2
    reloaded, _ = load_checkpoint(again.last_path)
    for (k, a), b in zip(model.state_dict().items(), reloaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_adversarial_training_keeps_the_ct_valid_range(ct, tmp_path):
    from advseg.defences.adversarial_training import AdversarialConfig

    adv = AdversarialConfig(method="fgsm-rs", eps=0.05)
    result = train_on_data(data_config(ct), small(adversarial=adv), tmp_path / "adv",
                           test_fraction=0.3, val_fraction=0.3)  # fmt: skip
    assert np.isfinite(result.history[0].train_loss)
    robust = AdversarialConfig(method="fgsm-rs", eps=0.05, select_by="robust")
    with pytest.raises(UserError, match="robust selection of a 3D model"):
        train_on_data(data_config(ct), small(adversarial=robust), tmp_path / "adv2",
                      test_fraction=0.3, val_fraction=0.3)  # fmt: skip


def test_train_command_on_volumes(ct, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ADVSEG_PROGRESS_SECONDS", "0")
    args = ["train", "--out", str(tmp_path / "cli"), "--model", "unet3d-tiny",
            "--data", str(ct / "ct"), "--cache-dir", str(ct / "cache"), "--patch", "16",
            "--spacing", "2.5,1.6,1.6", "--epochs", "1", "--batch-size", "2",
            "--test-fraction", "0.3", "--val-fraction", "0.3", "--device", "cpu"]  # fmt: skip
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 0
    printed = capsys.readouterr().out
    assert "volumes" in printed and "train 2, val 1, test 2" in printed
    meta = json.loads((tmp_path / "cli/checkpoints/last.json").read_text())["meta"]
    assert meta["data"]["volumes"]["spacing"]["case2_day0"] == pytest.approx([2.5, 1.6, 1.6])
    with pytest.raises(SystemExit) as exit_:
        main([*args[:-8], "--patch", "16,16", "--out", str(tmp_path / "bad")])
    assert exit_.value.code == 2
    assert "--patch: '16,16' is not D,H,W" in capsys.readouterr().err
