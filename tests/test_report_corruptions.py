"""The corruption summaries (DSC per severity, mean, CE/mCE against a baseline, Hendrycks &
Dietterich 2019) computed by hand from the cells' DSC, and the report's corruption section."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from advseg.cli import main
from advseg.config import to_dict
from advseg.data import UWMGI_CLASSES, PreprocessConfig, write_synthetic
from advseg.errors import UserError
from advseg.evaluate.corrupted import evaluate_corruptions
from advseg.models import create_model
from advseg.models.checkpoint import metadata_for, save_checkpoint
from advseg.report import write_report
from advseg.report.corruptions import corruption_dice, corruption_table
from advseg.stats.summary import summarize_cells
from test_evaluate_corruptions import _Data  # tests/ is on sys.path


@pytest.fixture(scope="module")
def records():
    torch.manual_seed(0)
    images = torch.rand(6, 3, 16, 16)
    masks = (images[:, :1] > 0.5).float()
    data = _Data(images, masks)
    cells = [("noise", 1), ("noise", 4), ("blur", 2), ("blur", 5)]
    frames = []
    for name, seed in (("base", 0), ("other", 1)):
        torch.manual_seed(seed)
        model = torch.nn.Conv2d(3, 1, 3, padding=1)
        with torch.no_grad():
            model.weight.zero_()
            model.weight[0, 0, 1, 1] = 8.0 + 4 * seed  # thresholds channel 0 near 0.5
            model.bias.fill_(-4.0 - 2 * seed)
        results = evaluate_corruptions(model, data, range(6), cells, model_name=name, arch="c")
        frames += [r.records for r in results]
    return pd.concat(frames, ignore_index=True)


def test_ce_and_mce_follow_hendrycks_and_dietterich(records):
    table, summary = corruption_table(records, "per-class")
    cells = summarize_cells(records, "per-class").set_index(["model", "attack"])
    dsc = {  # (model, corruption) -> {severity: DSC} from summarize_cells directly
        (m, c): {s: cells.loc[(m, f"corruption:{c}:{s}"), "dsc_adv"] for s in levels}
        for m in ("base", "other") for c, levels in (("noise", (1, 4)), ("blur", (2, 5)))
    }  # fmt: skip
    clean = {m: cells.loc[(m, "corruption:noise:1"), "dsc_clean"] for m in ("base", "other")}
    row = table.set_index(["model", "corruption"])
    for (model, corruption), by_s in dsc.items():
        errors = [1 - v for v in by_s.values()]
        base = [1 - v for v in dsc["base", corruption].values()]
        assert row.loc[(model, corruption), "ce"] == pytest.approx(sum(errors) / sum(base))
        drop = sum(e - (1 - clean[model]) for e in errors)
        base_drop = sum(e - (1 - clean["base"]) for e in base)
        expected_rce = drop / base_drop if base_drop > 0 else np.nan
        assert row.loc[(model, corruption), "rce"] == pytest.approx(expected_rce, nan_ok=True)
        assert row.loc[(model, corruption), "dsc_mean"] == pytest.approx(
            np.mean(list(by_s.values()))
        )
        for s in range(1, 6):
            value = row.loc[(model, corruption), f"dsc_s{s}"]
            assert value == pytest.approx(by_s[s]) if s in by_s else np.isnan(value)
    by_model = summary.set_index("model")
    assert by_model.loc["base", "mce"] == pytest.approx(1.0)
    assert by_model.loc["other", "mce"] == pytest.approx(row.loc["other", "ce"].mean())
    assert set(summary["baseline"]) == {"base"}
    other, _ = corruption_table(records, "per-class", baseline="other")
    assert other.set_index(["model", "corruption"]).loc[("other", "noise"), "ce"] == 1.0
    with pytest.raises(UserError, match="baseline 'nope'"):
        corruption_table(records, "per-class", baseline="nope")


def test_attack_rows_are_left_out_of_the_corruption_dice(records):
    attack_like = records.assign(corruption="", severity=0, attack="fgsm")
    assert corruption_dice(attack_like, "per-class").empty
    assert len(corruption_dice(records, "per-class")) == 2 * 4


def test_the_report_has_a_corruption_section_with_panels(tmp_path, capsys):
    data = tmp_path / "data"
    write_synthetic(data, cases=3, scans=1, slices=3)
    torch.manual_seed(0)
    model = create_model("unet-tiny")
    preprocessing = to_dict(PreprocessConfig(size=32))
    source = {"config": {"path": str(data), "cache_dir": str(tmp_path / "cache")},
              "test_fraction": 0.34, "split_seed": 0}  # fmt: skip
    meta = metadata_for(model, list(UWMGI_CLASSES), preprocessing=preprocessing, data=source)
    save_checkpoint(tmp_path / "tiny", model, meta)
    out = tmp_path / "run"
    args = ["evaluate", str(tmp_path / "tiny"), "--out", str(out), "--corruption", "gamma:3"]
    args += ["--corruption", "spike:5", "--attack", "fgsm", "--loss", "bce", "--examples", "1"]
    with pytest.raises(SystemExit) as done:
        main([*args, "--device", "cpu"])
    assert done.value.code == 0
    report = write_report(out)
    html = report.html.read_text()
    assert "Corruptions (TorchIO)" in html and "mCE" in html
    written = {p.name for p in report.files}
    assert {"corruption_table.csv", "corruption_summary.csv", "corruption_dice.png"} <= written
    assert {"panel_tiny_corruption-gamma.png", "panel_tiny_corruption-spike.png"} <= written
    assert report.eps == pytest.approx(0.009)  # the attack cells keep Table II


@pytest.mark.slow  # trains a model (about 80 s on a shared CPU)
def test_a_grid_with_corruptions_runs_them_once_per_model_and_resumes(tmp_path):
    from advseg.augment import AugmentConfig
    from advseg.data import DataConfig
    from advseg.experiment import (
        AttackSpec,
        EvaluationSpec,
        ExperimentConfig,
        ModelSpec,
        SplitSpec,
        load_experiment,
        plan_cells,
        run_experiment,
    )
    from advseg.runs.records import read_records
    from advseg.train import TrainConfig

    data = tmp_path / "data"
    write_synthetic(data, cases=3, scans=1, slices=4)
    config = ExperimentConfig(
        name="corrupt",
        data=DataConfig(
            path=data, cache_dir=tmp_path / "cache", preprocess=PreprocessConfig(size=32)
        ),
        split=SplitSpec(test_fraction=0.34, val_fraction=0.5),
        train=TrainConfig(
            epochs=1, batch_size=4, device="cpu", augment=AugmentConfig(enabled=False)
        ),
        models=[ModelSpec(arch="unet-tiny")],
        attacks=[AttackSpec(name="fgsm", losses=["bce"], eps=[0.02])],
        evaluation=EvaluationSpec(batch_size=4, examples=1),
        corruptions=["blur:1", "blur:4", "gamma:2"],
    )
    labels = [c.attack for c in plan_cells(config)]
    assert labels == ["fgsm", "corruption:blur:1", "corruption:blur:4", "corruption:gamma:2"]
    result = run_experiment(config, tmp_path / "run")
    records = read_records(tmp_path / "run")
    assert set(records["corruption"]) == {"", "blur", "gamma"}
    assert not any("corruption" in str(c) for c in result.summary.columns)  # Table II: attacks
    assert load_experiment(tmp_path / "run" / "config.yaml").corruptions == config.corruptions
    again = run_experiment(config, tmp_path / "run")
    assert len(again.grid.skipped) == 4 and not again.grid.computed
    with pytest.raises(UserError, match="corruptions: unknown corruption 'blurr'"):
        from advseg.experiment.check import check_config

        check_config(ExperimentConfig(corruptions=["blurr:2"]))


def _trained_three(tmp_path, slices=5):
    """Three unet-tiny checkpoints: adversarially trained, corruption-trained, plain."""
    data = tmp_path / "data"
    write_synthetic(data, cases=3, scans=1, slices=slices)
    preprocessing = to_dict(PreprocessConfig(size=32))
    source = {"config": {"path": str(data), "cache_dir": str(tmp_path / "cache")},
              "test_fraction": 0.34, "split_seed": 0}  # fmt: skip
    trainings = {
        "a_adv": {"adversarial": {"method": "fgsm-rs", "eps": 0.03}},
        "b_corr": {"augment": {"corruptions": ["noise"], "p_corruption": 0.5}},
        "c_plain": {"adversarial": {"method": "none"}},
    }
    for name, train in trainings.items():
        torch.manual_seed(0)
        model = create_model("unet-tiny")
        meta = metadata_for(
            model, list(UWMGI_CLASSES), preprocessing=preprocessing, data=source, train=train
        )
        save_checkpoint(tmp_path / name, model, meta)
    return [tmp_path / name for name in trainings]


def test_the_mce_baseline_is_the_undefended_model_unless_chosen(tmp_path):
    """Default: the first model trained without a defence (here the last in name order);
    ``given`` (``advseg report --baseline``) chooses another; a stranger is refused."""
    from advseg.report.corruptions import choose_baseline

    paths = _trained_three(tmp_path, slices=1)
    run = tmp_path / "run"
    run.mkdir()
    (run / "evaluate.yaml").write_text(yaml.safe_dump({"checkpoints": list(map(str, paths))}))
    models = [p.name for p in paths]
    assert choose_baseline(run, models) == ("c_plain", "the first model trained without a defence")
    assert choose_baseline(run, models[:2])[0] == "a_adv"  # no undefended one: the first
    assert choose_baseline(run, models, "b_corr") == ("b_corr", "chosen")
    assert choose_baseline(tmp_path / "nothing", models)[0] == "a_adv"  # no training found
    with pytest.raises(UserError, match=r"--baseline: 'zz' is not a model"):
        choose_baseline(run, models, "zz")


@pytest.mark.slow  # three evaluations and two reports (about 90 s on a loaded CPU)
def test_the_report_names_its_mce_baseline_and_takes_another(tmp_path):
    paths = _trained_three(tmp_path)
    out = tmp_path / "run"
    args = ["evaluate", *map(str, paths), "--out", str(out)]
    with pytest.raises(SystemExit) as done:
        main([*args, "--corruption", "blur:5", "--device", "cpu"])
    assert done.value.code == 0
    summary = pd.read_csv(write_report(out).html.parent / "corruption_summary.csv")
    assert set(summary["baseline"]) == {"c_plain"}
    assert summary.set_index("model").loc["c_plain", "mce"] == pytest.approx(1.0)
    assert "relative to c_plain (the first model trained without a defence" in (
        (out / "report" / "report.md").read_text()
    )
    with pytest.raises(SystemExit) as done:
        main(["report", str(out), "--baseline", "a_adv", "--out", str(tmp_path / "r2")])
    assert done.value.code == 0
    summary = pd.read_csv(tmp_path / "r2" / "corruption_summary.csv")
    assert set(summary["baseline"]) == {"a_adv"}


def test_an_experiment_names_its_corruption_baseline_among_its_models():
    from advseg.config import from_dict
    from advseg.experiment.check import check_config
    from advseg.experiment.config import ExperimentConfig

    grid = {"models": [{"arch": "unet-tiny", "name": "plain"}, {"arch": "unet-tiny", "name": "b"}],
            "corruptions": ["noise:1"]}  # fmt: skip
    config = check_config(from_dict(ExperimentConfig, {**grid, "corruption_baseline": "b"}))
    assert config.corruption_baseline == "b"
    with pytest.raises(UserError, match=r"corruption_baseline: 'c' is not a model of the grid"):
        check_config(from_dict(ExperimentConfig, {**grid, "corruption_baseline": "c"}))
    without = {**grid, "corruptions": [], "corruption_baseline": "b"}
    with pytest.raises(UserError, match="corruption_baseline: does nothing without corruptions"):
        check_config(from_dict(ExperimentConfig, without))
