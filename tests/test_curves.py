"""Robustness curves: min_eps in the records of a minimal-norm cell, curves, medians and their
case-bootstrap intervals from records, agreement with a fixed-eps sweep, and the report section."""

import math

import numpy as np
import pandas as pd
import pytest

from advseg.evaluate import evaluate_cell
from advseg.runs.records import RECORD_COLUMNS, check_records, check_values
from advseg.stats import curves
from test_evaluate import MemoryData, model  # noqa: F401 (a fixture)  # tests/ is on sys.path


def test_a_minimal_norm_cell_records_each_slices_min_eps_and_criterion(model):  # noqa: F811
    data = MemoryData(8, seed=3)
    rows = list(range(8))
    options = {"criterion": "dice", "threshold": 0.5, "steps": 60}
    result = evaluate_cell(model, data, rows, "pdpgd", ["bce"], 1.0, model_name="m", arch="tiny",
                           attack_kwargs=options, batch_size=4)  # fmt: skip
    records = check_records(result.records)
    check_values(records, "records")
    assert list(records.columns) == list(RECORD_COLUMNS)
    assert (records["min_eps_criterion"] == "dice<=0.5").all()
    assert (records["attack_setting"] == "steps=60 refine=apgd-bisection 6x20").all()
    # min_eps is refined below the search's own norm, kept as min_eps_upper
    assert (records["min_eps"] <= records["min_eps_upper"]).all()
    median = curves.median_min_eps(records).iloc[0]
    assert median["median"] <= median["median_upper"] < math.inf
    slices = curves.slice_table(records)
    per_slice = records.groupby("slice_id")["min_eps"].nunique(dropna=False)
    assert (per_slice == 1).all()  # one value per slice, repeated over its classes
    found = np.isfinite(slices["min_eps"].to_numpy())
    assert found.sum() >= 6
    # the cap (1.0) is the whole range: the images returned are the minimal ones found, so their
    # L-inf norm is min_eps and their Dice meets the criterion
    linf = records.groupby("slice_id", sort=False)["linf"].first().to_numpy()
    assert np.allclose(linf[found], slices["min_eps"].to_numpy()[found], rtol=1e-5, atol=1e-7)
    assert (slices["dice_adv"].to_numpy()[found] <= 0.5 + 1e-9).all()
    plain = evaluate_cell(model, data, rows, "fgsm", ["bce"], 0.01, model_name="m", arch="tiny")
    plain = check_records(plain.records)
    assert plain["min_eps"].isna().all() and (plain["min_eps_criterion"] == "").all()


def fake_records(min_eps: dict[str, float], cases: dict[str, int], attack: str = "alma-prox",
                 criterion: str = "dice<=0.5", eps: float = 1.0,
                 dice: dict[str, float] | None = None) -> pd.DataFrame:  # fmt: skip
    """Two classes per slice; a minimal-norm cell (``min_eps``) or, with ``dice``, a fixed-eps
    cell whose slices have that Dice."""
    rows = []
    for slice_id, value in (dice or min_eps).items():
        for name in ("a", "b"):
            rows.append({c: 0 for c in RECORD_COLUMNS} | {
                "model": "m", "source": "m", "arch": "tiny", "attack": attack, "loss": "bce",
                "member": "", "eps": eps, "slice_id": slice_id, "case": cases[slice_id],
                "scan": "s", "class": name, "dice_clean": 1.0,
                "dice_adv": value if dice else 0.0, "corruption": "",
                "min_eps": math.nan if dice else value,
                "min_eps_criterion": "" if dice else criterion})  # fmt: skip
    return check_records(pd.DataFrame(rows))


def test_the_curve_is_the_share_of_slices_with_min_eps_at_most_eps():
    values = {"s1": 0.0, "s2": 0.01, "s3": 0.02, "s4": math.inf}
    records = fake_records(values, {s: i for i, s in enumerate(values)})
    curve = curves.min_eps_curve(records, [0.0, 0.005, 0.01, 0.02, 5.0])
    assert curve["broken"].tolist() == [0.25, 0.25, 0.5, 0.75, 0.75]
    assert (curve["slices"] == 4).all() and (curve["min_eps_criterion"] == "dice<=0.5").all()


