"""Case-bootstrap intervals: seeded, around the point estimate, narrower with more cases."""

import numpy as np
import pandas as pd
import pytest

from advseg.runs.records import RECORD_COLUMNS, check_records
from advseg.stats.bootstrap import case_bootstrap, case_weights, with_intervals
from advseg.stats.summary import PROTOCOLS, summarize, summarize_cells

CLASSES = ["large_bowel", "small_bowel", "stomach"]


def synthetic_records(cases: int, slices: int = 4, seed: int = 0, model: str = "m") -> pd.DataFrame:
    """Records of one FGSM cell: each case has its own difficulty (correlated slices)."""
    rng = np.random.default_rng(seed)
    rows = []
    for case in range(1, cases + 1):
        quality = rng.uniform(0.3, 0.95)  # the case's difficulty, shared by its slices
        for s in range(1, slices + 1):
            for k, name in enumerate(CLASSES):
                gt = int(rng.integers(0, 200)) if (s + k) % 3 else 0
                tp_c = int(gt * quality)
                tp_a = int(tp_c * rng.uniform(0.3, 0.9))
                row = {c: 0 for c in RECORD_COLUMNS}
                row.update(model=model, source=model, arch="unet", params=10, attack="fgsm")
                row.update(loss="bce")
                row.update(eps=0.009, slice_id=f"case{case}_day0_slice_{s:04d}", case=case)
                row.update(scan=f"case{case}_day0", slice=s, gt_pixels=gt, **{"class": name})
                row.update(tp_clean=tp_c, fn_clean=gt - tp_c, fp_clean=int(rng.integers(0, 30)))
                row.update(tp_adv=tp_a, fn_adv=gt - tp_a, fp_adv=int(rng.integers(0, 60)))
                rows.append(row)
    return check_records(pd.DataFrame(rows))


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_point_estimate_is_the_summary_and_lies_in_the_interval(protocol):
    records = synthetic_records(12)
    cell = summarize_cells(records, protocol).iloc[0]
    ci = case_bootstrap(records, protocol, draws=500, seed=1)
    for key in ("dsc_clean", "dsc_adv", "as"):
        assert ci[key].estimate == pytest.approx(cell[key], abs=1e-12)
        assert ci[key].low <= ci[key].estimate <= ci[key].high
        assert ci[key].low < ci[key].high
        assert ci[key].cases == 12


def test_seeded():
    records = synthetic_records(10)
    a = case_bootstrap(records, "paper", draws=300, seed=5)
    b = case_bootstrap(records, "paper", draws=300, seed=5)
    c = case_bootstrap(records, "paper", draws=300, seed=6)
    assert a == b
    assert a["dsc_adv"].low != c["dsc_adv"].low


def test_interval_shrinks_as_cases_grow():
    widths = []
    for cases in (8, 32, 128):
        ci = case_bootstrap(synthetic_records(cases, seed=2), "per-class", draws=1000, seed=0)
        widths.append(ci["dsc_clean"].high - ci["dsc_clean"].low)
    assert widths[0] > widths[1] > widths[2]
    assert widths[2] < widths[0] / 2.5  # about 1 / sqrt(cases): 4x the cases, half the width


def test_resamples_cases_not_slices():
    # every slice of a case moves together: one case per draw-weight, never a lone slice
    weights = case_weights(5, draws=50, seed=0)
    assert weights.shape == (50, 5) and (weights.sum(1) == 5).all()
    # six cases, three perfectly good and three perfectly bad: with many slices each, a slice
    # bootstrap would give a narrow interval around 0.5; the case bootstrap spans far wider
    records = synthetic_records(6, slices=40)
    good, bad = records["case"] <= 3, records["case"] > 3
    records.loc[good, ["tp_clean", "fn_clean"]] = records.loc[
        good, ["gt_pixels"]
    ].to_numpy() * np.array([1, 0])
    records.loc[bad, ["tp_clean", "fp_clean"]] = 0
    ci = case_bootstrap(records, "per-class", draws=400, seed=0)["dsc_clean"]
    assert ci.high - ci.low > 0.5


