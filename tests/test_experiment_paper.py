"""The paper's grid as users run it: encoder weights per model, named batch sizes, the split."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from advseg.cli import main
from advseg.config import load_yaml, save_yaml
from advseg.data import DataConfig, split_cases, split_train_val_test, write_synthetic
from advseg.data.load import build_index
from advseg.data.location import run_locations
from advseg.data.record import run_data_record
from advseg.errors import UserError
from advseg.experiment import (
    AttackSpec,
    ExperimentConfig,
    ModelSpec,
    check_config,
    encoder_line,
    load_experiment,
    model_train_config,
    packaged_config,
    prepare_run_dir,
    run_experiment,
)
from advseg.models import read_checkpoint
from advseg.models.zoo import check_encoder_weights, create_model
from advseg.report import write_report
from advseg.runs.examples import load_examples
from advseg.runs.records import read_records
from advseg.stats.summary import summarize_cells
from test_experiment_run import _config, phantom  # noqa: F401 (phantom: the module's fixture)

SMALL = "smp:Unet:mobilenet_v2"  # a small encoder model (2.2M encoder parameters)
SMALL_NAME = "smp-Unet-mobilenet_v2"


@pytest.fixture(scope="module")
def encoder_file(tmp_path_factory):
    """A safetensors file of the small model's encoder weights, as smp-hub files hold them."""
    torch.manual_seed(0)
    source = create_model(SMALL)
    path = tmp_path_factory.mktemp("weights") / "mobilenet_v2.safetensors"
    save_file({k: v.contiguous() for k, v in source.encoder.state_dict().items()}, str(path))
    return path


def _grid(phantom, tmp_path, **changes) -> ExperimentConfig:  # noqa: F811
    config = _config(phantom, tmp_path)
    models = [ModelSpec(arch="unet-tiny"), ModelSpec(arch=SMALL)]
    return replace(config, models=models, **changes)


def test_encoder_weights_map_each_model_to_its_file(phantom, tmp_path, encoder_file):  # noqa: F811
    config = check_config(_grid(phantom, tmp_path, encoder_weights={SMALL_NAME: str(encoder_file)}))
    small, tiny = model_train_config(config, config.models[1]), config.models[0]
    assert small.encoder_weights == str(encoder_file) and small.model == SMALL
    assert model_train_config(config, tiny).encoder_weights is None  # absent: random init
    assert encoder_line(config) == (
        f"encoders: {SMALL_NAME} from {encoder_file}; random init: unet-tiny"
    )
    # The same file named in the model's own train changes works alike.
    per_model = replace(
        _grid(phantom, tmp_path),
        models=[ModelSpec(arch=SMALL, train={"encoder_weights": str(encoder_file)})],
    )
    assert model_train_config(per_model, per_model.models[0]).encoder_weights == str(encoder_file)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"encoder_weights": {"unet-vgg13": "w.safetensors"}}, "unet-vgg13: no model"),
        ({"encoder_weights": {SMALL_NAME: " "}}, "empty file name"),
    ],
)
def test_an_encoder_mapping_naming_no_model_is_refused(phantom, tmp_path, changes, message):  # noqa: F811
    with pytest.raises(UserError, match=message):
        check_config(_grid(phantom, tmp_path, **changes))


def test_two_ways_of_naming_one_models_weights_are_refused(phantom, tmp_path):  # noqa: F811
    mapping = {SMALL_NAME: "a.safetensors"}
    config = _grid(phantom, tmp_path, encoder_weights=mapping)
    shared = replace(config, train=replace(config.train, encoder_weights="b.safetensors"))
    with pytest.raises(UserError, match=r"train.encoder_weights: .* keep one"):
        check_config(shared)
    both = replace(
        config, models=[ModelSpec(arch=SMALL, train={"encoder_weights": "b.safetensors"})]
    )
    with pytest.raises(UserError, match=r"models\[0\].train.encoder_weights: .* keep one"):
        check_config(both)


def test_check_encoder_weights_reads_headers_only(tmp_path, encoder_file, monkeypatch):
    check_encoder_weights(SMALL, encoder_file)  # fits
    # imagenet in the cache or the hub reachable passes (offline: tests/test_faults_pretrained.py)
    monkeypatch.setattr("advseg.models.pretrained.ensure_imagenet", lambda name, encoder: True)
    check_encoder_weights(SMALL, "imagenet")
    check_encoder_weights("unet-tiny", None)
    with pytest.raises(UserError, match="no pretrained encoder"):
        check_encoder_weights("unet-tiny", encoder_file)
    with pytest.raises(UserError, match="does not match"):
        check_encoder_weights("smp:Unet:resnet18", encoder_file)  # another encoder's file
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not safetensors")
    with pytest.raises(UserError, match="not a safetensors file"):
        check_encoder_weights(SMALL, junk)


