"""Records and run directories that prove they belong (issue 25): a records file carries its run's
and cell's identity and is refused when copied elsewhere; impossible values are refused on read;
a run whose config.yaml was deleted does not resume under another config."""

from __future__ import annotations

import re
import shutil

import pandas as pd
import pytest

from advseg.errors import UserError
from advseg.experiment import Cell, CellOutput, ExperimentConfig, prepare_run_dir, run_cells
from advseg.experiment.rundir import config_hash, run_identity
from advseg.runs.records import read_records, records_identity, write_records
from advseg.train import TrainConfig
from test_records import _frame

CELLS = [Cell("m", "fgsm", 0.01, ("bce",)), Cell("m", "fgsm", 0.03, ("bce",))]


def _compute(cell: Cell) -> CellOutput:
    return CellOutput(_frame(2).assign(eps=cell.eps))


RUN_A = {"run": "aaaa", "data": "d1"}


def test_records_carry_their_run_and_cell(tmp_path):
    run_cells(CELLS, tmp_path, _compute, identity=RUN_A)
    path = tmp_path / "records" / f"{CELLS[0].slug}.parquet"
    assert records_identity(path) == {**RUN_A, "cell": CELLS[0].slug}
    again = run_cells(CELLS, tmp_path, _compute, identity=RUN_A)  # a resume: all done
    assert again.skipped == [c.slug for c in CELLS]


@pytest.mark.parametrize(
    ("other", "said"),
    [
        ({"run": "bbbb", "data": "d1"}, "records of another run (another config) (run 'aaaa'"),
        ({"run": "aaaa", "data": "d2"}, "records of another data set (data 'd1'"),
    ],
)
def test_a_records_file_of_another_run_is_refused(tmp_path, other, said):
    foreign = tmp_path / "foreign"
    run_cells(CELLS, foreign, _compute, identity=RUN_A)
    ours = tmp_path / "ours"
    (ours / "records").mkdir(parents=True)
    copied = ours / "records" / f"{CELLS[0].slug}.parquet"
    shutil.copy(foreign / "records" / copied.name, copied)
    with pytest.raises(UserError, match=re.escape(f"{copied.name}: {said}")):
        run_cells(CELLS, ours, _compute, identity=other)
    assert not (ours / "records" / f"{CELLS[1].slug}.parquet").exists()  # nothing computed


def test_a_records_file_of_another_cell_is_refused(tmp_path):
    run_cells(CELLS[:1], tmp_path, _compute, identity=RUN_A)
    records = tmp_path / "records"
    shutil.copy(records / f"{CELLS[0].slug}.parquet", records / f"{CELLS[1].slug}.parquet")
    with pytest.raises(UserError, match=r"records of another cell \(cell 'm__fgsm__eps0.01'"):
        run_cells(CELLS, tmp_path, _compute, identity=RUN_A)


def test_a_file_without_identity_is_read_as_before(tmp_path):
    write_records(_frame(2).assign(eps=0.01), tmp_path / "records" / f"{CELLS[0].slug}.parquet")
    result = run_cells(CELLS, tmp_path, _compute, identity=RUN_A)
    assert result.skipped == [CELLS[0].slug]


@pytest.mark.parametrize(
    ("column", "value", "said"),
    [
        ("dice_adv", 7.0, "row 1: dice_adv 7 is not in [0, 1]"),
        ("dice_clean", -0.5, "row 1: dice_clean -0.5 is not in [0, 1]"),
        ("gt_pixels", -3, "row 1: gt_pixels -3 is not in [0, inf]"),
        ("tp_adv", -1, "row 1: tp_adv -1 is not in [0, inf]"),
        ("iou_clean", 1.5, "row 1: iou_clean 1.5 is not in [0, 1]"),
        ("linf", -0.1, "row 1: linf -0.1 is not in [0, inf]"),
    ],
)
def test_impossible_values_are_refused_on_read(tmp_path, column, value, said):
    frame = _frame(3)
    frame[column] = frame[column].astype("float64" if isinstance(value, float) else "int64")
    frame.loc[1, column] = value
    write_records(frame, tmp_path / "records" / "cell.parquet")
    with pytest.raises(UserError, match=re.escape(f"cell.parquet: {said}")):
        read_records(tmp_path)


def test_nan_dice_and_infinite_distances_are_values(tmp_path):
    frame = _frame(2).astype({"hd95_adv": "float64"})
    frame.loc[0, "dice_adv"] = float("nan")
    frame.loc[0, "hd95_adv"] = float("inf")
    write_records(frame, tmp_path / "r.parquet")
    assert len(read_records(tmp_path / "r.parquet")) == 2


