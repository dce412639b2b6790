import csv
import json
from pathlib import Path

import pytest

from advseg.cli import main
from advseg.data import UWMGI_CLASSES, PreprocessConfig, cache_key, read_uwmgi, write_synthetic
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


def test_train_command_on_a_small_synthetic_set(tmp_path, capsys, monkeypatch):
    data = tmp_path / "data"
    write_synthetic(data, cases=3, scans=1, slices=6)
    out = tmp_path / "run"
    monkeypatch.chdir(tmp_path)  # --data as typed, relative: the checkpoint stores it resolved
    monkeypatch.setenv("ADVSEG_PROGRESS_SECONDS", "0")  # captured output is no terminal
    common = ["train", "--out", str(out), "--model", "unet-tiny", "--size", "32"]
    args = [*common, "--data", "data", "--epochs", "2", "--batch-size", "4"]
    args += ["--test-fraction", "0.34", "--val-fraction", "0.5", "--workers", "0"]
    assert cli(args) == 0
    printed = capsys.readouterr().out
    assert printed.splitlines()[0] == f"data: {data.resolve()}"
    assert "best validation Dice" in printed
    assert "epoch 1/2 train: 1/2 batches (50%)" in printed and "ETA 0:00:" in printed  # piped
    assert "(1 epochs left at most)" in printed  # the whole training's ETA after epoch 1
    _, meta = load_checkpoint(out / "checkpoints" / "best", classes=list(UWMGI_CLASSES))
    assert meta.model == "unet-tiny" and meta.preprocessing["size"] == 32
    assert meta.data["rows"] == {"train": 6, "val": 6, "test": 6}
    assert meta.data["split_seed"] == 0 and meta.train["epochs"] == 2
    assert meta.data["config"]["path"] == str(data.resolve())
    with open(out / "log.csv") as f:
        assert len(list(csv.DictReader(f))) == 2

    assert cli([*args, "--resume"]) == 0  # a finished run resumes to nothing more
    assert "epochs" in capsys.readouterr().out
    assert cli([*common, "--resume"]) == 2  # no --data: the line names the run's data set
    err = capsys.readouterr().err
    assert f"trained on {data.resolve()}: pass --data {data.resolve()}" in err

    # A run begun before paths were resolved saved the key of its relative image paths: it
    # resumes; a fingerprint of other data is refused.
    spelt = cache_key(read_uwmgi(Path("data"))[0], PreprocessConfig(size=32), content=False)
    for fingerprint, code in ((spelt, 0), ("0" * 24, 2)):
        last = out / "checkpoints" / "last.json"
        document = json.loads(last.read_text())
        document["meta"]["data"]["fingerprint"] = fingerprint
        last.write_text(json.dumps(document))
        assert cli([*args, "--resume"]) == code
    assert "the data changed since this run trained on it" in capsys.readouterr().err


def test_train_without_data_is_refused_naming_both_choices(tmp_path, capsys):
    assert cli(["train", "--out", str(tmp_path / "run"), "--model", "unet-tiny"]) == 2
    err = capsys.readouterr().err
    assert "--data PATH" in err and "--data synthetic" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("extra", "said"),
    [
        (["--adv-train", "pgdd"], "--adv-train: unknown adversarial training method 'pgdd'"),
        (["--select-by", "robst"], "--select-by: 'robst' is not one of"),
        (["--adv-train", "pgd", "--adv-eps", "-1"], "--adv-eps: eps must be a finite number"),
        (["--precision", "fp33"], "--precision: 'fp33' is not one of"),
    ],
)
def test_a_bad_setting_names_the_option_typed(tmp_path, capsys, extra, said):
    args = ["train", "--out", str(tmp_path / "run"), "--data", "synthetic"]
    assert cli([*args, "--cache-dir", str(tmp_path / "cache"), *extra]) == 2
    assert capsys.readouterr().err.startswith(f"error: {said}")
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()


def test_train_on_the_phantom_says_so_first_and_stores_it(tmp_path, capsys, monkeypatch):
    import advseg.data.synth as synth_module

    real = synth_module.write_synthetic

    def small(out, overwrite=False):
        return real(out, cases=3, scans=1, slices=4, overwrite=overwrite)

    monkeypatch.setattr(synth_module, "write_synthetic", small)
    out, cache = tmp_path / "run", tmp_path / "cache"
    args = ["train", "--data", "synthetic", "--cache-dir", str(cache), "--out", str(out)]
    args += ["--model", "unet-tiny", "--size", "32", "--epochs", "1", "--batch-size", "4"]
    args += ["--test-fraction", "0.34", "--val-fraction", "0.5", "--workers", "0"]
    assert cli(args) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("data: the synthetic phantom (generated images, not patient data)")
    assert (cache / "synthetic" / "train.csv").is_file()
    _, meta = load_checkpoint(out / "checkpoints" / "best")
    assert meta.data["config"]["path"] == "synthetic"
    assert meta.data["config"]["cache_dir"] == str(cache)


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


def test_train_on_nifti_with_labels_and_strict_labels(tmp_path, capsys):
    from advseg.data import write_synthetic_nifti

    data = tmp_path / "ct"
    write_synthetic_nifti(data, cases=3, slices=6, size=(40, 32), seed=0)
    out = tmp_path / "run"
    args = ["train", "--data", str(data), "--out", str(out), "--model", "unet-tiny"]
    args += ["--size", "32", "--epochs", "1", "--batch-size", "4", "--test-fraction", "0.34"]
    args += ["--val-fraction", "0.5", "--workers", "0"]
    # the liver and spleen only: the kidneys (3, 4) are background, counted and kept in the
    # checkpoint; --strict-labels refuses them before any training
    assert cli([*args, "--labels", "1=liver,2=spleen", "--strict-labels"]) == 2
    err = capsys.readouterr().err
    assert "abct_001.nii.gz: label values not in the label mapping" in err and "3 (" in err
    assert not (out / "checkpoints").exists()
    assert cli([*args, "--labels", "1=liver,2=spleen"]) == 0
    captured = capsys.readouterr()
    assert "made background: 3 (" in captured.out + captured.err
    _, meta = load_checkpoint(out / "checkpoints" / "best", classes=["liver", "spleen"])
    assert meta.data["config"]["nifti_labels"] == {"1": "liver", "2": "spleen"}
    assert any("made background" in line for line in meta.data["excluded"])
    assert meta.preprocessing["resize"] == "pad"  # the default for non-square slices
    # without --labels the dataset.json's four organs are used
    assert cli([*args, "--out", str(tmp_path / "run2"), "--resize", "stretch"]) == 0
    _, meta = load_checkpoint(tmp_path / "run2" / "checkpoints" / "best")
    assert meta.classes == ["liver", "spleen", "kidney_left", "kidney_right"]
    assert meta.preprocessing["resize"] == "stretch"
    # resumed with the other resize (the default pad): one line saying what to pass
    assert cli([*args, "--out", str(tmp_path / "run2"), "--resume"]) == 2
    assert "resume with --resize stretch" in capsys.readouterr().err


def test_batch_size_takes_the_papers_names(tmp_path, capsys):
    from advseg.cli.train import _batch_size

    assert [_batch_size(v) for v in ("notebook", "text", "32", None)] == [
        "notebook",
        "text",
        32,
        None,
    ]
    args = ["train", "--out", str(tmp_path / "run"), "--data", "synthetic", "--batch-size"]
    assert cli([*args, "sixteen"]) == 2
    said = capsys.readouterr().err.strip()
    assert said == (
        "error: --batch-size: 'sixteen' is no whole number and no name: text (64), notebook (16)"
    )
    assert not (tmp_path / "run").exists()
