"""Softmax training end to end: a tiny model on the phantom, its checkpoint, evaluation and grid."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from advseg.augment import AugmentConfig
from advseg.cli import main
from advseg.config import save_yaml
from advseg.data import UWMGI_CLASSES, DataConfig, PreprocessConfig, write_synthetic
from advseg.errors import UserError
from advseg.experiment import (
    AttackSpec,
    EvaluationSpec,
    ExperimentConfig,
    ModelSpec,
    SplitSpec,
    check_config,
)
from advseg.models import load_checkpoint
from advseg.runs.records import read_records
from advseg.train import TrainConfig, train_on_data
from advseg.train.trained import load_trained


def cli(*args: str) -> int:
    with pytest.raises(SystemExit) as exit_:
        main(list(args))
    return exit_.value.code


def _train_config(**changes) -> TrainConfig:
    values = dict(
        model="unet-tiny", activation="softmax", epochs=4, batch_size=4, lr=3e-3,
        device="cpu", augment=AugmentConfig(enabled=False), patience=0,
    )  # fmt: skip
    return TrainConfig(**{**values, **changes})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("softmax")
    write_synthetic(root / "data", cases=3, scans=1, slices=6)
    data = DataConfig(
        path=root / "data", cache_dir=root / "cache", preprocess=PreprocessConfig(size=32)
    )
    result = train_on_data(
        data, _train_config(), root / "run", test_fraction=0.34, val_fraction=0.5
    )
    return root, result


def test_a_softmax_model_learns_and_its_checkpoint_says_softmax(trained):
    _, result = trained
    losses = [s.train_loss for s in result.history]
    assert losses[-1] < losses[0]  # it learns
    assert 0 <= result.best_dice <= 1
    model, meta = load_checkpoint(result.best_path, classes=list(UWMGI_CLASSES))
    assert meta.activation == "softmax" and meta.train["loss"] == "dicece"
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 4, 32, 32)  # background + 3 classes
    overlap = meta.data["overlap"]
    assert overlap["pixels"] >= 0 and "first of its classes" in overlap["labelled"]
    assert load_trained(result.best_path).activation == "softmax"


def test_evaluate_reads_the_activation_from_the_checkpoint(trained, tmp_path, capsys):
    _, result = trained
    best = str(result.best_path)
    common = ["evaluate", best, "--device", "cpu", "--attack", "pgd", "--steps", "2"]
    assert cli(*common, "--out", str(tmp_path / "ok")) == 0  # no --activation, no --loss
    records = read_records(tmp_path / "ok")
    assert set(records["loss"]) == {"ce", "dicece"}  # the softmax losses by default
    assert set(records["class"]) == set(UWMGI_CLASSES)
    assert (records["tp_clean"] + records["fn_clean"] == records["gt_pixels"]).all()
    capsys.readouterr()
    for extra, said in [
        (["--loss", "ce", "--activation", "sigmoid"], "was trained with softmax"),
        (["--loss", "bce"], "'bce' is for sigmoid models"),
    ]:
        assert cli(*common, *extra, "--out", str(tmp_path / "bad")) == 2
        err = capsys.readouterr().err
        assert said in err and len(err.strip().splitlines()) == 1
        assert not (tmp_path / "bad").exists()  # before any work


def test_training_refuses_a_loss_of_the_other_activation():
    with pytest.raises(UserError, match=r"train\.loss: 'dicefocal' is a sigmoid loss"):
        _train_config(loss="dicefocal")
    with pytest.raises(UserError, match=r"train\.loss: 'ce' is a softmax loss"):
        TrainConfig(loss="ce")
    with pytest.raises(UserError, match=r"train\.activation: 'tanh' is not sigmoid or softmax"):
        TrainConfig(activation="tanh")
    assert TrainConfig().loss == "dicefocal" and _train_config().loss == "dicece"
    assert _train_config(loss="ce").loss == "ce"


def test_train_help_shows_the_option_and_its_default(capsys):
    assert cli("train", "--help") == 0
    shown = " ".join(capsys.readouterr().out.split())
    assert "--activation" in shown and "Default: sigmoid." in shown


def test_a_yaml_grid_trains_and_attacks_a_softmax_model(tmp_path, monkeypatch):
    write_synthetic(tmp_path / "data", cases=3, scans=1, slices=6)
    config = ExperimentConfig(
        name="softmax",
        data=DataConfig(
            path=tmp_path / "data", cache_dir=tmp_path / "cache",
            preprocess=PreprocessConfig(size=32),
        ),
        split=SplitSpec(test_fraction=0.34, val_fraction=0.5),
        train=replace(_train_config(epochs=1), model="unet"),  # the default: models: name it
        models=[ModelSpec(arch="unet-tiny")],
        attacks=[AttackSpec(name="fgsm", losses=["ce", "js"], eps=[0.01])],
        evaluation=EvaluationSpec(batch_size=4),
        report=False,
    )  # fmt: skip
    path = tmp_path / "grid.yaml"
    save_yaml(config, path)
    assert "activation: softmax" in path.read_text()
    assert cli("run", str(path), "--out", str(tmp_path / "run")) == 0
    records = read_records(tmp_path / "run")
    assert set(records["loss"]) == {"ce", "js"}
    _, meta = load_checkpoint(tmp_path / "run" / "models" / "unet-tiny" / "checkpoints" / "best")
    assert meta.activation == "softmax"

    mixed = replace(config, attacks=[AttackSpec(name="fgsm", losses=["bce"], eps=[0.01])])
    said = r"attacks\[0\]\.losses\[0\]: 'bce' is for sigmoid models; model 'unet-tiny' has softmax"
    with pytest.raises(UserError, match=said):
        check_config(mixed)


def test_train_command_says_the_activation_and_the_overlapping_pixels(tmp_path, capsys):
    write_synthetic(tmp_path / "data", cases=3, scans=1, slices=6)
    args = ["train", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run")]
    args += ["--model", "unet-tiny", "--size", "32", "--epochs", "1", "--batch-size", "4"]
    args += ["--activation", "softmax", "--cache-dir", str(tmp_path / "cache")]
    assert cli(*args, "--test-fraction", "0.34", "--val-fraction", "0.5") == 0
    shown = " ".join(capsys.readouterr().out.replace("│", " ").split())  # the table's cells
    assert "activation softmax (loss dicece)" in shown
    assert "overlapping pixels" in shown and "each labelled the first of its classes" in shown
    assert cli(*args, "--loss", "focal", "--out", str(tmp_path / "bad")) == 2
    err = capsys.readouterr().err
    assert "--loss: 'focal' is a sigmoid loss" in err and len(err.strip().splitlines()) == 1


def test_certify_takes_the_softmax_checkpoint_per_class(trained):
    from advseg.defences.smoothing import SmoothingConfig
    from advseg.evaluate.certify import certify_checkpoint

    _, result = trained
    config = SmoothingConfig(sigma=0.1, n0=2, n=4, radii=[0.0], samples_per_forward=4)
    records = certify_checkpoint(result.best_path, config, max_slices=2, device="cpu")
    assert set(records["class"]) == set(UWMGI_CLASSES)  # background dropped
    assert records["abstained"].between(0, 1).all()
    assert (records["tp_clean"] + records["fn_clean"] == records["gt_pixels"]).all()


def test_adversarial_training_of_a_softmax_model_with_robust_selection(tmp_path):
    from advseg.defences.adversarial_training import AdversarialConfig

    write_synthetic(tmp_path / "data", cases=3, scans=1, slices=6)
    data = DataConfig(
        path=tmp_path / "data", cache_dir=tmp_path / "cache", preprocess=PreprocessConfig(size=32)
    )
    defence = AdversarialConfig(
        method="fgsm-rs", eps=0.01, select_by="robust", select_attack="fgsm"
    )
    config = _train_config(epochs=1, adversarial=defence)
    result = train_on_data(data, config, tmp_path / "run", test_fraction=0.34, val_fraction=0.5)
    (stats,) = result.history
    assert stats.val_robust_dice is not None and 0 <= stats.val_robust_dice <= 1
    assert result.best_dice == stats.val_robust_dice


def test_preflight_refuses_a_sigmoid_loss_for_a_softmax_checkpoint(trained, tmp_path):
    from advseg.experiment.preflight import check_experiment

    root, result = trained
    config = ExperimentConfig(
        data=DataConfig(
            path=(root / "data").resolve(), cache_dir=root / "cache",
            preprocess=PreprocessConfig(size=32),
        ),
        split=SplitSpec(test_fraction=0.34, val_fraction=0.5),
        models=[ModelSpec(name="soft", checkpoint=result.best_path)],
        attacks=[AttackSpec(name="fgsm", losses=["ce", "bce"], eps=[0.01])],
    )  # fmt: skip
    said = r"models\[0\]\.checkpoint: its outputs are softmax; attacks\[0\]\.losses\[1\] 'bce'"
    with pytest.raises(UserError, match=said):
        check_experiment(config, tmp_path / "run")


def test_softmax_models_transfer_and_ensemble_among_themselves(tmp_path):
    from advseg.experiment import run_experiment

    write_synthetic(tmp_path / "data", cases=3, scans=1, slices=6)
    config = ExperimentConfig(
        data=DataConfig(
            path=tmp_path / "data", cache_dir=tmp_path / "cache",
            preprocess=PreprocessConfig(size=32),
        ),
        split=SplitSpec(test_fraction=0.34, val_fraction=0.5),
        train=replace(_train_config(epochs=1), model="unet"),
        models=[
            ModelSpec(arch="unet-tiny", name="a"),
            ModelSpec(arch="unet-tiny", name="b", train={"seed": 1}),
            ModelSpec(arch="ensemble:a+b"),
        ],
        attacks=[AttackSpec(name="fgsm", losses=["ce"], eps=[0.03], sources=["a"])],
        evaluation=EvaluationSpec(batch_size=4, max_slices=4),
        report=False,
    )  # fmt: skip
    run_experiment(config, tmp_path / "run")
    records = read_records(tmp_path / "run")
    pairs = set(zip(records["source"], records["model"], strict=True))
    assert pairs == {("a", "a"), ("b", "b"), ("ensemble-a-b", "ensemble-a-b")} | {
        ("a", "b"),
        ("a", "ensemble-a-b"),
    }
    assert set(records["class"]) == set(UWMGI_CLASSES)

    # a sigmoid target of a softmax source: one loss list cannot fit both, refused before work
    mixed = replace(
        config,
        models=[
            *config.models[:1],
            ModelSpec(
                arch="unet-tiny", name="b", train={"activation": "sigmoid", "loss": "dicefocal"}
            ),
        ],
    )
    mixed.attacks = [AttackSpec(name="fgsm", losses=["js"], eps=[0.03], sources=["a"])]
    with pytest.raises(UserError, match="'a' and 'b' do not fit together: outputs softmax vs sig"):
        run_experiment(mixed, tmp_path / "mixed")
    assert not (tmp_path / "mixed" / "models").exists()
