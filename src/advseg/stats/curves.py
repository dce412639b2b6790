"""Robustness curves from minimal-norm records: how much perturbation breaks each slice.

A minimal-norm attack (``alma-prox``, ``pdpgd``) records per slice ``min_eps``: the norm of the
smallest perturbation it found that meets its criterion (``min_eps_criterion``, e.g.
``dice<=0.5``: the slice's foreground Dice at most 0.5; ``inf`` where none was found, 0 where the
clean slice already met it). One run thus gives, for every eps at once, the share of slices broken
at that eps: ``broken(eps) = share of slices with min_eps <= eps`` (:func:`min_eps_curve`), where
a fixed-eps attack needs one run per eps. With a Dice criterion the same share can be read off a
fixed-eps sweep's records, ``share of slices whose Dice <= threshold at eps``
(:func:`sweep_curve`), and the two compared (:func:`agreement`): a minimal-norm attack that
finds smaller perturbations than the sweep lies above it.

A slice's Dice is the mean over its classes of the records' ``dice_adv`` (1 for a class empty in
both masks), the same Dice the attack's criterion takes (for softmax models the attack scores
against the one-hot partition, the records against the multi-label masks: they differ on the
pixels of several classes only). The median minimal eps comes with a case-bootstrap interval
(:func:`median_min_eps`): slices of one case are resampled together, as in
:mod:`advseg.stats.bootstrap` (its :func:`~advseg.stats.bootstrap.case_weights`).
"""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd

from advseg.stats.bootstrap import DRAWS, LEVEL, MIN_CASES, Interval, case_weights

CELL = ["model", "seed", "attack", "loss", "eps"]
"""What names one evaluated cell (with a criterion, a minimal-norm cell)."""
_CRITERION = re.compile(r"^(pixels|dice)(>=|<=)([0-9.eE+-]+)$")


def minimal_records(records: pd.DataFrame) -> pd.DataFrame:
    """The records of minimal-norm cells (those naming a ``min_eps_criterion``)."""
    return records[records["min_eps_criterion"].str.match(_CRITERION.pattern)]


def slice_table(records: pd.DataFrame) -> pd.DataFrame:
    """One row per (cell, slice): ``case``, ``min_eps``, ``min_eps_upper``,
    ``min_eps_criterion``, ``dice_clean`` and ``dice_adv`` (means over the slice's classes)."""
    keys = [*CELL, "min_eps_criterion", "slice_id"]
    grouped = records.groupby(keys, sort=False, dropna=False)
    return grouped.agg(case=("case", "first"), min_eps=("min_eps", "first"),
                       min_eps_upper=("min_eps_upper", "first"),
                       dice_clean=("dice_clean", "mean"),
                       dice_adv=("dice_adv", "mean")).reset_index()  # fmt: skip


def dice_threshold(criterion: str) -> float | None:
    """The Dice threshold of a criterion (``dice<=0.5`` -> 0.5); None for a pixels criterion."""
    match = _CRITERION.match(criterion)
    if match is None or match.group(1) != "dice":
        return None
    return float(match.group(3))


def min_eps_curve(records: pd.DataFrame, eps: list[float] | np.ndarray) -> pd.DataFrame:
    """Per minimal-norm cell and each of ``eps``: the share of its slices with ``min_eps <= eps``.

    Returns:
        Columns ``model, seed, attack, loss, min_eps_criterion, eps, broken, slices``; ``eps``
        here is the curve's abscissa (the cell's own cap is left out).
    """
    rows = []
    slices = slice_table(minimal_records(records))
    keys = ["model", "seed", "attack", "loss", "min_eps_criterion"]
    for key, frame in slices.groupby(keys, sort=False):
        values = frame["min_eps"].to_numpy()
        for e in eps:
            share = float(np.mean(values <= e))
            rows.append(dict(zip(keys, key, strict=True)) | {
                "eps": float(e), "broken": share, "slices": len(values)})  # fmt: skip
    return pd.DataFrame(rows, columns=[*keys, "eps", "broken", "slices"])


def sweep_curve(records: pd.DataFrame, threshold: float) -> pd.DataFrame:
    """Per fixed-eps cell: the share of its slices whose Dice (mean over classes) is at most
    ``threshold``: the curve a sweep gives one point per eps of.

    Returns:
        Columns ``model, seed, attack, loss, eps, broken, slices``.
    """
    fixed = records[records["min_eps_criterion"] == ""]
    if "corruption" in fixed.columns:  # corruption cells are no attack's sweep
        fixed = fixed[fixed["corruption"] == ""]
    slices = slice_table(fixed)
    grouped = slices.groupby(CELL, sort=True)
    out = grouped.agg(broken=("dice_adv", lambda d: float(np.mean(d <= threshold))),
                      slices=("slice_id", "size")).reset_index()  # fmt: skip
    return out


