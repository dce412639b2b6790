"""The claims sections: paired loss tests, exact Spearman, the luminosity band, in the report."""

import itertools
import math
import time

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from advseg.report import write_report
from advseg.report.claims import (
    _wilcoxon,
    exact_spearman,
    loss_ranking,
    luminosity_band,
    per_slice_dsc,
    ranking_verdict,
)
from advseg.runs.records import write_records
from test_bootstrap import synthetic_records


def _slices(effects: dict[str, float], n: int = 40, seeds: int = 1, noise: float = 0.05):
    rng = np.random.default_rng(0)
    rows = []
    for seed in range(seeds):
        base = rng.uniform(0.4, 0.8, n)
        for loss, effect in effects.items():
            for i in range(n):
                dsc = base[i] - effect + noise * rng.standard_normal()
                rows.append({"model": "m", "seed": seed, "attack": "fgsm", "eps": 0.009,
                             "loss": loss, "slice_id": f"s{i}", "case": i // 4,
                             "dsc_adv": dsc})  # fmt: skip
    return pd.DataFrame(rows)


def test_a_clearly_stronger_loss_is_named_robustly_strongest():
    ranking = loss_ranking(_slices({"bce": 0.2, "focal": 0.05, "dicefocal": 0.0}, seeds=3))
    bce_focal = ranking[(ranking["loss_a"] == "bce") & (ranking["loss_b"] == "focal")].iloc[0]
    assert bce_focal["n"] == 120 and bce_focal["a_lower"] > 0.9 and bce_focal["p_holm"] < 1e-6
    assert bce_focal["seeds_a_lower"] == "3/3" and bce_focal["cases"] == 10
    d = _slices({"bce": 0.2, "focal": 0.05}, seeds=3)
    wide = d.pivot_table(index=["seed", "slice_id"], columns="loss", values="dsc_adv")
    assert bce_focal["p"] != stats.wilcoxon(wide["bce"] - wide["focal"]).pvalue  # other noise
    verdict, lines = ranking_verdict(ranking)
    assert verdict["robustly_strongest"].tolist() == ["bce"]
    assert "bce in 1 of 1" in lines[0]


def test_the_effect_interval_holds_the_true_difference():
    ranking = loss_ranking(_slices({"bce": 0.2, "focal": 0.05}, seeds=3))
    row = ranking.iloc[0]
    assert row["diff"] == pytest.approx(row["dsc_a"] - row["dsc_b"])
    assert row["diff_low"] < -0.15 < row["diff_high"] < 0  # true difference -0.15
    again = loss_ranking(_slices({"bce": 0.2, "focal": 0.05}, seeds=3)).iloc[0]
    assert (again["diff_low"], again["diff_high"]) == (row["diff_low"], row["diff_high"])


def test_cases_that_disagree_make_a_slice_level_winner_unproven_by_cases():
    # 10 cases x 20 slices: bce is lower by 0.06 on 6 cases and higher by 0.05 on 4. Slices
    # pooled see a consistent effect; the patients do not agree.
    rng = np.random.default_rng(3)
    rows = []
    for i in range(200):
        case = i // 20
        shift = 0.06 if case < 6 else -0.05
        base = rng.uniform(0.4, 0.8)
        for loss, value in (("bce", base - shift), ("focal", base)):
            rows.append({"model": "m", "attack": "fgsm", "eps": 0.009, "loss": loss,
                         "slice_id": f"s{i}", "case": case,
                         "dsc_adv": value + 0.002 * rng.standard_normal()})  # fmt: skip
    ranking = loss_ranking(pd.DataFrame(rows))
    row = ranking.iloc[0]
    assert row["cases"] == 10 and row["p_holm"] < 1e-6 and row["p_cases_holm"] > 0.05
    assert row["diff_low"] < 0 < row["diff_high"]
    verdict, lines = ranking_verdict(ranking)
    assert verdict["robustly_strongest"].tolist() == ["bce"]
    assert verdict["robust_by_cases"].tolist() == ["none"]
    assert "over slices: bce in 1 of 1" in lines[0]
    assert "over per-case means: no loss in any, BCE in 0" in lines[0]


def test_no_loss_is_robustly_strongest_when_they_are_equal():
    ranking = loss_ranking(_slices({"bce": 0.0, "focal": 0.0, "dicefocal": 0.0}))
    verdict, lines = ranking_verdict(ranking)
    assert verdict["robustly_strongest"].tolist() == ["none"]
    assert "no loss in any of 1" in lines[0]


def test_exact_spearman_enumerates_every_pairing():
    x, y = np.array([1.0, 2.0, 3.0, 4.0, 5.0]), np.array([0.1, 0.3, 0.2, 0.5, 0.4])
    rho, p, floor = exact_spearman(x, y)
    rhos = [stats.spearmanr(x, perm).statistic for perm in itertools.permutations(y)]
    expected = np.mean(np.abs(rhos) >= abs(rho) - 1e-12)
    assert rho == pytest.approx(0.8) and p == pytest.approx(expected)
    assert floor == pytest.approx(2 / math.factorial(5))
    _, p4, floor4 = exact_spearman(np.arange(4.0), np.arange(4.0))
    assert p4 == pytest.approx(2 / 24) and floor4 >= 0.05  # four models can never reach 0.05
    assert math.isnan(exact_spearman(np.arange(2.0), np.arange(2.0))[0])


