"""The report's robustness-curve section, beside Table II: how much perturbation breaks a slice.

Present when the records hold a minimal-norm cell (``alma-prox``, ``pdpgd``; their
``min_eps``): per model, the share of slices broken as a function of eps, read off the one
minimal-norm run (:func:`advseg.stats.curves.min_eps_curve`), with the points of every fixed-eps
sweep of the same model at the same Dice threshold drawn over it; a table of each cell's median
minimal eps with its case-bootstrap interval; and, where a sweep exists, how far the two curves lie
apart (:func:`advseg.stats.curves.agreement`).
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from advseg.report.figures import legend_beside
from advseg.report.html import Section
from advseg.runs.names import file_stem
from advseg.stats import curves


def curve_figure(records: pd.DataFrame, model: str, title: str) -> Figure:
    """One model's curves: a step line per minimal-norm cell, markers per fixed-eps sweep at a
    Dice criterion's threshold."""
    mine = records[records["model"] == model]
    grid = curves.eps_grid(mine)
    figure, axis = plt.subplots(figsize=(6.4, 4.0))
    curve = curves.min_eps_curve(mine, grid)
    for (attack, loss, criterion), frame in curve.groupby(
        ["attack", "loss", "min_eps_criterion"], sort=True
    ):
        label = f"{attack} / {loss} ({curves.criterion_text(criterion)})"
        axis.step(frame["eps"], frame["broken"], where="post", label=label)
        threshold = curves.dice_threshold(criterion)
        if threshold is None:
            continue
        sweep = curves.sweep_curve(mine, threshold)
        for (s_attack, s_loss), points in sweep.groupby(["attack", "loss"], sort=True):
            label = f"{s_attack} / {s_loss} at fixed eps (Dice <= {threshold:g})"
            axis.plot(points["eps"], points["broken"], marker="o", linestyle="none", label=label)
    axis.set_xlabel("eps (perturbation norm)")
    axis.set_ylabel("share of slices broken")
    axis.set_ylim(-0.02, 1.02)
    axis.set_title(title)
    axis.grid(alpha=0.3)
    legend_beside(axis, fontsize="small")
    figure.tight_layout()
    return figure


def measured_text(minimal: pd.DataFrame) -> str:
    """How the minimal-norm cells measured min_eps: refined (and with what) or the search alone
    (an upper bound), from their ``attack_setting`` (``steps=500 refine=apgd-bisection 6x20``)."""
    cells = minimal[["attack", "attack_setting"]].drop_duplicates().sort_values("attack")
    named = "; ".join(f"{a}: {s or 'setting not recorded'}" for a, s in cells.itertuples(
        index=False))  # fmt: skip
    text = (f"How each run measured it ({named}): with refine, the search's own norm "
            "(min_eps_upper in the records) is only an upper bound, lowered in the same run by a "
            "bisection below it with a short fixed-budget APGD (rounds x steps), every candidate "
            "re-scored with the criterion; min_eps is the smallest norm at which a perturbation "
            "was verified to break the slice.")  # fmt: skip
    unrefined = ~cells["attack_setting"].str.contains("refine=apgd", regex=False)
    if unrefined.any():
        text += (
            " Runs without refinement (refine=off, or records older than it) report the "
            "search's norm: an upper bound, which on our models lay 1.6-3x (PDPGD on a CT "
            "model: 150x) above the eps at which APGD broke the same slice, so their curves lie "
            "right of a sweep's points."
        )
    return text


def sections(writer, records: pd.DataFrame) -> list[Section]:
    """The robustness-curve section; none without minimal-norm records. ``writer`` is the
    report's writer (``figure``, ``table``, ``note``)."""
    minimal = curves.minimal_records(records)
    if minimal.empty:
        return []
    section = Section("Robustness curves: how much perturbation breaks each slice")
    section.blocks.append(writer.note(
        "A minimal-norm attack looks for each slice's smallest perturbation that breaks it (its "
        "criterion: a share of the pixels wrong, or the slice's foreground Dice at most a "
        "threshold) and records its norm, min_eps. One run gives the whole curve: the share of "
        "slices broken at eps is the share with min_eps <= eps. Slices never broken count as "
        "unbroken at every eps. " + measured_text(minimal)))  # fmt: skip
    for model in minimal["model"].unique():
        title = f"{model}: share of slices broken against eps"
        name = f"robustness_curve_{file_stem(str(model))}"
        caption = (f"{title}: lines from one minimal-norm run each, points from fixed-eps attacks "
                   "(one run per eps) at the same Dice threshold.")  # fmt: skip
        section.blocks.append(writer.figure(name, curve_figure(records, model, title), caption))
    medians = curves.median_min_eps(records)
    shown = medians.assign(
        found=(100 * medians["found"]).map("{:.0f}%".format),
        median=medians.apply(
            lambda r: _interval_text(r["median"], r["low"], r["high"], r["cases"]), axis=1
        ),
    ).drop(columns=["low", "high"])
    section.blocks.append(writer.table(
        "min_eps", shown,
        "Median minimal eps per minimal-norm cell, with its 95% case-bootstrap interval (cases "
        "resampled with their slices; inf: half the slices or more never broken); found: slices "
        "with a finite min_eps; median_upper: the median of the searches' own norms before the "
        "refinement (min_eps_upper: upper bounds). robustness_curve_*.csv-free numbers: every "
        "slice's min_eps is in the records."))  # fmt: skip
    agree = curves.agreement(records)
    if not agree.empty:
        section.blocks.append(writer.table(
            "curve_agreement", agree,
            "The minimal-norm curve against each fixed-eps sweep of the same model at the "
            "criterion's Dice threshold, at the sweep's eps: largest and mean absolute difference "
            "of the shares of slices broken, and the mean signed difference (positive: the "
            "minimal-norm run breaks more slices)."))  # fmt: skip
    curve_points = curves.min_eps_curve(records, curves.eps_grid(records))
    writer.text("robustness_curves.csv", curve_points.to_csv(index=False))
    return [section]


def _interval_text(median: float, low: float, high: float, cases: int) -> str:
    """``0.0123 [0.01, 0.015]``; without bounds (fewer than 5 cases) it says so, naming them."""
    if not np.isfinite(median):
        return "inf"
    if np.isnan(low) or np.isnan(high):
        return f"{median:.4g} (no interval: {cases} case{'s' * (cases != 1)}, < 5)"
    return f"{median:.4g} [{low:.4g}, {high:.4g}]"