def test_agreement_compares_the_curve_with_a_sweep_at_the_criterions_threshold():
    values = {"s1": 0.01, "s2": 0.02, "s3": 0.03, "s4": math.inf}
    cases = {s: i for i, s in enumerate(values)}
    minimal = fake_records(values, cases)
    # APGD at 0.015: s1 broken (Dice 0.2 <= 0.5); at 0.03: s1, s2 (s3 0.6 is not)
    sweep = [fake_records({}, cases, "apgd", eps=0.015,
                          dice={"s1": 0.2, "s2": 0.9, "s3": 0.9, "s4": 1.0}),
             fake_records({}, cases, "apgd", eps=0.03,
                          dice={"s1": 0.1, "s2": 0.5, "s3": 0.6, "s4": 1.0})]  # fmt: skip
    records = pd.concat([minimal, *sweep], ignore_index=True)
    points = curves.sweep_curve(records, 0.5)
    assert points["broken"].tolist() == [0.25, 0.5]
    row = curves.agreement(records).iloc[0]
    # the curve at 0.015 and 0.03: 0.25 and 0.75; the sweep 0.25 and 0.5
    assert row["points"] == 2 and row["sweep_attack"] == "apgd"
    assert row["max_abs_diff"] == pytest.approx(0.25)
    assert row["mean_abs_diff"] == pytest.approx(0.125)
    assert row["mean_diff"] == pytest.approx(0.125)
    pixels = fake_records(values, cases, criterion="pixels>=0.99")
    assert curves.agreement(pd.concat([pixels, *sweep])).empty  # no Dice threshold to compare


def test_median_min_eps_and_its_case_bootstrap_interval():
    rng = np.random.default_rng(0)
    values = {f"s{i}": float(v) for i, v in enumerate(rng.uniform(0.001, 0.05, 40))}
    values["s0"] = math.inf
    cases = {s: i // 4 for i, s in enumerate(values)}  # 10 cases of 4 slices
    row = curves.median_min_eps(fake_records(values, cases), draws=500).iloc[0]
    ordered = np.sort(np.array(list(values.values())))
    assert row["median"] == ordered[19]  # the lower median of 40
    assert row["low"] <= row["median"] <= row["high"] and row["low"] < row["high"]
    assert row["cases"] == 10 and row["slices"] == 40 and row["found"] == pytest.approx(39 / 40)
    few = curves.median_min_eps(fake_records(values, {s: i % 3 for i, s in enumerate(values)}))
    assert math.isnan(few.iloc[0]["low"])  # 3 cases: no meaningful interval


def test_weighted_median_equals_the_median_of_the_repeated_values():
    rng = np.random.default_rng(1)
    values = np.sort(rng.uniform(0, 1, 9))
    weights = rng.integers(0, 4, (20, 9)).astype(float)
    weights[:, 0] += 1  # no draw without any slice
    got = curves.weighted_median(values, weights)
    for w, m in zip(weights, got, strict=True):
        repeated = np.repeat(values, w.astype(int))
        assert m == repeated[(len(repeated) - 1) // 2]  # the lower median


def test_the_report_section_draws_and_tabulates_the_curves(tmp_path):
    from advseg.report import _Writer
    from advseg.report.curves import sections

    values = {f"s{i}": 0.002 * (i + 1) for i in range(12)}
    cases = {s: i // 2 for i, s in enumerate(values)}
    records = pd.concat([
        fake_records(values, cases),
        fake_records({}, cases, "apgd", eps=0.01, dice={s: 0.2 if i < 5 else 0.9
                                                       for i, s in enumerate(values)}),
    ], ignore_index=True)  # fmt: skip
    writer = _Writer(tmp_path)
    (section,) = sections(writer, records)
    assert "Robustness curves" in section.title
    names = {p.name for p in writer.files}
    assert {"robustness_curve_m.png", "min_eps.csv", "curve_agreement.csv"} <= names
    agree = pd.read_csv(tmp_path / "curve_agreement.csv")
    assert agree["mean_abs_diff"].iloc[0] == pytest.approx(0.0)  # 5 of 12 broken at 0.01: both
    assert sections(_Writer(tmp_path / "none"), records[records["attack"] == "apgd"]) == []
    # the note says how each cell measured min_eps, and calls an unrefined one an upper bound
    refined = records.assign(attack_setting=np.where(
        records["attack"] == "alma-prox", "steps=500 refine=apgd-bisection 6x20", ""))  # fmt: skip
    writer = _Writer(tmp_path / "refined")
    sections(writer, refined)
    assert "alma-prox: steps=500 refine=apgd-bisection 6x20" in writer.notes[0]
    assert "upper bound, which" not in writer.notes[0]
    off = refined.assign(attack_setting=refined["attack_setting"].str.replace(
        "refine=apgd-bisection 6x20", "refine=off"))  # fmt: skip
    writer = _Writer(tmp_path / "off")
    sections(writer, off)
    assert "alma-prox: steps=500 refine=off" in writer.notes[0]
    assert "upper bound, which" in writer.notes[0]
