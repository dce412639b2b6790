import csv

import pytest

from advseg.cli import main
from advseg.data import UWMGI_CLASSES, write_synthetic
from advseg.models import load_checkpoint


def cli(args: list[str]) -> int:
    """Run ``advseg ARGS`` in this process; its exit code."""
    with pytest.raises(SystemExit) as exit_:
        main(args)
    return exit_.value.code


def test_models_lists_names_and_paper_counts(capsys):
    assert cli(["models"]) == 0
    out = capsys.readouterr().out
    for name, params in [("unet-vgg13", "18.44M"), ("unet-resnext101", "95.76M")]:
        assert name in out and params in out
    assert "VGG13" in out


def test_train_command_on_a_small_synthetic_set(tmp_path, capsys):
    data = tmp_path / "data"
    write_synthetic(data, cases=3, scans=1, slices=6)
    out = tmp_path / "run"
    args = ["train", "--data", str(data), "--out", str(out), "--model", "unet-tiny"]
    args += ["--size", "32", "--epochs", "2", "--batch-size", "4", "--test-fraction", "0.34"]
    args += ["--val-fraction", "0.5", "--workers", "0"]
    assert cli(args) == 0
    printed = capsys.readouterr().out
    assert "best validation Dice" in printed
    _, meta = load_checkpoint(out / "checkpoints" / "best", classes=list(UWMGI_CLASSES))
    assert meta.model == "unet-tiny" and meta.preprocessing["size"] == 32
    assert meta.data["rows"] == {"train": 6, "val": 6, "test": 6}
    assert meta.data["split_seed"] == 0 and meta.train["epochs"] == 2
    with open(out / "log.csv") as f:
        assert len(list(csv.DictReader(f))) == 2

    assert cli([*args, "--resume"]) == 0  # a finished run resumes to nothing more
    assert "epochs" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--model", "unet-vgg19"], "unknown model 'unet-vgg19'"),  # before reading data
        (["--precision", "fp8"], "precision"),
        (["--epochs", "0"], "--epochs: 0 must be >= 1"),
        (["--test-fraction", "0.5"], "validation split: 1 case(s) left"),
    ],
)
def test_train_command_bad_input_exits_2(tmp_path, capsys, extra, message):
    data = tmp_path / "data"
    write_synthetic(data, cases=2, scans=1, slices=2)  # 2 cases: no room for val
    args = ["train", "--data", str(data), "--out", str(tmp_path / "run"), "--size", "32"]
    assert cli([*args, *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