def test_luminosity_band_holds_the_true_slope():
    rng = np.random.default_rng(1)
    case = np.repeat(np.arange(30), 5)
    x = rng.uniform(0.1, 0.6, case.size)
    y = 2.0 * x + rng.normal(0, 0.1, 30)[case] + rng.normal(0, 0.05, case.size)
    band = luminosity_band(pd.DataFrame({"luminosity": x, "attack_success": y, "case": case}))
    assert band["slope_low"] < 2.0 < band["slope_high"]
    assert (band["low"] <= band["fit"] + 1e-12).all() and (
        band["fit"] <= band["high"] + 1e-12
    ).all()


def test_report_has_the_claim_sections(tmp_path):
    frames = []
    for model, params in (("a", 10), ("b", 20), ("c", 30)):
        for attack in ("fgsm", "fgsm:notebook"):
            for loss in ("bce", "focal", "dicefocal"):
                r = synthetic_records(6, seed=hash((model, attack, loss)) % 100, model=model)
                frames.append(r.assign(attack=attack, loss=loss, params=params))
    records = pd.concat(frames, ignore_index=True)
    records["luminosity"] = records["case"] / 10 + records["slice"] / 100
    write_records(records, tmp_path / "records" / "all.parquet")
    report = write_report(tmp_path, protocol="paper")
    names = {p.name for p in report.files}
    assert {"claim_loss_ranking.csv", "claim_loss_verdict.csv", "claim_params_tests.csv"} <= names
    assert "claim_luminosity_fgsm-notebook_bce.png" in names
    text = report.markdown.read_text()
    assert "fgsm:notebook (the paper's notebook code): robustly strongest loss" in text
    slices = per_slice_dsc(records, "paper")
    assert len(slices) == 3 * 2 * 3 * 6 * 4  # models x attacks x losses x cases x slices


def test_three_models_in_reverse_order_are_p_one_third_not_zero():
    """With 3 models rho = -1 is the most extreme of 3! pairings (two-sided p = 2/6)."""
    rho, p, floor = exact_spearman(np.array([1e6, 5e6, 2e7]), np.array([0.9, 0.5, 0.1]))
    assert rho == pytest.approx(-1.0) and p == pytest.approx(1 / 3) and floor == p


def test_exact_p_of_eight_models_is_vectorised():
    """8! = 40320 pairings in well under a second (an unvectorised test took minutes)."""
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=8), rng.normal(size=8)
    start = time.perf_counter()
    rho, p, _ = exact_spearman(x, y)
    assert time.perf_counter() - start < 2.0
    rx, ry = stats.rankdata(x), stats.rankdata(y)
    rhos = np.array([np.corrcoef(rx, perm)[0, 1] for perm in itertools.permutations(ry)])
    expected = 2 * min(np.mean(rhos <= rho + 1e-12), np.mean(rhos >= rho - 1e-12))
    assert p == pytest.approx(min(1.0, expected))


def test_wilcoxon_with_ties_is_a_permutation_p_not_the_normal_approximation():
    d = np.array([1, 1, 2, 2, 3, -1, 4, 4, 5, -2, 6, 6, 7, -3, 8], float)  # 15, tied
    ranks = stats.rankdata(np.abs(d))
    signs = np.array(list(itertools.product([1, -1], repeat=len(d))))  # every sign flip
    null = (signs > 0) @ ranks
    observed = ranks[d > 0].sum()
    centre = ranks.sum() / 2
    exact = np.mean(np.abs(null - centre) >= abs(observed - centre) - 1e-9)
    assert _wilcoxon(d) == pytest.approx(exact, abs=0.01)


def test_the_effect_interval_is_left_out_below_five_cases():
    few = _slices({"bce": 0.2, "focal": 0.05}, n=16)  # 4 cases of 4 slices
    row = loss_ranking(few).iloc[0]
    assert row["cases"] == 4 and np.isnan(row["diff_low"]) and np.isnan(row["diff_high"])
    assert np.isfinite(row["diff"])  # the estimate stays; only the bounds are not meaningful
    row = loss_ranking(_slices({"bce": 0.2, "focal": 0.05}, n=20)).iloc[0]
    assert row["cases"] == 5 and row["diff_low"] < row["diff"] < row["diff_high"]


def test_a_median_min_eps_without_an_interval_says_why():
    from advseg.report.curves import _interval_text

    assert (
        _interval_text(0.0123, float("nan"), float("nan"), 2)
        == "0.0123 (no interval: 2 cases, < 5)"
    )
    assert _interval_text(0.0123, 0.01, 0.015, 6) == "0.0123 [0.01, 0.015]"
