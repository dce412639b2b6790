"""Limits before work (issue 25): files nested thousands of levels deep, text that is not UTF-8,
sizes and counts beyond reason are refused in one line, before any decoding or computing."""

from __future__ import annotations

import json

import numpy as np
import pytest

from advseg.cli import main
from advseg.config import MAX_DEPTH, check_depth, load_yaml, read_json
from advseg.data import dataset_json_labels, parse_label_map
from advseg.errors import UserError
from advseg.experiment import load_experiment
from advseg.models.checkpoint import read_checkpoint


def _one_line(argv, capfd) -> str:
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    out, err = capfd.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err + out, err
    return lines[0]


# --- nesting ----------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [3_000, 100_000])
@pytest.mark.parametrize("style", ["flow", "block"])
def test_a_deeply_nested_yaml_experiment_is_refused(tmp_path, depth, style):
    path = tmp_path / "deep.yaml"
    if style == "flow":
        path.write_text("models: " + "[" * depth + "]" * depth + "\n")
    else:
        depth = min(depth, 3_000)  # indentation grows as depth squared
        path.write_text("".join(f"{' ' * i}k{i}:\n" for i in range(depth)) + " " * depth + "x\n")
    with pytest.raises(UserError, match=f"deep.yaml: nested more than {MAX_DEPTH} levels deep"):
        load_experiment(path)


@pytest.mark.parametrize("depth", [3_000, 100_000])
def test_a_deeply_nested_json_is_refused(tmp_path, depth):
    path = tmp_path / "dataset.json"
    path.write_text('{"labels": ' + "[" * depth + "]" * depth + "}")
    with pytest.raises(UserError, match=f"dataset.json: nested more than {MAX_DEPTH} levels"):
        dataset_json_labels(tmp_path)


def test_a_deeply_nested_checkpoint_json_is_refused(tmp_path):
    (tmp_path / "c.safetensors").write_bytes(b"")
    (tmp_path / "c.json").write_text('{"meta": ' + "{" * 0 + "[" * 5000 + "]" * 5000 + "}")
    with pytest.raises(UserError, match=r"c.json: nested more than 64 levels deep"):
        read_checkpoint(tmp_path / "c")


def test_nesting_up_to_the_limit_is_read():
    value: list = []
    for _ in range(MAX_DEPTH - 1):
        value = [value]
    assert check_depth(value, "x") is value
    with pytest.raises(UserError, match="x: nested more than"):
        check_depth([value], "x")


def test_the_cli_says_a_deep_experiment_in_one_line(tmp_path, capfd):
    path = tmp_path / "deep.yaml"
    path.write_text("models: " + "[" * 50_000 + "]" * 50_000 + "\n")
    line = _one_line(["run", str(path), "--out", str(tmp_path / "runs")], capfd)
    assert "deep.yaml: nested more than 64 levels deep" in line


# --- encodings --------------------------------------------------------------------------------


def test_a_latin1_dataset_json_is_refused_naming_the_byte(tmp_path):
    (tmp_path / "dataset.json").write_bytes('{"labels": {"1": "f\xe9mur"}}'.encode("latin-1"))
    with pytest.raises(UserError, match=r"dataset.json: not UTF-8 text \(byte 0xe9 at offset 19"):
        dataset_json_labels(tmp_path)


def test_a_latin1_yaml_is_refused(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(UserError, match=r"t.yaml: not UTF-8 text"):
        load_yaml(path)


def test_a_labels_file_that_is_not_json_is_one_line(tmp_path):
    path = tmp_path / "labels.json"
    path.write_text("{1: liver")
    with pytest.raises(UserError, match=r"labels.json: not valid JSON"):
        parse_label_map(str(path))


def test_read_json_reads_what_it_should(tmp_path):
    path = tmp_path / "ok.json"
    path.write_text(json.dumps({"a": [1, {"b": np.pi}]}))
    assert read_json(path) == {"a": [1, {"b": np.pi}]}


# --- outputs, labels, checkpoint fields -------------------------------------------------------


def test_stdout_to_a_full_device_is_one_line():
    import os
    import subprocess
    import sys
    from pathlib import Path

    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src, "PYTHONWARNINGS": "ignore"}
    with open("/dev/full", "w") as full:
        done = subprocess.run([sys.executable, "-m", "advseg", "models"], stdout=full,
                              stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines == ["error: cannot write the output (stdout): no space left on the device"]


def test_a_label_value_named_twice_is_refused():
    with pytest.raises(UserError, match=r"--labels: label 1 named twice \(liver, spleen\)"):
        parse_label_map("1=liver,1=spleen")
    assert parse_label_map("1=liver,1=liver") == {1: "liver"}


@pytest.mark.parametrize(
    ("edit", "said"),
    [
        (lambda m: m["train"].update(seed="abc"), "meta.train.seed: expected a whole-number seed"),
        (lambda m: m["train"].update(seed=-1), "meta.train.seed: -1 is not a seed"),
        (lambda m: m.update(epoch=-1), "meta.epoch: -1 must be 0 or more"),
    ],
)
def test_checkpoint_fields_out_of_range_are_refused(tmp_path, edit, said):
    import torch

    from advseg.models import create_model, metadata_for
    from advseg.models.checkpoint import save_checkpoint

    torch.manual_seed(0)
    model = create_model("unet-tiny")
    save_checkpoint(tmp_path / "c", model, metadata_for(model, ["a", "b", "c"], train={"seed": 0}))
    document = json.loads((tmp_path / "c.json").read_text())
    edit(document["meta"])
    (tmp_path / "c.json").write_text(json.dumps(document))
    with pytest.raises(UserError, match=f"c.json: {said}"):
        read_checkpoint(tmp_path / "c")


def test_two_checkpoints_of_one_name_are_refused_before_anything_is_written(tmp_path, capfd):
    for folder in ("x", "y"):
        (tmp_path / folder).mkdir()
    out = tmp_path / "eval"
    argv = ["evaluate", str(tmp_path / "x" / "tiny"), str(tmp_path / "y" / "tiny")]
    line = _one_line([*argv, "--out", str(out), "--device", "cpu"], capfd)
    assert "is also named 'tiny'" in line and not out.exists()
