import json
from pathlib import Path

import pandas as pd
import pytest
import torch

import advseg
from advseg.cli import main
from advseg.config import to_dict
from advseg.data import UWMGI_CLASSES, PreprocessConfig, write_synthetic
from advseg.models import create_model
from advseg.models.checkpoint import metadata_for, save_checkpoint
from advseg.runs.records import read_records
from advseg.stats.summary import summarize


def cli(args: list[str]) -> int:
    with pytest.raises(SystemExit) as exit_:
        main(args)
    return exit_.value.code


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A small synthetic data set and an (untrained) unet-tiny checkpoint made for it."""
    root = tmp_path_factory.mktemp("eval")
    data = root / "data"
    write_synthetic(data, cases=3, scans=1, slices=6)
    torch.manual_seed(0)
    model = create_model("unet-tiny")
    preprocessing = to_dict(PreprocessConfig(size=32))
    data_config = {"path": str(data), "cache_dir": str(root / "cache")}
    source = {"config": data_config, "test_fraction": 0.34, "split_seed": 0}
    meta = metadata_for(model, list(UWMGI_CLASSES), preprocessing=preprocessing, data=source)
    save_checkpoint(root / "tiny", model, meta)
    wrong = create_model("unet-tiny", classes=2)
    meta = metadata_for(wrong, ["a", "b"], preprocessing=preprocessing, data=source)
    save_checkpoint(root / "two-classes", wrong, meta)
    return root


def test_evaluate_writes_records_summary_and_prints_table_two(setup, capsys):
    out = setup / "run"
    args = ["evaluate", str(setup / "tiny"), "--out", str(out), "--eps", "0.01", "--eps", "0.03"]
    assert cli([*args, "--batch-size", "4", "--examples", "2", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "Table II: fgsm, eps 0.01 (2.55/255) (DSC = per-class Dice" in printed
    assert "Table II: fgsm, eps 0.03 (7.65/255) (DSC = per-class Dice" in printed
    assert "dicefocal" in printed and "slices evaluated (test split): tiny: 6" in printed
    assert sorted(p.name for p in (out / "records").iterdir()) == [
        "tiny__fgsm__eps0.01.parquet",
        "tiny__fgsm__eps0.03.parquet",
    ]
    records = read_records(out)
    assert len(records) == 2 * 6 * 3 * 3  # eps x slices x classes x losses
    assert set(records["loss"]) == {"bce", "focal", "dicefocal"}
    summary = pd.read_csv(out / "summary.csv")
    expected = summarize(records, "per-class")
    bounds = [f"{c} {side}" for c in expected.columns[5:] for side in ("low", "high")]
    columns = [*expected.columns, *bounds, "protocol"]  # 95% CIs beside, the protocol named
    columns += ["cases", "slices", "interval"]  # what the intervals rest on (issue 26)
    assert sorted(summary.columns) == sorted(columns)
    assert summary["interval"].iloc[0] == (  # 1 test case: no interval, said so
        "not meaningful: 1 case, 6 slices (< 5 cases); bounds left out"
    )
    assert summary["cases"].tolist() == [1] and summary["slices"].tolist() == [6]
    assert "intervals: not meaningful: " in " ".join(printed.split())
    assert set(summary["protocol"]) == {"per-class"}
    assert summary["DSC clean"].tolist() == pytest.approx(expected["DSC clean"].tolist())
    assert len(list((out / "examples").glob("*.npz"))) == 2
    assert cli(["report", str(out)]) == 0  # the report reads an evaluation's examples too
    assert (out / "report" / "report.html").exists()


def test_targeted_sweep_names_its_cells(setup):
    out = setup / "erase"
    args = ["evaluate", str(setup / "tiny"), "--out", str(out), "--erase", "stomach"]
    assert cli([*args, "--loss", "bce", "--attack", "bim", "--steps", "2", "--device", "cpu"]) == 0
    assert [p.name for p in (out / "records").iterdir()] == [
        "tiny__bim-erase-stomach__eps0.009.parquet"
    ]
    assert set(read_records(out)["attack"]) == {"bim:erase=stomach"}
    assert "DSC bim:erase=stomach bce eps=0.009" in pd.read_csv(out / "summary.csv").columns


def test_attacks_lists_attacks_and_losses(capsys):
    assert cli(["attacks"]) == 0
    out = capsys.readouterr().out
    for name in ("fgsm", "bim", "pgd", "mifgsm", "segpgd", "cospgd", "dicefocal", "restarts"):
        assert name in out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--attack", "pdg"], "error: --attack: unknown attack 'pdg'"),
        (["--loss", "bec"], "error: --loss: unknown loss 'bec'"),
        (["--eps", "-0.1"], "eps must be a finite number >= 0"),
        (["--steps", "3"], "steps: no attack of the sweep takes them"),
        (["--protocol", "macro"], "error: --protocol: 'macro' is not one of paper"),
        (["--split", "val"], "error: --split: 'val' is not 'test' or 'all'"),
        (["--device", "cudda"], "error: --device: 'cudda' is not a device"),
    ],
)
def test_bad_input_exits_2_with_one_line(setup, capsys, extra, message):
    args = ["evaluate", str(setup / "tiny"), "--out", str(setup / "bad")]
    assert cli([*args, *(extra if "--device" in extra else [*extra, "--device", "cpu"])]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (setup / "bad" / "records").exists()


def test_two_checkpoints_with_one_name_are_refused(setup, capsys):
    (setup / "other").mkdir(exist_ok=True)
    for suffix in (".safetensors", ".json"):
        (setup / "other" / f"tiny{suffix}").write_bytes((setup / f"tiny{suffix}").read_bytes())
    args = ["evaluate", str(setup / "tiny"), str(setup / "other" / "tiny")]
    assert cli([*args, "--out", str(setup / "dup"), "--device", "cpu"]) == 2
    assert "is also named 'tiny'" in capsys.readouterr().err


def test_out_that_is_a_file_is_refused_before_any_work(setup, capsys):
    (setup / "a-file").write_text("x")
    assert cli(["evaluate", str(setup / "tiny"), "--out", str(setup / "a-file")]) == 2
    assert "exists and is not a directory" in capsys.readouterr().err


def test_checkpoint_that_does_not_fit_the_data(setup, capsys):
    args = ["evaluate", str(setup / "two-classes"), "--out", str(setup / "bad2")]
    assert cli(args) == 2
    assert "checkpoint does not fit: classes" in capsys.readouterr().err


def test_evaluate_compat_notebook_labels_its_records(setup, capsys):
    out = setup / "run-notebook"
    args = ["evaluate", str(setup / "tiny"), "--out", str(out), "--compat", "notebook"]
    assert cli([*args, "--batch-size", "4", "--device", "cpu"]) == 0
    files = [p.name for p in (out / "records").iterdir()]
    assert files == ["tiny__fgsm-notebook__eps0.009.parquet"]
    assert set(read_records(out)["attack"]) == {"fgsm:notebook"}
    assert cli([*args, "--attack", "pgd"]) == 2
    assert "the notebook had fgsm only" in capsys.readouterr().err


def _checkpoint_on(setup, name: str, config: dict) -> Path:
    """A copy of ``tiny`` whose metadata names other data (``config`` is its data.config)."""
    torch.manual_seed(0)
    model = create_model("unet-tiny")
    source = {"config": config, "test_fraction": 0.34, "split_seed": 0}
    preprocessing = to_dict(PreprocessConfig(size=32))
    meta = metadata_for(model, list(UWMGI_CLASSES), preprocessing=preprocessing, data=source)
    save_checkpoint(setup / name, model, meta)
    return setup / name


def test_a_data_set_no_longer_there_is_one_line_and_data_overrides(setup, tmp_path, capsys):
    gone = setup / "moved-away"
    moved = _checkpoint_on(setup, "moved", {"path": str(gone)})
    args = ["evaluate", str(moved), "--loss", "bce", "--device", "cpu", "--batch-size", "4"]
    assert cli([*args, "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert f"{gone}, is not there" in err and "pass --data PATH" in err
    assert len(err.strip().splitlines()) == 1 and not (setup / "cache" / "synthetic").exists()
    cache = tmp_path / "own-cache"
    extra = ["--data", str(setup / "data"), "--cache-dir", str(cache)]
    assert cli([*args, "--out", str(tmp_path / "b"), *extra]) == 0
    assert len(list(cache.iterdir())) == 1  # --cache-dir is where the arrays went
    saved = json.loads((tmp_path / "b" / "data.json").read_text())
    assert saved["locations"] == [str((setup / "data").resolve())]


@pytest.mark.parametrize("stored", ["synthetic", None])  # None: saved before --data was required
def test_the_phantom_is_named_in_table_two_data_json_and_the_report(
    setup, tmp_path, capsys, stored
):
    phantom_cache = setup / "phantom-cache"
    if not (phantom_cache / "synthetic").exists():  # a small phantom where the checkpoint says
        write_synthetic(phantom_cache / "synthetic", cases=3, scans=1, slices=4)
    config = {"cache_dir": str(phantom_cache)} | ({"path": stored} if stored else {})
    phantom = _checkpoint_on(setup, f"phantom-{stored}", config)
    out = tmp_path / "run"
    args = ["evaluate", str(phantom), "--out", str(out), "--loss", "bce", "--device", "cpu"]
    assert cli(args) == 0
    captured = capsys.readouterr()
    assert captured.err.startswith("data: the synthetic phantom (generated images")
    assert "attack success); data: synthetic phantom" in " ".join(captured.out.split())  # title
    assert json.loads((out / "data.json").read_text())["locations"] == ["synthetic"]
    assert cli(["report", str(out)]) == 0
    report = (out / "report" / "report.md").read_text()
    assert "Data: the synthetic phantom (generated images, not patient data)" in report
    assert "Data: synthetic phantom. Table II at eps" in report
    sessions = json.loads((out / "provenance.json").read_text())["sessions"]
    assert [(s["command"], s["device"]) for s in sessions] == [("advseg evaluate", "cpu")]
    assert report.index("## Provenance") < report.index("## Table II")
    assert "| data | SYNTHETIC: the generated phantom, not patient data |" in report
    assert f"by advseg {advseg.__version__} on cpu" in report and "advseg evaluate " in report


def test_evaluate_refuses_an_out_that_holds_a_run(setup, tmp_path, capsys):
    out = tmp_path / "run"
    (out / "records").mkdir(parents=True)
    (out / "records" / "old__fgsm__eps0.01.parquet").write_bytes(b"old")
    args = ["evaluate", str(setup / "tiny"), "--out", str(out), "--loss", "bce", "--device", "cpu"]
    assert cli(args) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in out.rglob("*")) == ["old__fgsm__eps0.01.parquet", "records"]
    (out / "records" / "old__fgsm__eps0.01.parquet").unlink()  # an empty records/ is no run
    assert cli(args) == 0


def test_attack_option_and_activation_reach_the_attack(setup, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ADVSEG_PROGRESS_SECONDS", "0")
    base = ["evaluate", str(setup / "tiny"), "--loss", "bce", "--device", "cpu"]
    bad = [*base, "--out", str(tmp_path / "bad"), "--attack-option", "stepz=3"]
    assert cli(bad) == 2
    err = capsys.readouterr().err
    assert "stepz" in err and "fgsm: " in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "bad").exists()  # refused before any work
    assert cli([*base, "--out", str(tmp_path / "x"), "--attack-option", "pair"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err
    good = [*base, "--out", str(tmp_path / "ok"), "--attack", "pgd", "--steps", "1"]
    good += ["--attack-option", "random_start=false", "--activation", "sigmoid"]  # its own
    assert cli(good) == 0
    assert len(read_records(tmp_path / "ok")) > 0
    assert "batches (100%)" in capsys.readouterr().err  # piped: progress lines, not silence


def test_refine_option_reaches_the_records_of_a_minimal_norm_run(setup, tmp_path, capsys):
    base = ["evaluate", str(setup / "tiny"), "--loss", "bce", "--device", "cpu", "--eps", "1",
            "--attack", "pdpgd", "--steps", "5", "--attack-option", "criterion=dice"]  # fmt: skip
    assert cli([*base, "--out", str(tmp_path / "bad"), "--attack-option", "refine=often"]) == 2
    err = capsys.readouterr().err
    assert "refine must be on, off or ROUNDSxSTEPS" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "bad").exists()
    for option, setting in (("refine=2x3", "steps=5 refine=apgd-bisection 2x3"),
                            ("refine=off", "steps=5 refine=off")):  # fmt: skip
        out = tmp_path / option.replace("=", "-")
        assert cli([*base, "--out", str(out), "--attack-option", option]) == 0
        records = read_records(out)
        assert (records["attack_setting"] == setting).all()
        found, upper = records["min_eps"], records["min_eps_upper"]
        assert (found <= upper).all() and (option != "refine=off" or (found == upper).all())


@pytest.mark.parametrize(
    ("extra", "said"),
    [(["--loss", "dicefocl"], "did you mean 'dicefocal'"), (["--erase", "stomac"], "'stomac'")],
)
def test_a_typo_is_refused_before_any_data_is_built(setup, tmp_path, capsys, extra, said):
    args = ["evaluate", str(setup / "tiny"), "--out", str(tmp_path / "run"), "--device", "cpu"]
    assert cli([*args, "--cache-dir", str(tmp_path / "cache"), *extra]) == 2
    err = capsys.readouterr().err
    assert said in err and len(err.strip().splitlines()) == 1  # no "data: ..." line before it
    assert not (tmp_path / "cache").exists()


def test_max_slices_draws_seeded_slices_spread_over_cases_and_threads_are_recorded(setup):
    """Issue 26: evaluate --max-slices (SEA on one volume took 10 minutes) and --threads."""
    from advseg.data import DataConfig, build_index, spread_rows

    out = setup / "few"
    args = ["evaluate", str(setup / "tiny"), "--out", str(out), "--split", "all", "--loss", "bce"]
    assert cli([*args, "--max-slices", "3", "--threads", "1", "--device", "cpu"]) == 0
    records = read_records(out)
    chosen = sorted(set(records["slice_id"]))
    assert len(chosen) == 3 and records["case"].nunique() == 3  # one slice of each case
    index, _ = build_index(DataConfig(path=setup / "data"))
    expected = spread_rows(index, range(len(index)), 3, seed=0)  # the split seed
    assert chosen == sorted(index["id"].iloc[expected])
    sessions = json.loads((out / "provenance.json").read_text())["sessions"]
    assert sessions[-1]["threads"] == "1"
    assert cli([*args, "--max-slices", "0", "--out", str(setup / "none")]) == 2
