"""The held-out split is bound to the checkpoint (issue 25): a case added to the data directory
after training moves the seeded split, and every later use must still score the cases the model
was tested against, not some it trained on."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from advseg.cli import main
from advseg.data import (
    DataConfig,
    build_index,
    held_out_rows,
    split_cases,
    split_note,
    split_train_val_test,
    write_synthetic,
)
from advseg.errors import AdvsegWarning, UserError
from advseg.runs.records import read_records

FRACTION = 0.34


def _seed_that_moves(before: pd.DataFrame, after: pd.DataFrame) -> int:
    """A split seed whose test cases differ once the fourth case is added."""
    for seed in range(50):
        _, was = split_cases(before, FRACTION, seed)
        _, now = split_cases(after, FRACTION, seed)
        if set(before["id"].iloc[was]) != set(after["id"].iloc[now]):
            return seed
    raise AssertionError("no seed moves the split")


def _remove_case(root, keep) -> None:
    """Take case 4 out of a Kaggle-layout data set (its folder to ``keep``, its csv rows)."""
    shutil.move(root / "train" / "case4", keep / "case4")
    table = pd.read_csv(root / "train.csv", keep_default_na=False)
    (keep / "case4.csv").write_text(table[table["id"].str.startswith("case4_")].to_csv(index=False))
    table[~table["id"].str.startswith("case4_")].to_csv(root / "train.csv", index=False)


def _add_case(root, keep) -> None:
    shutil.move(keep / "case4", root / "train" / "case4")
    table = pd.read_csv(root / "train.csv", keep_default_na=False)
    added = pd.read_csv(keep / "case4.csv", keep_default_na=False)
    pd.concat([table, added]).to_csv(root / "train.csv", index=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A model trained on cases 1-3 by ``advseg train``, then case 4 added to its data."""
    root = tmp_path_factory.mktemp("split")
    data, keep = root / "data", root / "keep"
    write_synthetic(data, cases=4, scans=1, slices=4, seed=3)
    after, _ = build_index(DataConfig(path=data))
    keep.mkdir()
    _remove_case(data, keep)
    before, _ = build_index(DataConfig(path=data))
    seed = _seed_that_moves(before, after)
    run = root / "run"
    argv = ["train", "--data", str(data), "--size", "32", "--epochs", "1", "--model", "unet-tiny"]
    argv += ["--test-fraction", str(FRACTION), "--val-fraction", "0.5"]
    argv += ["--split-seed", str(seed), "--out", str(run), "--cache-dir", str(root / "cache")]
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 0
    _, held = split_cases(before, FRACTION, seed)
    _add_case(data, keep)
    return run / "checkpoints" / "best", sorted(before["id"].iloc[held]), root


def test_the_checkpoint_stores_its_split(trained):
    best, held_ids, _ = trained
    meta = json.loads(best.with_name("best.json").read_text())["meta"]
    split = meta["data"]["split"]
    assert split["test_slices"] == len(held_ids) == 4
    cases = split["cases"]
    assert sorted(cases["train"] + cases["val"] + cases["test"]) == [1, 2, 3]


def test_evaluate_after_a_case_was_added_scores_the_same_test_rows(trained, capfd):
    best, held_ids, root = trained
    out = root / "eval"
    argv = ["evaluate", str(best), "--out", str(out), "--eps", "0.01", "--device", "cpu"]
    with pytest.raises(SystemExit) as stop:
        main([*argv, "--cache-dir", str(root / "cache")])
    assert stop.value.code == 0
    err = capfd.readouterr().err
    assert "1 case(s) added since training (e.g. case 4) are neither trained on nor scored" in err
    assert sorted(set(read_records(out)["slice_id"])) == held_ids


def test_the_recomputed_split_would_have_scored_other_rows(trained):
    """The fault the binding prevents: the seeded split of the data as it is now."""
    best, held_ids, _ = trained
    meta = json.loads(best.with_name("best.json").read_text())["meta"]
    index, _ = build_index(DataConfig(path=meta["data"]["config"]["path"]))
    _, now = split_cases(index, meta["data"]["test_fraction"], meta["data"]["split_seed"])
    assert sorted(index["id"].iloc[now]) != held_ids
    with pytest.warns(AdvsegWarning, match="added since training"):
        rows = held_out_rows(index, meta["data"], "ckpt")
    assert sorted(index["id"].iloc[rows]) == held_ids


def _index(cases: int, slices: int = 3) -> pd.DataFrame:
    rows = [
        {"id": f"case{c}_day1_slice_{s:04d}", "case": c} for c in range(1, cases + 1)
        for s in range(1, slices + 1)
    ]  # fmt: skip
    return pd.DataFrame(rows)


def _meta(index: pd.DataFrame, seed: int = 0) -> dict:
    train, val, test = split_train_val_test(index, 0.25, 0.34, seed)
    rows = {"train": len(train), "val": len(val), "test": len(test)}
    note = split_note(index, train, val, test)
    return {"test_fraction": 0.25, "val_fraction": 0.34, "split_seed": seed, "rows": rows,
            "split": note}  # fmt: skip


def test_a_held_out_case_gone_is_refused():
    index = _index(4)
    meta = _meta(index)
    held = meta["split"]["cases"]["test"][0]
    with pytest.raises(UserError, match=f"ck: held-out case {held} is no longer in the data"):
        held_out_rows(index[index["case"] != held], meta, "ck")


def test_a_held_out_case_with_other_slices_is_refused():
    index = _index(4)
    meta = _meta(index)
    held = meta["split"]["cases"]["test"][0]
    fewer = index.drop(index.index[np.flatnonzero(index["case"] == held)[-1]])
    with pytest.raises(UserError, match=r"held-out cases changed since training \(5 now, 6 then\)"):
        held_out_rows(fewer.reset_index(drop=True), meta, "ck")


def test_an_old_checkpoint_on_changed_data_is_refused():
    """Saved before the split was stored (so before its 2-test-case default too): the
    recomputed split, by the rule of then, stands only on the same counts."""
    index = _index(4)
    _, then = split_cases(index, 0.25, 0, min_test=1)  # 1 case, where the default now takes 2
    assert index["case"].iloc[then].nunique() == 1
    rows = {"train": len(index) - len(then), "val": 0, "test": len(then)}
    meta = {"test_fraction": 0.25, "val_fraction": 0.34, "split_seed": 0, "rows": rows}
    assert np.array_equal(held_out_rows(index, meta, "ck"), then)
    with pytest.raises(UserError, match=r"ck: the data changed since training \(15 slices, 12"):
        held_out_rows(_index(5), meta, "ck")


@pytest.mark.parametrize(
    ("edit", "said"),
    [
        (lambda s: s.update(cases=[1]), "expected {cases: {train, val, test}"),
        (lambda s: s["cases"].update(test=["a"]), "split.cases.test: expected a list of case"),
        (lambda s: s["cases"].update(test=[]), "split.cases.test: no held-out case"),
        (lambda s: s.update(test_slices=-1), "split.test_slices: expected a count of 1 or more"),
        (lambda s: s.update(test_ids_sha256=3), "split.test_ids_sha256: expected a SHA-256"),
    ],
)
def test_a_hand_edited_split_is_refused_in_one_line(edit, said):
    index = _index(4)
    meta = _meta(index)
    edit(meta["split"])
    with pytest.raises(UserError, match=said.replace("{", r"\{").replace("(", r"\(")):
        held_out_rows(index, meta, "ck")