def test_a_missing_weights_file_is_one_line_before_any_training(phantom, tmp_path, capsys):  # noqa: F811
    missing = tmp_path / "nowhere" / "mobilenet_v2.safetensors"
    config = _grid(phantom, tmp_path, encoder_weights={SMALL_NAME: str(missing)})
    run_dir = tmp_path / "run"
    with pytest.raises(UserError) as caught:
        run_experiment(config, run_dir)
    assert str(caught.value) == (
        f"models[1] ({SMALL_NAME}): encoder weights: {missing}: encoder weights file not found"
    )
    assert not run_dir.exists()  # nothing written, nothing trained

    # the CLI: the packaged grid's way (--encoder-weights NAME=PATH), one line, exit 2
    path = tmp_path / "grid.yaml"
    save_yaml(_grid(phantom, tmp_path), path)
    with pytest.raises(SystemExit) as exit_info:
        main(["run", str(path), "--out", str(run_dir), "--encoder-weights", f"unet-tiny={missing}"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "models[0] (unet-tiny)" in err
    assert "has no pretrained encoder" in err and not run_dir.exists()
    with pytest.raises(SystemExit):
        main(["run", str(path), "--out", str(run_dir), "--encoder-weights", "vgg=w"])
    err = capsys.readouterr().err
    assert "--encoder-weights: encoder_weights.vgg: no model trained here" in err


def test_a_grid_trains_from_the_mapped_encoder_file(phantom, tmp_path, encoder_file):  # noqa: F811
    config = _grid(phantom, tmp_path, encoder_weights={SMALL_NAME: str(encoder_file)})
    config = replace(config, models=config.models[1:], report=False)
    path = tmp_path / "grid.yaml"
    save_yaml(config, path)
    assert load_experiment(path).encoder_weights == {SMALL_NAME: str(encoder_file)}
    run_experiment(config, tmp_path / "run")
    best = tmp_path / "run" / "models" / SMALL_NAME / "checkpoints" / "best"
    meta = read_checkpoint(best)[1]
    assert meta.train["encoder_weights"] == str(encoder_file)
    index, _ = build_index(config.data)  # the grid trained on the split advseg train makes
    split = config.split
    rows = split_train_val_test(index, split.test_fraction, split.val_fraction, split.seed)
    assert meta.data["rows"] == {
        k: len(r) for k, r in zip(["train", "val", "test"], rows, strict=True)
    }


@pytest.mark.parametrize(("name", "number"), [("text", 64), ("notebook", 16), (8, 8)])
def test_batch_size_by_name_is_recorded_as_its_number(tmp_path, name, number):
    path = tmp_path / "grid.yaml"
    path.write_text(f"train:\n  batch_size: {name}\n")
    config = load_experiment(path)
    assert config.train.batch_size == number
    assert model_train_config(config, config.models[0]).batch_size == number
    prepare_run_dir(config, tmp_path / "run")
    saved = load_yaml(tmp_path / "run" / "config.yaml")
    assert saved["train"]["batch_size"] == number  # the resolved number, where the run records
    assert load_experiment(packaged_config("paper")).train.batch_size == 16  # paper.yaml: notebook
    assert "batch_size: notebook" in packaged_config("paper").read_text()


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("txt", "train.batch_size: 'txt' is no number and no name: text (64), notebook (16)"),
        (0, "train.batch_size: 0 must be >= 1"),
        (2.5, "train.batch_size: expected an integer, got 2.5"),
    ],
)
def test_a_batch_size_neither_number_nor_name_is_one_line(tmp_path, value, message):
    path = tmp_path / "grid.yaml"
    path.write_text(f"train:\n  batch_size: {value}\n")
    with pytest.raises(UserError) as caught:
        load_experiment(path)
    assert str(caught.value) == f"{path}: {message}"


def test_the_split_is_by_case_with_validation_drawn_from_the_training_cases(tmp_path):
    path = tmp_path / "data"
    write_synthetic(path, cases=20, scans=2, slices=3, seed=0)
    index, _ = build_index(DataConfig(path=path))
    case = index["case"].to_numpy()
    assert len(set(case)) == 20 and index["scan"].nunique() == 40  # two days per case
    split = load_experiment(packaged_config("paper")).split
    assert (split.test_fraction, split.val_fraction) == (0.1, 0.1)
    for seed in range(25):
        train, val, test = split_train_val_test(
            index, split.test_fraction, split.val_fraction, seed
        )
        learn, held_out = split_cases(index, split.test_fraction, seed)
        assert np.array_equal(test, held_out)  # the test cases an evaluation recomputes
        assert set(val) <= set(learn) and set(train) <= set(learn)  # never from the test cases
        cases = [set(case[rows]) for rows in (train, val, test)]
        assert cases[0].isdisjoint(cases[1]) and cases[0].isdisjoint(cases[2])
        assert cases[1].isdisjoint(cases[2])  # no case (nor any of its days) in two parts
        assert np.array_equal(np.sort(np.r_[train, val, test]), np.arange(len(index)))
        assert [len(c) for c in cases] == [16, 2, 2]  # 10% of 20 cases; 10% of the other 18


