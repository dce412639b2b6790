"""The report, built from records synthesised here (no model, no evaluation)."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from advseg.errors import UserError
from advseg.report import write_report
from advseg.report.stats import correlate
from advseg.runs.examples import save_examples
from advseg.runs.records import RECORD_COLUMNS, read_records, write_records
from advseg.stats.summary import summarize

CLASSES = ["large_bowel", "small_bowel", "stomach"]
MODELS = {"small": 1_000_000, "mid": 5_000_000, "big": 20_000_000}
GRID = [("bce", 0.003), ("bce", 0.009), ("focal", 0.009), ("dicefocal", 0.009), ("bce", 0.03)]


def _records(seed: int = 0, slices: int = 6) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for model, params in MODELS.items():
        for loss, eps in GRID:
            for s in range(slices):
                luminosity = 0.1 + 0.05 * s
                for k, name in enumerate(CLASSES):
                    gt = int(rng.integers(0, 3)) * 50 * (k + 1) if s else 0  # slice 0: no mask
                    tp = int(gt * rng.uniform(0.6, 0.95))
                    tp_adv = int(tp * rng.uniform(0.2, 1.0) * (1 - 10 * eps))
                    row = dict.fromkeys(RECORD_COLUMNS, 0.0)
                    row.update(model=model, source=model, arch="unet", params=params)
                    row.update(attack="fgsm")
                    row.update(loss=loss, eps=eps, slice_id=f"case1_day0_slice_{s:04d}")
                    row.update(case=1, scan="case1_day0", slice=s, gt_pixels=gt)
                    row.update({"class": name, "luminosity": luminosity})
                    row.update(tp_clean=tp, fn_clean=gt - tp, fp_clean=int(rng.integers(0, 9)))
                    row.update(tp_adv=tp_adv, fn_adv=gt - tp_adv, fp_adv=int(rng.integers(0, 40)))
                    row["dice_clean"] = 2 * tp / max(2 * tp + row["fp_clean"] + gt - tp, 1)
                    row["dice_adv"] = 2 * tp_adv / max(2 * tp_adv + row["fp_adv"] + gt - tp_adv, 1)
                    rows.append(row)
    return pd.DataFrame(rows)


def _write_run(run_dir, records: pd.DataFrame, examples: bool = True) -> None:
    for (model, eps), frame in records.groupby(["model", "eps"]):
        write_records(frame, run_dir / "records" / f"{model}__fgsm__eps{eps:g}.parquet")
        if examples and eps == 0.009:
            rng = np.random.default_rng(1)
            image = rng.uniform(0, 1, (2, 3, 32, 32)).astype(np.float32)
            mask = np.zeros((2, 3, 32, 32), np.uint8)
            mask[:, 0, 8:20, 8:20] = 1
            pred = np.roll(mask, 3, axis=-1)
            losses = ["bce", "focal", "dicefocal"]
            delta = 0.009 * np.sign(rng.normal(size=image.shape)).astype(np.float32)
            save_examples(
                {
                    "slice_ids": np.array(["case1_day0_slice_0001", "case1_day0_slice_0002"]),
                    "image": image,
                    "mask": mask,
                    "pred_clean": pred,
                    "losses": np.array(losses),
                    "x_adv": np.stack([np.clip(image + delta, 0, 1)] * len(losses)),
                    "pred_adv": np.stack([np.roll(pred, 6, axis=-2)] * len(losses)),
                },
                run_dir / "examples" / f"{model}__fgsm__eps{eps:g}.npz",
                model=model,
                attack="fgsm",
                eps=eps,
            )


def test_report_renders_summarize_and_writes_every_file(tmp_path):
    records = _records()
    _write_run(tmp_path, records)
    report = write_report(tmp_path)

    assert report.eps == 0.009  # the eps with every loss, not a sweep-only eps
    on_disk = read_records(tmp_path)
    expected = summarize(on_disk[on_disk["eps"] == 0.009], "per-class")
    pd.testing.assert_frame_equal(report.table, expected)
    names = {p.name for p in report.files}
    assert {"report.html", "report.md", "table2.csv", "per_class.csv", "cells.csv"} <= names
    assert {"dsc_vs_eps.png", "loss_comparison.png", "params_vs_attack_success.png"} <= names
    assert {f"panel_{m}_fgsm.png" for m in MODELS} <= names
    assert report.notes == []
    pngs = {n for n in names if n.endswith(".png")}
    assert {n[:-4] + ".svg" for n in pngs} <= names  # every figure also as vector graphics
    svg = (tmp_path / "report" / "dsc_vs_eps.svg").read_text()
    assert svg.startswith("<?xml") and "<svg" in svg
    cells_header = (tmp_path / "report" / "cells.csv").read_text().splitlines()[0].split(",")
    assert {"HD95 clean (px)", "HD95 adv (px)", "HD95 clean (mm)", "HD95 adv (mm)"} <= set(
        cells_header
    )

    html = report.html.read_text()
    assert html.count("data:image/png;base64,") == sum(n.endswith(".png") for n in names)
    assert 'src="http' not in html and "<script" not in html  # self-contained, nothing fetched
    for path in report.files:
        if path.suffix in {".csv", ".md", ".html"}:
            assert not re.search(r"\bnan\b", path.read_text(), re.IGNORECASE), path.name
    # Table II's numbers are summarize's, to the digit the report shows.
    clean = expected.set_index("model")["DSC clean"]
    markdown = report.markdown.read_text()
    for value in clean:
        assert f"{value:.4f}" in markdown
    # The parameter correlation is scipy's, over the three models.
    cells = pd.read_csv(tmp_path / "report" / "params_vs_attack_success.csv")
    bce = cells[(cells["loss"] == "bce") & (cells["eps"] == 0.009)]
    stat = correlate(bce["params_m"], bce["attack_success"])
    table = pd.read_csv(tmp_path / "report" / "params_correlation.csv")
    row = table[table["series"] == "fgsm / bce"].iloc[0]
    assert row["n"] == 3 and row["pearson_r"] == pytest.approx(stat.pearson_r, abs=1e-4)
    per_class = pd.read_csv(tmp_path / "report" / "per_class.csv")
    assert sorted(per_class["class"].unique()) == CLASSES


def test_report_without_examples_says_so_and_leaves_out_what_cannot_apply(tmp_path):
    records = _records()
    records = records[records["model"].isin(["small", "mid"])]  # two models: no correlation
    _write_run(tmp_path, records, examples=False)
    report = write_report(tmp_path, protocol="paper", eps=0.03)
    assert report.protocol == "paper" and report.eps == 0.03
    assert any("No saved example slices" in note for note in report.notes)
    html = report.html.read_text()
    assert "panels need a run with evaluation.examples" in html
    names = {p.name for p in report.files}
    # Two models: no parameter figure, claim or table, no luminosity plots; the report says why.
    assert not {n for n in names if n.startswith(("params_", "claim_params", "luminosity"))}
    assert not {n for n in names if n.startswith("claim_luminosity")}
    assert "<h2>Sections left out of this run&#x27;s report</h2>" in html
    assert "2 model(s), fewer than 3" in html and "needs the paper&#x27;s grid" in html
    assert "Parameter count against Attack Success</h2>" not in html


def test_bad_run_directories_get_one_line_naming_the_file(tmp_path):
    with pytest.raises(UserError, match="no records"):
        write_report(tmp_path)
    _write_run(tmp_path, _records(), examples=False)
    with pytest.raises(UserError, match=r"--eps: 0.5 is not in the records"):
        write_report(tmp_path, eps=0.5)
    half = tmp_path / "records" / "half.parquet"
    half.write_bytes((tmp_path / "records" / "big__fgsm__eps0.009.parquet").read_bytes()[:200])
    with pytest.raises(UserError, match=r"half\.parquet: not a complete Parquet records file"):
        write_report(tmp_path)
    half.unlink()
    (tmp_path / "examples").mkdir()
    (tmp_path / "examples" / "bad.npz").write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(UserError, match=r"bad\.npz: not a readable examples file"):
        write_report(tmp_path)


def test_correlation_is_n_a_below_three_points_or_when_constant():
    assert correlate([1, 2], [3, 4]).describe() == "n/a (n < 3), n = 2"
    assert correlate([1, 2, 3], [5, 5, 5], names=("p", "AS")).reason == "AS is constant"
    stat = correlate([1, 2, 3, 4], [1, 3, 2, 4])
    assert stat.spearman_rho == pytest.approx(0.8) and 0 < stat.pearson_p < 1
    reverse = correlate([1e6, 5e6, 2e7], [0.3, 0.2, 0.1])  # 3 models: 2 of 3! pairings as extreme
    assert reverse.spearman_p == pytest.approx(1 / 3) and reverse.method == "exact"
    assert "exact p = 0.333" in reverse.describe()
    many = correlate(np.arange(30.0), np.arange(30.0) ** 2)
    assert many.method == "permutation" and many.spearman_p == pytest.approx(2 / 10000)
    assert correlate(np.arange(200.0), np.arange(200.0)).method == "asymptotic"


def test_cli_report_prints_table_ii_and_bad_input_is_one_line(tmp_path, capsys):
    from advseg.cli import main

    _write_run(tmp_path, _records(), examples=False)
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(tmp_path), "--eps", "0.009"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert (
        "Table II: fgsm, eps 0.009 (2.29/255) (DSC = per-class Dice" in out and "report.html" in out
    )
    assert "No saved example slices" in out
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(tmp_path / "missing")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "missing: no such file or directory" in err


def test_provenance_opens_the_report_and_a_broken_model_is_warned_about(tmp_path, monkeypatch):
    import json

    import advseg
    from advseg.report.provenance import BROKEN_DICE
    from advseg.runs.provenance import read_sessions, record_session, set_arguments

    records = _records()
    broken = records["model"] == "small"  # a model that segments next to nothing
    records.loc[broken, "tp_clean"] = 0
    records.loc[broken, "dice_clean"] = 0.0
    _write_run(tmp_path, records, examples=False)
    (tmp_path / "config.yaml").write_text("data:\n  path: synthetic\nseed: 7\n")
    (tmp_path / "data.json").write_text(json.dumps({"fingerprint": "f", "slices": 123}))
    monkeypatch.setattr("sys.argv", ["script.py", "--flag"])
    record_session(tmp_path, "advseg run", "cpu")  # from Python: marked so
    set_arguments(["run", "x.yaml", "--out", "r"])  # what advseg.cli.main does
    try:
        record_session(tmp_path, "advseg run", "cpu")  # a resume: a second session
    finally:
        set_arguments(None)
    assert len(read_sessions(tmp_path)) == 2

    report = write_report(tmp_path)
    assert len(report.warnings) == 1 and report.warnings[0].startswith("model small has a clean")
    assert f"below {BROKEN_DICE:g}" in report.warnings[0]
    markdown = report.markdown.read_text()
    assert markdown.index("## Provenance") < markdown.index("## Table II")
    assert markdown.index("**Warning: model small") < markdown.index("## Table II")
    assert "SYNTHETIC: the generated phantom, not patient data" in markdown
    assert "| data set size | 123 slices |" in markdown and "6 slices of 1 cases" in markdown
    assert "| session 1 command | (Python API) script.py --flag |" in markdown
    assert "| session 2 command | advseg run x.yaml --out r |" in markdown
    assert f"by advseg {advseg.__version__} on cpu" in markdown
    assert "```\ndata:\n  path: synthetic\nseed: 7\n```" in markdown  # the config, verbatim
    assert 'class="warning"' in report.html.read_text()


def test_report_says_when_max_slices_drew_the_evaluated_slices(tmp_path):
    _write_run(tmp_path, _records(), examples=False)
    (tmp_path / "config.yaml").write_text("evaluation:\n  max_slices: 6\n")
    markdown = write_report(tmp_path).markdown.read_text()
    assert (
        "| evaluated | 6 slices of 1 cases (evaluation.max_slices 6: at most 6 of the test "
        "slices, a seeded draw spread over the test cases) |"
    ) in markdown


def test_a_run_without_provenance_says_so(tmp_path):
    _write_run(tmp_path, _records(), examples=False)
    report = write_report(tmp_path)
    assert report.warnings == []
    markdown = report.markdown.read_text()
    assert "not recorded (run from before provenance.json was written)" in markdown
    assert "not recorded (no data.json or config.yaml data.path in the run)" in markdown


def test_figures_are_grids_with_legends_off_the_values():
    from advseg.report import figures

    cells = (
        pd.DataFrame(
            [
                {"model": m, "attack": "fgsm", "loss": loss, "eps": e, "dsc_clean": 0.8,
                 "dsc_adv": 0.8 - 5 * e, "attack_success": 5 * e / 0.8, "params": 1e6}
                for m in ("a", "b", "c", "d")
                for loss in ("bce", "dice", "focal", "dicefocal", "ce")
                for e in (0.01, 0.03)
            ]
        )
    )  # fmt: skip
    figure = figures.dsc_vs_eps(cells)
    shown = [ax for ax in figure.axes if ax.axison]
    assert len(shown) == 5 and len({round(ax.get_position().x0, 3) for ax in shown}) == 3
    assert len(figure.legends) == 1 and all(ax.get_legend() is None for ax in shown)
    figure.canvas.draw()
    legend = figure.legends[0].get_window_extent()
    assert all(legend.y1 <= ax.get_window_extent().y0 for ax in shown)  # below every panel
    figures.to_png(figure)

    bars = figures.loss_comparison(cells[cells["eps"] == 0.03])
    bars.canvas.draw()
    ax = bars.axes[0]
    assert ax.get_legend().get_window_extent().x0 >= ax.get_window_extent().x1  # beside
    figures.to_png(bars)


def test_a_slice_correlation_says_how_many_patients_stand_behind_it():
    """Issue 26: p-values like 1e-23 came from the 152 slices of one brain, unsaid."""
    x = np.arange(40.0)
    one = correlate(x, x + np.sin(x), cases=np.ones(40))
    assert one.cases == 1 and one.describe().endswith(
        "n = 40 slices of 1 case (p treats slices as independent)"
    )
    assert one.as_row()["cases"] == 1
    kept = correlate([1.0, np.nan, 3.0, 4.0], [2.0, 1.0, 5.0, 3.0], cases=["a", "b", "c", "c"])
    assert kept.cases == 2 and kept.n == 3  # the case of a dropped (NaN) pair is not counted
    assert "cases" not in correlate(x, x**2).as_row()  # points that are not slices: no count


def test_table_ii_caption_names_each_attacks_setting(tmp_path):
    """Which SEA ran (preset, steps per member, members) is said beside Table II."""
    records = _records(slices=3)
    records = records[records["eps"] == 0.009].assign(attack_setting="")
    setting = "preset=fast steps=25 members=masked-bce+segpgd-bce+js+masked-spherical"
    records.loc[records["loss"] == "bce", ["attack", "attack_setting"]] = ["sea", setting]
    _write_run(tmp_path, records, examples=False)
    markdown = write_report(tmp_path).markdown.read_text()
    assert f"Attack settings: sea: {setting}." in markdown
    _write_run(tmp_path / "plain", records.assign(attack_setting=""), examples=False)
    assert "Attack settings" not in write_report(tmp_path / "plain").markdown.read_text()