def test_a_run_whose_config_was_deleted_does_not_resume(tmp_path):
    config = ExperimentConfig(name="a")
    prepare_run_dir(config, tmp_path)
    write_records(_frame(2), tmp_path / "records" / "cell.parquet")
    (tmp_path / "config.yaml").unlink()
    other = ExperimentConfig(name="a", train=TrainConfig(lr=0.5))
    with pytest.raises(UserError, match=r"holds finished work but no config.yaml \(deleted\?\)"):
        prepare_run_dir(other, tmp_path)
    assert not (tmp_path / "config.yaml").exists()


def test_the_run_identity_is_kept_across_resumes(tmp_path):
    config = ExperimentConfig(name="a")
    first = run_identity(config, tmp_path, "fp")
    assert first == {"run": config_hash(config), "data": "fp"}
    assert config_hash(ExperimentConfig(name="a", train=TrainConfig(lr=0.5))) != first["run"]
    resumable = ExperimentConfig(name="a", train=TrainConfig(num_workers=3), report=False)
    assert config_hash(resumable) == first["run"]  # how the work is done is not what it is
    assert run_identity(resumable, tmp_path, "fp") == first
    assert pd.read_json(tmp_path / "run.json", typ="series")["config"] == first["run"]


# --- the model in the identity, and a directory's records checked on every read --------------


def test_records_of_another_checkpoint_are_refused(tmp_path):
    """A given checkpoint replaced between two runs of one grid (same config, same path): the
    cells computed on the old one are refused, not reported beside the new one's."""
    run_cells(CELLS, tmp_path, _compute, identity=RUN_A, model_id=lambda cell: "old")
    path = tmp_path / "records" / f"{CELLS[0].slug}.parquet"
    assert records_identity(path)["model"] == "old"
    run_cells(CELLS, tmp_path, _compute, identity=RUN_A, model_id=lambda cell: "old")  # resumes
    run_cells(CELLS, tmp_path, _compute, identity=RUN_A, model_id=lambda cell: None)  # unknown
    with pytest.raises(UserError, match=re.escape(
        f"{path.name}: records of another model (another checkpoint) (model 'old', this one's "
        "is 'new')"
    )):  # fmt: skip
        run_cells(CELLS, tmp_path, _compute, identity=RUN_A, model_id=lambda cell: "new")


def test_a_transfer_cell_of_another_source_checkpoint_is_refused(tmp_path):
    """A transfer cell's records name its source's checkpoint too: the source model replaced
    since (its target unchanged) makes the old images' cell refused, naming the file."""
    cells = [Cell("t", "fgsm", 0.01, ("bce",), source="a+b")]
    ids = {"t": "target", "a": "a1", "b": "b1"}
    run_cells(cells, tmp_path, _compute, identity=RUN_A, model_id=lambda cell: ids[cell.model])
    path = tmp_path / "records" / f"{cells[0].slug}.parquet"
    assert records_identity(path)["source_model"] == "a1+b1"
    assert records_identity(path)["model"] == "target"
    ids["b"] = "b2"
    with pytest.raises(UserError, match=re.escape(
        f"{path.name}: records of another source model (another checkpoint) (source_model "
        "'a1+b1', this one's is 'a1+b2')"
    )):  # fmt: skip
        run_cells(cells, tmp_path, _compute, identity=RUN_A, model_id=lambda c: ids[c.model])


def test_a_file_from_before_the_model_field_still_resumes(tmp_path):
    run_cells(CELLS, tmp_path, _compute, identity=RUN_A)  # no model in its identity
    result = run_cells(CELLS, tmp_path, _compute, identity=RUN_A, model_id=lambda cell: "x")
    assert result.skipped == [c.slug for c in CELLS]


def test_reading_a_run_refuses_a_file_of_another_run_or_cell(tmp_path):
    """``report`` and ``export`` read a directory's records: a file copied in from another run
    (its identity's run is not run.json's), or copied under another cell's name, is refused."""
    ours = tmp_path / "ours"
    run_cells(CELLS[:1], ours, _compute, identity=RUN_A)
    (ours / "run.json").write_text('{"config": "aaaa"}\n')
    assert len(read_records(ours)) == 2
    foreign = tmp_path / "foreign"
    run_cells(CELLS[1:], foreign, _compute, identity={"run": "bbbb", "data": "d1"})
    copied = ours / "records" / f"{CELLS[1].slug}.parquet"
    shutil.copy(foreign / "records" / copied.name, copied)
    with pytest.raises(UserError, match=re.escape(
        f"{copied}: records of another run (another config) (run 'bbbb', this directory's "
        "run.json says 'aaaa'); remove the file"
    )):  # fmt: skip
        read_records(ours)
    copied.unlink()
    renamed = ours / "records" / "m__fgsm__eps0.05.parquet"
    shutil.copy(ours / "records" / f"{CELLS[0].slug}.parquet", renamed)
    with pytest.raises(UserError, match=r"eps0.05.parquet: records of another cell "
                                        r"\('m__fgsm__eps0.01'\) under this name"):  # fmt: skip
        read_records(ours)