def test_with_intervals_adds_bounds_beside_every_number():
    records = pd.concat(
        [synthetic_records(6, model="a"), synthetic_records(6, seed=1, model="b")],
        ignore_index=True,
    )
    table = with_intervals(records, "paper", draws=200, seed=0)
    plain = summarize(records, "paper")
    for column in plain.columns:
        assert table[column].equals(plain[column])
    columns = list(table.columns)
    for column in ("DSC clean", "DSC fgsm bce eps=0.009", "AS fgsm bce eps=0.009"):
        at = columns.index(column)
        assert columns[at + 1 : at + 3] == [f"{column} low", f"{column} high"]
        assert (table[f"{column} low"] <= table[column]).all()
        assert (table[column] <= table[f"{column} high"]).all()
    assert table.attrs["draws"] == 200


def test_seeds_give_the_mean_the_spread_and_one_interval():
    per_seed = [synthetic_records(8, seed=s).assign(seed=s) for s in range(3)]
    records = pd.concat(per_seed, ignore_index=True)
    table = with_intervals(records, "paper", draws=300, seed=0)
    tables = [summarize(r, "paper") for r in per_seed]
    column = "DSC fgsm bce eps=0.009"
    values = [t[column].iloc[0] for t in tables]
    assert table["seeds"].tolist() == [3]
    assert table[column].iloc[0] == pytest.approx(np.mean(values))
    assert table[f"{column} seed sd"].iloc[0] == pytest.approx(np.std(values, ddof=1))
    assert table["DSC clean"].iloc[0] == pytest.approx(
        np.mean([t["DSC clean"].iloc[0] for t in tables])
    )
    assert (
        table[f"{column} low"].iloc[0] <= table[column].iloc[0] <= table[f"{column} high"].iloc[0]
    )
    columns = list(table.columns)
    at = columns.index(column)
    assert columns[at + 1 : at + 4] == [f"{column} seed sd", f"{column} low", f"{column} high"]


@pytest.mark.parametrize("cases", [1, 2, 4])
def test_fewer_than_five_cases_give_no_interval_and_say_why(cases):
    """Issue 26: one case gave 0.4919 [0.4919, 0.4919]; below 5 cases no bounds, in words."""
    from advseg.stats.bootstrap import MIN_CASES

    records = synthetic_records(cases, slices=6)
    ci = case_bootstrap(records, "per-class", draws=200, seed=0)["dsc_clean"]
    assert MIN_CASES == 5 and not ci.meaningful
    assert np.isnan(ci.low) and np.isnan(ci.high) and np.isfinite(ci.estimate)
    assert ci.cases == cases and ci.slices == cases * 6
    assert "(no interval: " in ci.describe() and "5 needed" in ci.describe()
    table = with_intervals(records, "per-class", draws=200, seed=0)
    assert table["cases"].tolist() == [cases] and table["slices"].tolist() == [cases * 6]
    assert table["interval"].iloc[0].startswith(f"not meaningful: {cases} case")
    bounds = [c for c in table.columns if c.endswith((" low", " high"))]
    assert bounds and table[bounds].isna().all().all()
    assert table.attrs["few_cases"] == [("m", *table.iloc[0][["arch", "params"]])]


def test_five_cases_give_an_interval_with_its_unit_counts():
    records = synthetic_records(5, slices=3)
    ci = case_bootstrap(records, "per-class", draws=200, seed=0)["dsc_clean"]
    assert ci.meaningful and ci.low <= ci.estimate <= ci.high and ci.high > ci.low
    assert ci.describe().endswith("(5 cases, 15 slices)")
    table = with_intervals(records, "per-class", draws=200, seed=0)
    assert table["interval"].iloc[0] == "95% case bootstrap over 5 cases, 15 slices"
    assert table.attrs["few_cases"] == []
