"""Case-level cross-validation (issue 26): ``--folds K`` trains K models through the one training
path, every case is the test case of exactly one of them (stored in its checkpoint), and their
records pool as one model's with the fold named."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from advseg.cli import main
from advseg.data import fold_train_val_test, held_out_rows, load_data, write_synthetic
from advseg.data.load import DataConfig
from advseg.data.preprocess import PreprocessConfig
from advseg.errors import UserError
from advseg.models import load_checkpoint
from advseg.runs.records import read_records


def cli(args: list[str]) -> int:
    with pytest.raises(SystemExit) as exit_:
        main(args)
    return exit_.value.code


def _index(cases: int, slices: int = 3) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "case": np.repeat(np.arange(cases), slices),
            "id": [f"c{c}_s{s}" for c in range(cases) for s in range(slices)],
        }
    )


def test_folds_test_every_case_exactly_once_and_never_train_on_it():
    index = _index(7)
    tested = []
    for fold in range(3):
        train, val, test = fold_train_val_test(index, 3, fold, val_fraction=0.2, seed=1)
        sides = [set(index["case"].iloc[rows]) for rows in (train, val, test)]
        assert all(sides) and sum(map(len, sides)) == len(set.union(*sides))  # disjoint
        assert len(train) + len(val) + len(test) == len(index)
        tested += list(index["case"].iloc[test].unique())
    assert sorted(tested) == list(range(7))  # each case tested once
    again = fold_train_val_test(index, 3, 2, val_fraction=0.2, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(again, (train, val, test), strict=True))


@pytest.mark.parametrize(
    ("cases", "folds", "fold", "said"),
    [
        (3, 4, 0, "folds: 4 folds need at least 4 cases"),
        (5, 1, 0, "folds: need 2 or more folds"),
        (5, 2, 2, "fold: 2 is not one of 0..1"),
        (3, 3, 0, "leaves 2 case"),  # passes: 2 cases left
        (2, 2, 0, "fold 0 of 2 leaves 1 case for training and validation"),
    ],
)
def test_impossible_folds_are_refused_in_one_line(cases, folds, fold, said):
    index = _index(cases)
    if said == "leaves 2 case":
        fold_train_val_test(index, folds, fold)
        return
    with pytest.raises(UserError, match=said) as err:
        fold_train_val_test(index, folds, fold)
    assert "\n" not in str(err.value)


@pytest.fixture(scope="module")
def folded(tmp_path_factory):
    """``advseg train --folds 3`` on a 5-case phantom (tiny model, 1 epoch), then
    ``advseg evaluate`` of the three fold checkpoints."""
    root = tmp_path_factory.mktemp("folds")
    data = root / "data"
    write_synthetic(data, cases=5, scans=1, slices=4)
    out = root / "cv"
    args = ["train", "--out", str(out), "--data", str(data), "--model", "unet-tiny"]
    args += ["--size", "32", "--epochs", "1", "--batch-size", "4", "--folds", "3"]
    args += ["--val-fraction", "0.3", "--no-augment"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ADVSEG_PROGRESS_SECONDS", "0")
        code = cli(args)
    assert code == 0
    evaluated = root / "eval"
    checkpoints = [str(out / f"fold{k}" / "checkpoints" / "best") for k in range(3)]
    args = ["evaluate", *checkpoints, "--out"]
    args += [str(evaluated), "--attack", "fgsm", "--eps", "0.01", "--loss", "bce"]
    args += ["--batch-size", "8", "--examples", "0"]
    code = cli(args)
    assert code == 0
    return data, out, evaluated


def test_train_folds_store_each_folds_test_cases(folded, capsys):
    data, out, _ = folded
    index = load_data(DataConfig(path=data, preprocess=PreprocessConfig(size=32))).index
    tested = []
    for k in range(3):
        _, meta = load_checkpoint(out / f"fold{k}" / "checkpoints" / "best")
        assert meta.data["folds"] == {"fold": k, "folds": 3}
        assert "test_fraction" not in meta.data
        cases = meta.data["split"]["cases"]
        assert not set(cases["test"]) & set(cases["train"] + cases["val"])
        rows = held_out_rows(index, meta.data, f"fold{k}")  # the checkpoint's own test cases
        assert sorted(index["case"].iloc[rows].unique()) == cases["test"]
        tested += cases["test"]
    assert sorted(tested) == sorted(index["case"].unique())  # every case once


def test_evaluate_pools_the_folds_as_one_model_with_the_fold_named(folded):
    _, out, evaluated = folded
    records = read_records(evaluated)
    assert set(records["model"]) == {"cv"}  # the run's name: one model
    assert set(records["fold"]) == {0, 1, 2}
    per_fold = records.groupby("fold")["case"].unique()
    cases = [c for k in range(3) for c in per_fold[k]]
    assert len(cases) == len(set(cases)) == 5  # disjoint, all five
    for k in range(3):
        _, meta = load_checkpoint(out / f"fold{k}" / "checkpoints" / "best")
        assert sorted(per_fold[k]) == meta.data["split"]["cases"]["test"]
    summary = pd.read_csv(evaluated / "summary.csv")
    assert summary["model"].tolist() == ["cv"]
    assert summary["cases"].tolist() == [5] and summary["folds"].tolist() == [3]
    assert summary["slices"].tolist() == [records["slice_id"].nunique()]
    assert "pooled over 3 folds" in summary["interval"].iloc[0]
    assert (summary["DSC clean low"] <= summary["DSC clean"]).all()  # 5 cases: an interval
    assert sorted(p.name for p in (evaluated / "records").glob("*.parquet")) == [
        f"cv__fold{k}__fgsm__eps0.01.parquet" for k in range(3)
    ]


def test_evaluate_refuses_a_fold_twice_and_warns_on_missing_folds(folded, tmp_path, capsys):
    _, out, _ = folded
    best = [str(out / f"fold{k}" / "checkpoints" / "best") for k in range(3)]
    base = ["evaluate", "--attack", "fgsm", "--eps", "0.01", "--loss", "bce", "--max-slices", "2"]
    twice = [*base, best[0], best[0], "--out", str(tmp_path / "a")]
    assert cli(twice) == 2
    err = capsys.readouterr().err
    assert "is also named 'cv' (fold 0)" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "a").exists()
    assert cli([*base, best[1], "--out", str(tmp_path / "b")]) == 0
    said = "warning: cv: 1 of its 3 cross-validation folds given; the pooled numbers cover only"
    assert said in capsys.readouterr().err


def test_train_folds_refuses_test_fraction(tmp_path, capsys):
    args = ["train", "--out", str(tmp_path / "cv"), "--data", "synthetic", "--folds", "3"]
    assert cli([*args, "--test-fraction", "0.2"]) == 2
    assert "--test-fraction: not used with --folds" in capsys.readouterr().err
    assert cli([*args[:-1], "1"]) == 2
    assert "--folds: need 2 or more folds" in capsys.readouterr().err


def _experiment(data, tmp_path, **changes):
    from advseg.augment import AugmentConfig
    from advseg.experiment import AttackSpec, EvaluationSpec, ExperimentConfig, ModelSpec, SplitSpec
    from advseg.train import TrainConfig

    values = dict(
        name="cv",
        data=DataConfig(
            path=data, cache_dir=tmp_path / "cache", preprocess=PreprocessConfig(size=32)
        ),
        split=SplitSpec(val_fraction=0.3, folds=3),
        train=TrainConfig(
            epochs=1, batch_size=4, device="cpu", augment=AugmentConfig(enabled=False)
        ),
        models=[ModelSpec(arch="unet-tiny")],
        attacks=[AttackSpec(name="fgsm", losses=["bce"], eps=[0.01])],
        evaluation=EvaluationSpec(batch_size=8, examples=1, protocol="per-class"),
    )
    return ExperimentConfig(**{**values, **changes})


def test_run_folds_trains_k_models_and_pools_their_records(folded, tmp_path):
    from advseg.experiment import run_experiment

    data, train_out, _ = folded
    run_dir = tmp_path / "run"
    result = run_experiment(_experiment(data, tmp_path), run_dir)
    assert result.trained == [f"unet-tiny (fold {k})" for k in range(3)]
    assert result.grid.computed == [f"unet-tiny__fold{k}__fgsm__eps0.01" for k in range(3)]
    records = read_records(run_dir)
    assert set(records["model"]) == {"unet-tiny"} and set(records["fold"]) == {0, 1, 2}
    for k in range(3):  # fold k's records are fold k's model on the cases its checkpoint stored
        folder = run_dir / "models" / "unet-tiny" / f"fold{k}"
        _, meta = load_checkpoint(folder / "checkpoints" / "best")
        assert meta.data["folds"] == {"fold": k, "folds": 3}
        cases = sorted(records.loc[records["fold"] == k, "case"].unique())
        assert cases == meta.data["split"]["cases"]["test"]
        # the one training path: advseg train --folds made the same split for the same seed
        _, trained = load_checkpoint(train_out / f"fold{k}" / "checkpoints" / "best")
        assert trained.data["split"] == meta.data["split"]
    assert records["case"].nunique() == 5
    summary = pd.read_csv(run_dir / "summary.csv")
    assert summary["cases"].tolist() == [5] and summary["folds"].tolist() == [3]
    assert "pooled over 3 folds" in summary["interval"].iloc[0]
    assert result.report is not None
    html = result.report.html.read_text()
    assert "pooled over 3 folds" in html and "Cross-validated: unet-tiny (3 folds)" in html
    from advseg.runs.examples import load_examples

    for k in range(3):
        saved = load_examples(run_dir / "examples" / f"unet-tiny__fold{k}__fgsm__eps0.01.npz")
        assert saved["cell"]["fold"] == k
    titles = html.count("(the strongest; AS")  # every panel's title (caption, alt text)
    fold0 = html.count("fold 0&#x27;s model on its test cases") + html.count("fold 0's model on")
    assert titles == fold0 and 1 <= titles <= 2  # one panel per (model, attack): fold 0's

    again = run_experiment(_experiment(data, tmp_path), run_dir)  # resumes: nothing to redo
    assert again.trained == [] and again.grid.computed == []


@pytest.mark.parametrize(
    ("changes", "said"),
    [
        ({"seeds": [0, 1]}, "seeds: not with split.folds"),
        ({"models": [{"arch": "unet-tiny", "checkpoint": "x"}]}, "models[0]: a checkpoint has one"),
        ({"attacks": [{"name": "fgsm", "transfer": True}]}, "attacks[0]: transfer, sources"),
    ],
)
def test_run_folds_refuses_what_crosses_folds(tmp_path, changes, said):
    from advseg.config import from_dict
    from advseg.experiment import ExperimentConfig, check_config

    with pytest.raises(UserError, match=said.replace("[", r"\[").replace("]", r"\]")):
        check_config(from_dict(ExperimentConfig, {"split": {"folds": 3}, **changes}))
    with pytest.raises(UserError, match=r"split\.folds: need a whole number of 2 or more"):
        check_config(from_dict(ExperimentConfig, {"split": {"folds": 1}}))


def test_run_cli_takes_folds(tmp_path, capsys):
    assert cli(["run", "demo", "--data", "synthetic", "--folds", "1", "--out", str(tmp_path)]) == 2
    assert "--folds: split.folds: need a whole number of 2 or more" in capsys.readouterr().err