def test_a_grid_with_seeds_reports_each_seed_and_names_the_seed_it_draws(phantom, tmp_path):  # noqa: F811
    config = replace(
        _config(phantom, tmp_path),
        seeds=[0, 1],
        attacks=[
            AttackSpec(name="fgsm", losses=["bce"], eps=[0.01]),
            AttackSpec(name="pgd", losses=["bce"], eps=[0.01], kwargs={"steps": 2}),
        ],
    )
    config.evaluation = replace(config.evaluation, trace=True)
    run_dir = tmp_path / "run"
    run_experiment(config, run_dir)
    records = read_records(run_dir)
    assert (
        load_examples(run_dir / "examples" / "unet-tiny__seed1__fgsm__eps0.01.npz")["cell"]["seed"]
        == 1
    )

    # the training table: one row per (model, seed), its validation and clean DSC
    table = pd.read_csv(run_dir / "report" / "training.csv")
    assert table["model"].tolist() == ["unet-tiny", "unet-tiny"]
    assert table["seed"].tolist() == [0, 1]
    for seed in (0, 1):
        row = table[table["seed"] == seed].iloc[0]
        best = run_dir / "models" / "unet-tiny" / f"seed{seed}" / "checkpoints" / "best"
        assert row["val_dice"] == pytest.approx(
            read_checkpoint(best)[1].metrics["best"]["val_dice"]
        )
        cells = summarize_cells(records[records["seed"] == seed], "per-class")
        assert row["dsc_clean"] == pytest.approx(cells["dsc_clean"].iloc[0])
        assert row["dsc_worst"] == pytest.approx(cells["dsc_adv"].min())
    assert table["dsc_clean"].nunique() == 2  # two trainings, two numbers
    markdown = (run_dir / "report" / "report.md").read_text()
    assert "## Training, per seed (eps 0.01)" in markdown
    assert (
        "Spread over training seeds (mean ± sd): unet-tiny over seeds 0, 1: validation" in markdown
    )

    # panels and convergence traces say which seed they show
    assert "unet-tiny (training seed 0): FGSM eps 0.01, loss bce" in markdown
    assert "(training seed 1)" not in markdown
    assert "unet-tiny: seed 0 of 0, 1" in markdown
    assert "unet-tiny, training seed 0: Dice against iteration, eps 0.01" in markdown
    convergence = pd.read_csv(run_dir / "report" / "convergence.csv")
    assert sorted(convergence["seed"]) == [0, 1]


def test_a_run_records_its_data_resolved_so_a_report_needs_no_config(
    phantom,  # noqa: F811
    tmp_path,
    monkeypatch,
):
    monkeypatch.chdir(phantom.parent)  # the data and the cache named relative to here
    config = _config(phantom, tmp_path)
    config.data = replace(config.data, path=Path(phantom.name), cache_dir=Path("cache"))
    config = replace(config, attacks=[AttackSpec(name="fgsm", losses=["bce"], eps=[0.01])])
    run_dir = tmp_path / "run"
    run_experiment(config, run_dir)
    saved = json.loads((run_dir / "data.json").read_text())
    assert saved["locations"] == [str(phantom.resolve())]
    assert saved["config"]["path"] == str(phantom.resolve())
    assert saved["config"]["cache_dir"] == str(phantom.parent.absolute() / "cache")
    assert saved["cache"].startswith(saved["config"]["cache_dir"] + "/")
    assert saved["classes"] == ["large_bowel", "small_bowel", "stomach"]
    assert saved["labels"] is None and saved["slices"] == 36 and saved["fingerprint"]
    fingerprint = saved["fingerprint"]

    (run_dir / "config.yaml").unlink()  # the report knows the data from data.json alone
    monkeypatch.chdir(tmp_path)
    assert run_locations(run_dir) == [str(phantom.resolve())]
    markdown = write_report(run_dir).markdown.read_text()
    assert f"| data | {phantom.resolve()} |" in markdown
    assert "| classes | large_bowel, small_bowel, stomach |" in markdown

    # a resume on the same data rewrites the record
    save_yaml(config, run_dir / "config.yaml")
    monkeypatch.chdir(phantom.parent)
    run_experiment(config, run_dir)
    assert json.loads((run_dir / "data.json").read_text())["fingerprint"] == fingerprint


class _Loaded(list):
    """Stand-in for a loaded data set: its length, classes and cache entry."""

    classes = ("liver",)
    cache_path = Path("cache/entry")


def test_the_data_record_names_the_phantom_by_its_word_and_nifti_labels_by_their_file(tmp_path):
    record = run_data_record(_Loaded([0, 0]), DataConfig(path="synthetic"))
    assert record["locations"] == ["synthetic"] and record["config"]["path"] == "synthetic"
    assert record["slices"] == 2 and record["labels"] is None
    assert record["cache"] == str(Path("cache/entry").absolute())
    (tmp_path / "dataset.json").write_text("{}")
    assert run_data_record(_Loaded(), DataConfig(path=tmp_path))["labels"] == str(
        tmp_path / "dataset.json"
    )
    labels = tmp_path / "labels.json"
    record = run_data_record(_Loaded(), DataConfig(path=tmp_path, nifti_labels_file=labels))
    assert record["labels"] == str(labels)
