"""The experiment grid, its config file and the resume logic (with a counting fake cell)."""

from __future__ import annotations

import pandas as pd
import pytest

from advseg.config import save_yaml
from advseg.errors import UserError
from advseg.experiment import (
    AttackSpec,
    Cell,
    CellOutput,
    ExperimentConfig,
    ModelSpec,
    load_experiment,
    plan_cells,
    prepare_run_dir,
    run_cells,
)
from advseg.runs.examples import load_examples
from advseg.runs.records import RECORD_COLUMNS, read_records


def _records(cell: Cell) -> pd.DataFrame:
    row = {c: 0 for c in RECORD_COLUMNS}
    row.update(model=cell.model, arch="unet", attack=cell.attack, eps=cell.eps)
    row.update(slice_id="case1_day0_slice_0001", scan="case1_day0", **{"class": "stomach"})
    return pd.DataFrame([{**row, "loss": loss} for loss in cell.losses])


class CountingCells:
    """A fake cell function: counts calls and can fail at a chosen call, as an interrupt would."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.calls: list[str] = []
        self.fail_at = fail_at

    def __call__(self, cell: Cell) -> CellOutput:
        self.calls.append(cell.slug)
        if self.fail_at is not None and len(self.calls) == self.fail_at:
            raise KeyboardInterrupt
        examples = {"slice_ids": ["case1_day0_slice_0001"], "x_adv": [[[0.5]]]}
        return CellOutput(_records(cell), examples)


def _config() -> ExperimentConfig:
    return ExperimentConfig(
        models=[ModelSpec(arch="unet"), ModelSpec(arch="smp:Unet:vgg13")],
        attacks=[
            AttackSpec(name="fgsm", losses=["bce", "focal", "dicefocal"], eps=[0.009]),
            AttackSpec(name="fgsm", losses=["bce"], eps=[0.003, 0.009]),
        ],
    )


def test_grid_unites_losses_of_a_repeated_cell_and_names_cells_stably():
    cells = plan_cells(_config())
    assert [c.slug for c in cells] == [
        "unet__fgsm__eps0.009",
        "unet__fgsm__eps0.003",
        "smp-Unet-vgg13__fgsm__eps0.009",
        "smp-Unet-vgg13__fgsm__eps0.003",
    ]
    assert cells[0].losses == ("bce", "focal", "dicefocal")
    assert cells[1].losses == ("bce",)


def test_an_interrupted_run_redoes_only_the_unfinished_cell(tmp_path):
    cells = plan_cells(_config())
    first = CountingCells(fail_at=3)
    with pytest.raises(KeyboardInterrupt):
        run_cells(cells, tmp_path, first)
    assert sorted(p.name for p in (tmp_path / "records").iterdir()) == [
        "unet__fgsm__eps0.003.parquet",
        "unet__fgsm__eps0.009.parquet",
    ]  # the interrupted cell left no file, not even a temporary one

    second = CountingCells()
    result = run_cells(cells, tmp_path, second)
    assert second.calls == [cells[2].slug, cells[3].slug]
    assert result.skipped == [cells[0].slug, cells[1].slug]
    assert result.computed == second.calls
    assert len(read_records(tmp_path)) == 3 + 1 + 3 + 1

    third = CountingCells()
    run_cells(cells, tmp_path, third)
    assert third.calls == []


def test_examples_are_saved_beside_records_without_pickle(tmp_path):
    cell = plan_cells(_config())[0]
    run_cells([cell], tmp_path, CountingCells())
    saved = load_examples(tmp_path / "examples" / f"{cell.slug}.npz")
    assert list(saved["slice_ids"]) == ["case1_day0_slice_0001"]
    assert saved["x_adv"].tolist() == [[[0.5]]]
    assert saved["cell"] == {"model": "unet", "attack": "fgsm", "eps": 0.009}


def _finished_cell(run_dir):
    """Stand-in for a finished cell: what makes a run directory hold work."""
    (run_dir / "records").mkdir(exist_ok=True)
    (run_dir / "records" / "unet__fgsm__eps0.009.parquet").write_bytes(b"finished")


def test_a_run_directory_refuses_another_experiment(tmp_path):
    prepare_run_dir(_config(), tmp_path)
    prepare_run_dir(_config(), tmp_path)  # the same experiment resumes
    _finished_cell(tmp_path)
    other = _config()
    other.attacks[1].eps = [0.003, 0.03]
    with pytest.raises(UserError, match=r"config.yaml: .*attacks\[1\]\.eps\[1\] differs"):
        prepare_run_dir(other, tmp_path)


def test_a_run_directory_without_finished_work_takes_the_corrected_experiment(tmp_path):
    prepare_run_dir(_config(), tmp_path)  # e.g. refused later, or killed before its first save
    corrected = _config()
    corrected.attacks[1].eps = [0.003, 0.03]
    prepare_run_dir(corrected, tmp_path)
    assert load_experiment(tmp_path / "config.yaml") == corrected


def test_a_resume_may_change_how_the_work_is_done_not_its_records(tmp_path):
    prepare_run_dir(_config(), tmp_path)
    changed = _config()
    changed.train.num_workers = 2
    changed.evaluation.protocol = "global"
    changed.report = not changed.report
    prepare_run_dir(changed, tmp_path)
    assert load_experiment(tmp_path / "config.yaml") == changed  # the saved config follows
    _finished_cell(tmp_path)
    changed.train.lr *= 2
    changed.train.num_workers = 0
    with pytest.raises(UserError, match=r"train\.lr differs"):
        prepare_run_dir(changed, tmp_path)
    assert load_experiment(tmp_path / "config.yaml").train.num_workers == 2  # left as it was


def test_config_file_round_trips_and_bad_keys_are_named(tmp_path):
    path = tmp_path / "exp.yaml"
    save_yaml(_config(), path)
    assert load_experiment(path) == _config()

    path.write_text("models:\n  - arch: unet\n    epochs: 3\n")
    with pytest.raises(UserError, match=r"exp.yaml: models\[0\]\.epochs: unknown key"):
        load_experiment(path)
    path.write_text("attacks:\n  - eps: fast\n")
    with pytest.raises(UserError, match=r"exp.yaml: attacks\[0\]\.eps: expected a list"):
        load_experiment(path)
    path.write_text("attacks:\n  - losses: [bce, dyce]\n")
    with pytest.raises(UserError, match=r"attacks\[0\]\.losses\[1\]: unknown loss 'dyce'"):
        load_experiment(path)
    path.write_text("attacks:\n  - name: pgd\n    kwargs: {step: 3}\n")
    with pytest.raises(UserError, match=r"attacks\[0\]\.kwargs\.step: pgd takes steps, alpha"):
        load_experiment(path)  # refused before any model is trained
    path.write_text("attacks:\n  - eps: [0.01, 2.0]\n")
    with pytest.raises(UserError, match=r"attacks\[0\]\.eps\[1\]: fgsm: eps 2 exceeds"):
        load_experiment(path)
    path.write_text("attacks:\n  - losses: [ce]\n")
    with pytest.raises(UserError, match=r"attacks\[0\]\.losses\[0\]: 'ce' is for softmax"):
        load_experiment(path)
    path.write_text("models:\n  - arch: unet\n  - arch: unet\n")
    with pytest.raises(UserError, match=r"models\[1\]\.name: 'unet' is also models\[0\]"):
        load_experiment(path)


def test_cli_run_names_the_bad_key_in_one_line(tmp_path, capsys):
    from advseg.cli import main

    path = tmp_path / "exp.yaml"
    path.write_text("evaluation:\n  batch_size: big\n")
    with pytest.raises(SystemExit) as exit_info:  # data named: the file's own mistake is said
        main(["run", str(path), "--out", str(tmp_path / "run"), "--data", "synthetic"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "exp.yaml: evaluation.batch_size: expected an integer" in err and "\n" not in err
    assert not (tmp_path / "run").exists()  # nothing written for a bad experiment
    with pytest.raises(SystemExit):
        main(["run", "no-such-experiment"])
    assert "shipped experiments: demo, paper" in capsys.readouterr().err


def test_max_slices_and_report_panels_sample_over_cases_not_the_first_slices():
    from types import SimpleNamespace

    import numpy as np
    import pandas as pd

    from advseg.experiment import EvaluationSpec, evaluation_rows
    from advseg.report.figures import panel_rows

    index = pd.DataFrame({"case": np.repeat([4, 7, 2], 10)})  # three test cases, 10 slices each
    masks = np.ones((30, 1, 2, 2), np.uint8)
    masks[[0, 10, 20]] = 0  # the first slice of each case has no mask
    data = SimpleNamespace(index=index, masks=masks)
    spec = EvaluationSpec(slices="with_mask", max_slices=6)
    rows = evaluation_rows(data, np.arange(30), spec, seed=3)
    assert len(rows) == 6 and (np.diff(rows) > 0).all()
    assert index["case"].iloc[rows].value_counts().to_dict() == {4: 2, 7: 2, 2: 2}
    assert not set(rows) & {0, 10, 20}  # masks still decide first
    assert (evaluation_rows(data, np.arange(30), spec, seed=3) == rows).all()
    assert not (evaluation_rows(data, np.arange(30), spec, seed=4) == rows).all()
    ids = [f"case1_day0_slice_{s:04d}" for s in range(1, 5)] + ["case5_day0_slice_0001"]
    picked = panel_rows(ids, 2)
    assert {ids[i][:5] for i in picked} == {"case1", "case5"}  # not the first two (case 1)


def test_a_run_begun_before_resize_existed_resumes_stretched_and_says_so_otherwise(tmp_path):
    import yaml

    prepare_run_dir(_config(), tmp_path)
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    del saved["data"]["preprocess"]["resize"], saved["data"]["strict_labels"]  # an older run
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    _finished_cell(tmp_path)
    hint = r"resize differs; it began before data\.preprocess\.resize existed, with 'stretch'"
    with pytest.raises(UserError, match=hint):
        prepare_run_dir(_config(), tmp_path)  # pad, the new default
    stretched = _config()
    stretched.data.preprocess.resize = "stretch"
    prepare_run_dir(stretched, tmp_path)  # what the run had: it resumes


def test_cache_key_holds_the_resize_only_where_slices_are_not_square():
    import pandas as pd

    from advseg.data import PreprocessConfig, cache_key

    def index(width):
        frame = pd.DataFrame({"id": ["case1_day0_slice_0001"], "image_path": ["/nowhere.png"],
                              "image_z": [-1], "width": [width], "height": [266]})  # fmt: skip
        frame.attrs["classes"] = []
        return frame

    pad, stretch = PreprocessConfig(size=32), PreprocessConfig(size=32, resize="stretch")
    assert cache_key(index(266), pad) == cache_key(index(266), stretch)  # the same arrays
    assert cache_key(index(310), pad) != cache_key(index(310), stretch)
