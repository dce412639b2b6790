"""Garbage in is refused, failures of the machine are one line (issue 13, per class of fault).

Every case answers with one line naming the file, row, key or option, and computes nothing on
the garbage. The data cases live in the corpus (``data_corpus.py``, ``test_data_errors.py``);
these are the rest: NIfTI values, options and YAML keys, checkpoints, caches, full disks.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from advseg.cli import main
from advseg.config import load_yaml
from advseg.data import DataConfig, PreprocessConfig, load_data, read_nifti
from advseg.errors import AdvsegWarning, UserError
from advseg.experiment import check_data_fingerprint, load_experiment
from advseg.models import create_model, metadata_for, read_checkpoint
from advseg.models.checkpoint import checkpoint_files, save_checkpoint
from data_corpus import DAMAGES, copy_of, damage_cache_entry, nifti_pair, tiny_synthetic
from test_train import CLASSES, Blobs, tiny_config
from test_train import run as train_blobs


def _one_line(argv, capfd) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    out, err = capfd.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err + out, err
    return lines[0]


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return tiny_synthetic(tmp_path_factory.mktemp("faults"), cases=3, scans=1, slices=4)


# --- numbers that are not numbers -------------------------------------------------------------


def _volume():
    rng = np.random.default_rng(0)
    label = np.zeros((8, 6, 3), np.float32)
    label[2:5, 1:4, 1] = 1
    return rng.random((8, 6, 3)).astype(np.float32), label


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_nifti_voxels_are_refused_naming_file_and_count(tmp_path, capfd, bad):
    image, label = _volume()
    image[0, 0, 0] = image[1, 2, 2] = bad
    nifti_pair(tmp_path, image, label)
    line = _one_line(["data", "info", str(tmp_path), "--labels", "1=organ", "--check"], capfd)
    assert "imagesTr/vol_001.nii.gz: 2 of 144 voxels are not finite numbers" in line


def test_fractional_nifti_labels_are_refused(tmp_path):
    image, label = _volume()
    label[3, 3, 2] = 1.4
    nifti_pair(tmp_path, image, label)
    with pytest.raises(UserError, match=r"vol_001.nii.gz: 1 voxels hold non-integer labels \(e.g"):
        read_nifti(tmp_path, {1: "organ"})


TRAIN = ["train", "--size", "16", "--epochs", "1", "--model", "unet-tiny"]


@pytest.mark.parametrize(
    ("option", "said"),
    [
        (["--lr", "nan"], "--lr: expected a finite number, got nan"),
        (["--lr", "inf"], "--lr: expected a finite number, got inf"),
        (["--weight-decay", "-inf"], "--weight-decay: expected a finite number"),
        (["--val-fraction", "0"], "--val-fraction: 0.0 must lie in (0, 1)"),
        (["--test-fraction", "nan"], "--test-fraction: nan must lie in (0, 1)"),
        (["--device", "tpu"], "--device: 'tpu' is not a device"),
    ],
)
def test_bad_train_options_name_the_option_typed(synth, tmp_path, capfd, option, said):
    out = tmp_path / "run"
    line = _one_line([*TRAIN, "--data", str(synth), "--out", str(out), *option], capfd)
    assert said in line
    assert not out.exists()


@pytest.mark.parametrize("where", ["is a file", "under a file"])
def test_a_train_output_that_cannot_be_a_directory_is_refused_first(synth, tmp_path, capfd, where):
    (tmp_path / "taken").write_text("a file")
    out = tmp_path / "taken" if where == "is a file" else tmp_path / "taken" / "run"
    line = _one_line([*TRAIN, "--data", str(synth), "--out", str(out)], capfd)
    assert "taken" in line and "training output directory" in line


@pytest.mark.parametrize(
    ("yaml_text", "said"),
    [
        ("train:\n  threshold: 2.0\n", "train.threshold: 2.0 must lie in (0, 1)"),
        ("train:\n  lr: .nan\n", "train.lr: expected a finite number, got nan"),
        ("attacks:\n  - name: fgsm\n    eps: [.inf]\n", "attacks[0].eps[0]: expected a finite"),
        ("evaluation:\n  examples: -1\n", "evaluation.examples: -1 must be 0 or more"),
        ("seed: 1\nname: a\nseed: 2\n", "line 3: key 'seed' repeated (first on line 1)"),
        ("split:\n  seed: abc\n", "split.seed: expected an integer, got 'abc'"),
    ],
)
def test_bad_yaml_keys_are_refused(tmp_path, yaml_text, said):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml_text)
    with pytest.raises(UserError) as err:
        load_experiment(path)
    assert str(err.value).startswith(str(path)) and said in str(err.value)


def test_duplicate_keys_are_refused_at_any_depth(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text("train:\n  lr: 0.1\n  epochs: 2\n  lr: 0.2\n")
    with pytest.raises(UserError, match=r"t.yaml: line 4: key 'lr' repeated \(first on line 2\)"):
        load_yaml(path)


def test_a_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path):
    class PoisonedAfter(Blobs):
        """Clean for the first epoch (12 reads), then a NaN pixel in every image."""

        reads = 0

        def __getitem__(self, i):
            item = super().__getitem__(i)
            self.reads += 1
            if self.reads > 12:
                item["image"][0, 0, 0] = float("nan")
            return item

    with pytest.raises(UserError, match=r"epoch 2: the loss is no longer a finite number"):
        train_blobs(tmp_path, tiny_config(epochs=3), train_set=PoisonedAfter(12))
    _, meta, _ = read_checkpoint(tmp_path / "checkpoints" / "last")
    assert meta.epoch == 1  # the NaN epoch saved nothing


# --- data changed under a run -----------------------------------------------------------------


def test_a_resume_on_other_data_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    first = SimpleNamespace(cache_path=tmp_path / "cache" / "aaaa")
    config = DataConfig(path="synthetic")
    check_data_fingerprint(run_dir, _Sized(first, 4), config)
    (run_dir / "records").mkdir()
    (run_dir / "records" / "cell.parquet").write_bytes(b"finished")
    check_data_fingerprint(run_dir, _Sized(first, 4), config)  # the same data resumes
    other = SimpleNamespace(cache_path=tmp_path / "cache" / "bbbb")
    with pytest.raises(UserError, match=r"data.json: the data changed .*aaaa, now bbbb"):
        check_data_fingerprint(run_dir, _Sized(other, 4), config)


class _Sized:
    def __init__(self, inner, n):
        from advseg.data import BASE_COLUMNS, PreprocessConfig

        self.cache_path, self.n, self.classes = inner.cache_path, n, []
        self.index, self.preprocess = pd.DataFrame(columns=BASE_COLUMNS), PreprocessConfig()

    def __len__(self):
        return self.n


def test_a_training_resume_on_other_data_is_refused(tmp_path):
    from advseg.train import train

    def go(fingerprint, resume):
        torch.manual_seed(0)
        return train(create_model("unet-tiny", in_channels=3, classes=2), Blobs(8), Blobs(4),
                     tiny_config(epochs=1), tmp_path, classes=CLASSES,
                     data={"fingerprint": fingerprint}, resume=resume)  # fmt: skip

    go("aaaa", resume=False)
    with pytest.raises(UserError, match=r"last.json: the data changed .*aaaa, now bbbb"):
        go("bbbb", resume=True)


# --- checkpoints ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "said"),
    [
        ("split_seed", "abc", "meta.data.split_seed: expected an integer, got 'abc'"),
        ("test_fraction", 1.5, "meta.data.test_fraction: expected a number in (0, 1)"),
    ],
)
def test_a_bad_checkpoint_field_names_the_file(tmp_path, field, value, said):
    model = create_model("unet-tiny")
    meta = metadata_for(model, ["a", "b", "c"], data={field: value})
    save_checkpoint(tmp_path / "best", model, meta)
    with pytest.raises(UserError) as err:
        read_checkpoint(tmp_path / "best")
    assert str(err.value).startswith(str(tmp_path / "best.json")) and said in str(err.value)


def test_a_torn_pair_is_read_from_the_previous_complete_save(tmp_path):
    model = create_model("unet-tiny")
    meta = metadata_for(model, ["a", "b", "c"])
    meta.epoch = 1
    save_checkpoint(tmp_path / "last", model, meta)
    weights, json_file = checkpoint_files(tmp_path / "last")
    os.link(weights, tmp_path / "last.prev.safetensors")  # as a save keeps the previous pair
    os.link(json_file, tmp_path / "last.prev.json")
    meta.epoch = 2
    save_checkpoint(tmp_path / "torn", model, meta)
    os.replace(tmp_path / "torn.safetensors", weights)  # the new weights in, the JSON not yet
    with pytest.warns(AdvsegWarning, match="the last save was interrupted"):
        _, read, _ = read_checkpoint(tmp_path / "last")
    assert read.epoch == 1


def test_a_full_disk_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model = create_model("unet-tiny")
    meta = metadata_for(model, ["a", "b", "c"])
    save_checkpoint(tmp_path / "last", model, meta)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("advseg.models.checkpoint.save_file", full)
    with pytest.raises(UserError, match=r"last.safetensors: cannot write \(no space left"):
        save_checkpoint(tmp_path / "last", model, meta)
    monkeypatch.undo()
    read_checkpoint(tmp_path / "last")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.json", "last.safetensors"]


# --- the data cache ---------------------------------------------------------------------------


def _data_config(root):
    return DataConfig(path=root, cache_dir=root / "cache", preprocess=PreprocessConfig(size=16))


@pytest.mark.parametrize("how", DAMAGES)
def test_a_damaged_cache_entry_is_said_and_rebuilt(synth, tmp_path, how):
    root = copy_of(synth, tmp_path / "d")
    first = load_data(_data_config(root))
    images = np.array(first.images)
    damage_cache_entry(first.cache_path, how)
    with pytest.warns(AdvsegWarning, match="damaged cache entry"):
        again = load_data(_data_config(root))
    assert again.decoded == len(images)
    np.testing.assert_array_equal(again.images, images)
    assert [p.name for p in (root / "cache").iterdir()] == [first.cache_path.name]


def test_a_killed_cache_build_is_cleaned_up_by_the_next(synth, tmp_path):
    root = copy_of(synth, tmp_path / "d")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    partial = root / "cache" / f".0123456789abcdef01234567.{int(dead.stdout)}.x1y2z3ab.tmp"
    partial.mkdir(parents=True)
    (partial / "images.npy").write_bytes(b"half")
    load_data(_data_config(root))
    assert not partial.exists()


def test_a_full_disk_while_building_the_cache_is_one_line(synth, tmp_path, monkeypatch):
    root = copy_of(synth, tmp_path / "d")

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("advseg.data.cache.os.posix_fallocate", full)
    with pytest.raises(UserError, match=r"cache/\w+: cannot write the cache \(no space left"):
        load_data(_data_config(root))
    assert list((root / "cache").iterdir()) == []  # no partial entry left


@pytest.mark.parametrize(
    "argv",
    [
        ["data", "synth", "--cases", "1", "--slices", "1", "--out"],
        ["report", "--out"],  # RUN_DIR comes after
    ],
)
def test_other_outputs_under_a_file_are_one_line(tmp_path, capfd, argv):
    (tmp_path / "taken").write_text("a file")
    out = str(tmp_path / "taken" / "x")
    if argv[0] == "report":
        from advseg.runs.records import write_records
        from test_records import _frame

        write_records(_frame(1), tmp_path / "run" / "records" / "cell.parquet")
        argv = [*argv, out, str(tmp_path / "run")]
    else:
        argv = [*argv, out]
    line = _one_line(argv, capfd)
    assert "taken" in line and "is a file" in line