def agreement(records: pd.DataFrame) -> pd.DataFrame:
    """Each Dice-criterion minimal-norm curve against every fixed-eps sweep of the same model at
    that threshold: per (model, seed, minimal cell, sweep attack, sweep loss), the eps compared,
    the largest and the mean absolute difference of the two shares, and the mean signed
    difference (curve minus sweep: positive where the minimal-norm run breaks more).

    Returns:
        Columns ``model, seed, attack, loss, min_eps_criterion, sweep_attack, sweep_loss,
        points, max_abs_diff, mean_abs_diff, mean_diff``; empty without a Dice criterion or a
        sweep.
    """
    columns = ["model", "seed", "attack", "loss", "min_eps_criterion", "sweep_attack",
               "sweep_loss", "points", "max_abs_diff", "mean_abs_diff", "mean_diff"]  # fmt: skip
    rows = []
    for criterion in minimal_records(records)["min_eps_criterion"].unique():
        threshold = dice_threshold(criterion)
        if threshold is None:
            continue
        sweep = sweep_curve(records, threshold)
        if sweep.empty:
            continue
        curve = min_eps_curve(records[records["min_eps_criterion"].isin(["", criterion])],
                              sorted(sweep["eps"].unique()))  # fmt: skip
        for (model, seed, attack, loss), own in curve.groupby(["model", "seed", "attack", "loss"]):
            same = sweep[(sweep["model"] == model) & (sweep["seed"] == seed)]
            for (s_attack, s_loss), points in same.groupby(["attack", "loss"]):
                both = own.merge(points, on="eps", suffixes=("", "_sweep"))
                diff = both["broken"].to_numpy() - both["broken_sweep"].to_numpy()
                rows.append({"model": model, "seed": seed, "attack": attack, "loss": loss,
                             "min_eps_criterion": criterion, "sweep_attack": s_attack,
                             "sweep_loss": s_loss, "points": len(diff),
                             "max_abs_diff": float(np.abs(diff).max()),
                             "mean_abs_diff": float(np.abs(diff).mean()),
                             "mean_diff": float(diff.mean())})  # fmt: skip
    return pd.DataFrame(rows, columns=columns)


def median_min_eps(
    records: pd.DataFrame, *, draws: int = DRAWS, seed: int = 0, level: float = LEVEL
) -> pd.DataFrame:
    """Per minimal-norm cell: the median minimal eps over its slices and its case-bootstrap
    interval (each draw resamples the cases with replacement, every slice of a picked case
    counted as often as the case; the median of a draw is the weighted one). A median is
    ``inf`` where half the slices or more were never broken.

    Returns:
        Columns ``model, seed, attack, loss, min_eps_criterion, slices, cases, found`` (share
        of slices with a finite ``min_eps``), ``median``, ``low``, ``high``, and
        ``median_upper``: the lower median of ``min_eps_upper``, the search's own norms before
        the refinement (NaN for records without them).
    """
    rows = []
    slices = slice_table(minimal_records(records))
    keys = ["model", "seed", "attack", "loss", "min_eps_criterion"]
    for key, frame in slices.groupby(keys, sort=False):
        interval = median_interval(frame, draws=draws, seed=seed, level=level)
        upper = np.sort(frame["min_eps_upper"].to_numpy(dtype=float))
        rows.append(dict(zip(keys, key, strict=True)) | {
            "slices": len(frame), "cases": interval.cases,
            "found": float(np.isfinite(frame["min_eps"]).mean()),
            "median": interval.estimate, "low": interval.low, "high": interval.high,
            "median_upper": float(upper[(len(upper) - 1) // 2])})  # fmt: skip
    return pd.DataFrame(rows, columns=[*keys, "slices", "cases", "found", "median", "low",
                                       "high", "median_upper"])  # fmt: skip


def median_interval(
    slices: pd.DataFrame, *, draws: int = DRAWS, seed: int = 0, level: float = LEVEL
) -> Interval:
    """The median of ``slices["min_eps"]`` and its case-bootstrap percentile interval."""
    cases, position = np.unique(slices["case"].to_numpy(), return_inverse=True)
    values = slices["min_eps"].to_numpy(dtype=float)
    order = np.argsort(values, kind="stable")
    values, position = values[order], position[order]
    weights = case_weights(len(cases), draws, seed)[:, position]  # (draws, slices)
    medians = weighted_median(values, weights)
    estimate = weighted_median(values, np.ones((1, len(values))))[0]
    if len(cases) < MIN_CASES:  # as advseg.stats.bootstrap: too few cases for a meaningful interval
        return Interval(float(estimate), math.nan, math.nan, len(cases), 0, level)
    tail = (1 - level) / 2
    low, high = np.quantile(medians, [tail, 1 - tail], method="inverted_cdf")
    return Interval(float(estimate), float(low), float(high), len(cases), draws, level)


def weighted_median(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Per row of ``weights`` ``(D, N)``: the lower weighted median of the sorted ``values``
    ``(N,)`` (the smallest value whose cumulative weight reaches half the total; ``inf`` values
    allowed)."""
    running = np.cumsum(weights, axis=1)
    half = running[:, -1:] / 2
    index = (running < half - 1e-9).sum(axis=1)
    return values[np.minimum(index, len(values) - 1)]


def eps_grid(records: pd.DataFrame, points: int = 50) -> np.ndarray:
    """Abscissae for drawing the curves: 0 and ``points`` steps up to the largest finite
    ``min_eps`` (or the cells' largest eps, when none is finite)."""
    values = minimal_records(records)["min_eps"].to_numpy(dtype=float)
    finite = values[np.isfinite(values)]
    top = float(finite.max()) if finite.size else float(records["eps"].max())
    top = top if top > 0 else 1.0
    return np.linspace(0.0, top * 1.05, points + 1)


def criterion_text(criterion: str) -> str:
    """``dice<=0.5`` -> "foreground Dice <= 0.5"; ``pixels>=0.99`` -> ">= 99% of pixels wrong"."""
    match = _CRITERION.match(criterion)
    if match is None:
        return criterion
    kind, _, value = match.groups()
    if kind == "dice":
        return f"foreground Dice <= {float(value):g}"
    return f">= {100 * float(value):g}% of pixels wrong"
