"""The experiment runner end to end with real tiny pieces: phantom, unet-tiny, FGSM, report."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from advseg.data import DataConfig, PreprocessConfig, write_synthetic
from advseg.errors import UserError
from advseg.evaluate import EvaluateConfig, evaluate
from advseg.experiment import (
    AttackSpec,
    EvaluationSpec,
    ExperimentConfig,
    ModelSpec,
    SplitSpec,
    load_experiment,
    packaged_config,
    run_experiment,
)
from advseg.runs.examples import load_examples
from advseg.runs.records import read_records
from advseg.train import TrainConfig


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    path = tmp_path_factory.mktemp("phantom") / "data"
    write_synthetic(path, cases=3, scans=1, slices=12, seed=0)
    return path


def _config(phantom, tmp_path) -> ExperimentConfig:
    return ExperimentConfig(
        name="tiny",
        data=DataConfig(
            path=phantom, cache_dir=tmp_path / "cache", preprocess=PreprocessConfig(size=32)
        ),
        split=SplitSpec(test_fraction=0.34, val_fraction=0.5),
        train=TrainConfig(epochs=1, batch_size=4, device="cpu", augment=_no_augment()),
        models=[ModelSpec(arch="unet-tiny")],
        attacks=[AttackSpec(name="fgsm", losses=["bce", "focal"], eps=[0.01, 0.03])],
        evaluation=EvaluationSpec(batch_size=4, examples=1, protocol="per-class"),
    )


def _no_augment():
    from advseg.augment import AugmentConfig

    return AugmentConfig(enabled=False)


def test_run_writes_everything_and_resumes_without_retraining(phantom, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    monkeypatch.chdir(tmp_path)
    config = _config(phantom, tmp_path)
    first = run_experiment(config, run_dir)
    assert first.trained == ["unet-tiny"]
    assert first.grid.computed == ["unet-tiny__fgsm__eps0.01", "unet-tiny__fgsm__eps0.03"]
    assert (run_dir / "models" / "unet-tiny" / "checkpoints" / "best.safetensors").exists()
    records = read_records(run_dir)
    assert set(records["loss"]) == {"bce", "focal"} and set(records["eps"]) == {0.01, 0.03}
    assert (records["linf"] <= 0.03 + 1e-6).all()
    examples = load_examples(run_dir / "examples" / "unet-tiny__fgsm__eps0.01.npz")
    assert examples["image"].shape[0] == 1 and examples["cell"]["model"] == "unet-tiny"
    summary = pd.read_csv(run_dir / "summary.csv")
    assert summary["model"].tolist() == ["unet-tiny"]
    assert first.report is not None and first.report.html.exists()
    assert load_experiment(run_dir / "config.yaml") == config  # the resolved config round-trips

    # `advseg run --cache-dir`: another cache is no other experiment; the run resumes, using it.
    from advseg.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["run", str(run_dir / "config.yaml"), "--out", str(run_dir), "--cache-dir", "c2"])
    assert exit_info.value.code == 0
    assert len(list(Path("c2").iterdir())) == 1  # the arrays, decoded into the new cache
    assert load_experiment(run_dir / "config.yaml").data.cache_dir == Path("c2").absolute()
    sessions = json.loads((run_dir / "provenance.json").read_text())["sessions"]
    assert [s["command"] for s in sessions] == ["advseg run", "advseg run"]  # run, resumed
    assert sessions[0]["argv"].startswith("(Python API) ") and sessions[0]["device"] == "cpu"
    assert sessions[1]["argv"].endswith(f"--out {run_dir} --cache-dir c2")

    # Its checkpoint, evaluated on its own, finds the experiment's data and held-out cases.
    best = run_dir / "models" / "unet-tiny" / "checkpoints" / "best"
    alone = evaluate(
        EvaluateConfig(
            checkpoints=[best], out=tmp_path / "alone", losses=["bce"], eps=[0.01], device="cpu"
        )
    )
    assert alone.slices["unet-tiny"] >= records["slice_id"].nunique()  # all its test slices
    assert set(read_records(tmp_path / "alone")["case"]) == set(records["case"])

    # Loaded by another experiment: evaluated on the same cases, refused under another split.
    loaded = _config(phantom, tmp_path)
    loaded.models = [ModelSpec(name="loaded", checkpoint=best)]
    reused = run_experiment(loaded, tmp_path / "loaded")
    assert reused.trained == [] and len(reused.grid.computed) == 2
    assert set(read_records(tmp_path / "loaded")["slice_id"]) == set(records["slice_id"])
    loaded.split = SplitSpec(test_fraction=0.34, val_fraction=0.5, seed=1)
    with pytest.raises(UserError, match=r"trained with data\.split_seed 0.*split has 1"):
        run_experiment(loaded, tmp_path / "loaded-other-split")

    # Interrupted after the first cell: only the missing cell is redone, nothing retrained.
    (run_dir / "records" / "unet-tiny__fgsm__eps0.03.parquet").unlink()
    second = run_experiment(config, run_dir)
    assert second.trained == []
    assert second.grid.computed == ["unet-tiny__fgsm__eps0.03"]
    assert second.grid.skipped == ["unet-tiny__fgsm__eps0.01"]
    again = read_records(run_dir)
    pd.testing.assert_frame_equal(
        again.sort_values(["eps", "loss", "slice_id", "class"]).reset_index(drop=True),
        records.sort_values(["eps", "loss", "slice_id", "class"]).reset_index(drop=True),
    )  # the same numbers as the uninterrupted run


def test_the_same_config_in_a_fresh_run_directory_gives_the_same_records(phantom, tmp_path):
    config = _config(phantom, tmp_path)
    config.attacks = [AttackSpec(name="fgsm", losses=["bce"], eps=[0.01])]
    first = read_records(run_experiment(config, tmp_path / "a").run_dir)
    second = read_records(run_experiment(config, tmp_path / "b").run_dir)
    assert first["dice_clean"].sum() > 0
    pd.testing.assert_frame_equal(first, second)  # training included: seeded from the config


def test_shipped_experiments_load():
    demo = load_experiment(packaged_config("demo"))
    assert [m.arch for m in demo.models] == ["unet"]
    assert demo.attacks[0].losses == ["bce", "focal", "dicefocal"]
    paper = load_experiment(packaged_config("paper.yaml"))
    assert [m.arch for m in paper.models] == [
        "unet",
        "unet-vgg13",
        "unet-resnext101",
        "unet-effb7",
        "unetpp-effb7",
    ]
    assert paper.data.preprocess.size == 224 and paper.train.epochs == 15
    assert paper.attacks[0].eps == [0.009] and len(paper.attacks[1].eps) > 2
