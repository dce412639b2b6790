"""Bootstrap confidence intervals over cases, for every number of Table II.

Slices of one case (one patient) are correlated: neighbouring slices show the same organs, and a
model that fails on one patient fails on many of its slices. Resampling slices would treat them
as independent and give intervals that are too narrow, so the unit of resampling here is the case
(Field & Welsh 2007, "Bootstrapping clustered data"): each draw picks as many cases as there
are, with replacement, and recomputes the statistic on every slice of the picked cases.

Each Dice protocol of :mod:`advseg.stats.summary` is a ratio of sums over its units (slices, (slice,
class) pairs, or per-class pixel counts), so the sums are computed once per case and a draw is
a weighted sum: ``(draws, cases) @ (cases, ...)``. 2000 draws of a whole Table II take
milliseconds. The point estimate is the statistic on all the cases, equal to
:func:`advseg.stats.summary.summarize_cells`' number; the interval is the percentile interval of the
draws, seeded, so the same records and seed give the same interval.

Example:
    >>> ci = case_bootstrap(cell_records, "paper", draws=2000, seed=0)
    >>> ci["dsc_adv"].low, ci["dsc_adv"].estimate, ci["dsc_adv"].high
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd

from advseg.errors import UserError
from advseg.metrics import PAPER_SMOOTH, dice_from_counts

DRAWS = 2000
LEVEL = 0.95
STATISTICS = ("dsc_clean", "dsc_adv", "as")
#: Fewest cases whose bootstrap interval is reported (issue 26). Resampling one case gives a
#: zero-width interval, a handful an interval that is mostly the spread of those few patients
#: (with 4 cases only 35 distinct resamples exist); below this the bounds are left out (NaN)
#: and the table and terminal say why.
MIN_CASES = 5


@dataclass(frozen=True)
class Interval:
    """A point estimate and its bootstrap interval.

    Attributes:
        estimate: the statistic on every case.
        low, high: the percentile interval at ``level`` (NaN when no draw defines it).
        cases: the number of cases resampled; draws: the number of draws.
        slices: the number of slices of those cases in the records (0 when not counted).
    """

    estimate: float
    low: float
    high: float
    cases: int
    draws: int
    level: float = LEVEL
    slices: int = 0

    @property
    def meaningful(self) -> bool:
        """Whether it rests on at least :data:`MIN_CASES` cases."""
        return self.cases >= MIN_CASES

    def describe(self) -> str:
        """E.g. ``0.712 [0.680, 0.745] (12 cases, 480 slices)``, or the estimate with
        ``no interval: 1 case (< 5)`` when it is not meaningful."""
        units = f"{self.cases} case{'s' * (self.cases != 1)}"
        if self.slices:
            units += f", {self.slices} slices"
        if not self.meaningful:
            return f"{self.estimate:.3f} (no interval: {units}; {MIN_CASES} needed)"
        return f"{self.estimate:.3f} [{self.low:.3f}, {self.high:.3f}] ({units})"


def interval_note(cases: int, slices: int, folds: int = 0) -> str:
    """What the ``interval`` column of :func:`with_intervals` says for a model (whose records
    pool ``folds`` cross-validation folds, when there are any)."""
    units = f"{cases} case{'s' * (cases != 1)}, {slices} slices"
    if folds:
        units += f" pooled over {folds} fold{'s' * (folds != 1)}"
    if cases < MIN_CASES:
        return f"not meaningful: {units} (< {MIN_CASES} cases); bounds left out"
    return f"{LEVEL:.0%} case bootstrap over {units}"


def case_weights(cases: int, draws: int = DRAWS, seed: int = 0) -> np.ndarray:
    """How often each case is picked in each draw: ``(draws, cases)`` counts summing to ``cases``.

    Row 0 is not special: every row is a resample. Seeded by ``seed`` (numpy's PCG64).
    """
    if cases < 1:
        raise UserError("bootstrap: no case to resample")
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, cases, size=(draws, cases))
    offsets = np.arange(draws)[:, None] * cases
    return np.bincount((picks + offsets).ravel(), minlength=draws * cases).reshape(draws, cases)


def _per_case_sums(group: pd.DataFrame, protocol: str, which: str, cases: np.ndarray):
    """Additive per-case parts of one protocol's Dice: ``(cases, P)`` arrays."""
    tp = group[f"tp_{which}"].to_numpy(np.float64)
    fp = group[f"fp_{which}"].to_numpy(np.float64)
    fn = group[f"fn_{which}"].to_numpy(np.float64)
    case_of = np.searchsorted(cases, group["case"].to_numpy())
    gt = group["gt_pixels"].to_numpy()
    n = len(cases)
    if protocol == "per-class":
        keep = gt > 0
        values = dice_from_counts(tp[keep], fp[keep], fn[keep])
        total = np.bincount(case_of[keep], weights=values, minlength=n)
        count = np.bincount(case_of[keep], minlength=n).astype(np.float64)
        return np.stack([total, count], axis=1)
    if protocol == "paper":
        frame = pd.DataFrame(
            {
                "slice": group["slice_id"].to_numpy(),
                "case": case_of,
                "dice": dice_from_counts(tp, fp, fn, smooth=PAPER_SMOOTH),
                "gt": gt,
            }
        )
        per_slice = frame.groupby("slice", sort=False).agg(
            case=("case", "first"), dice=("dice", "mean"), gt=("gt", "sum")
        )
        per_slice = per_slice[per_slice["gt"] > 0]
        owner = per_slice["case"].to_numpy()
        total = np.bincount(owner, weights=per_slice["dice"].to_numpy(), minlength=n)
        count = np.bincount(owner, minlength=n).astype(np.float64)
        return np.stack([total, count], axis=1)
    if protocol == "global":
        classes = pd.Index(group["class"].unique())
        k = classes.get_indexer(group["class"])
        parts = np.zeros((n, len(classes), 4))
        for j, values in enumerate((tp, fp, fn, gt.astype(np.float64))):
            np.add.at(parts[:, :, j], (case_of, k), values)
        return parts.reshape(n, -1)
    raise UserError(f"unknown Dice protocol {protocol!r}; valid: paper, per-class, global")


def _finish(sums: np.ndarray, protocol: str) -> np.ndarray:
    """The Dice from summed parts, ``(D, P) -> (D,)``; NaN where no unit is left."""
    if protocol in ("per-class", "paper"):
        total, count = sums[:, 0], sums[:, 1]
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(count > 0, total / count, np.nan)
    parts = sums.reshape(len(sums), -1, 4)
    tp, fp, fn, gt = (parts[:, :, j] for j in range(4))
    dice = np.where(gt > 0, dice_from_counts(tp, fp, fn), np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a draw with no class left: NaN
        return np.nanmean(dice, axis=1)


def _interval(
    estimate: float, values: np.ndarray, cases: int, level: float, slices: int
) -> Interval:
    values = values[np.isfinite(values)]
    if values.size == 0 or not np.isfinite(estimate) or cases < MIN_CASES:
        return Interval(estimate, float("nan"), float("nan"), cases, 0, level, slices)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return Interval(
        float(estimate), float(low), float(high), cases, int(values.size), level, slices
    )


def case_bootstrap(
    group: pd.DataFrame,
    protocol: str,
    *,
    draws: int = DRAWS,
    seed: int = 0,
    level: float = LEVEL,
    by: str | None = None,
) -> dict[str, Interval]:
    """Intervals of the clean DSC, adversarial DSC and Attack Success of one cell's records.

    Args:
        group: records of one (model, attack, loss, eps) cell (any number of cases).
        protocol: the Dice protocol (``paper``, ``per-class``, ``global``).
        draws: bootstrap draws; seed: their seed; level: the interval's coverage.
        by: a column splitting ``group`` into repeats measured on the same cases (``seed``: one
            model per training seed). Each statistic is then the mean over the repeats, and a
            draw resamples the same cases for every repeat.

    Returns:
        ``{"dsc_clean": Interval, "dsc_adv": Interval, "as": Interval}``; with fewer than
        :data:`MIN_CASES` cases their bounds are NaN (:attr:`Interval.meaningful`).
    """
    cases = np.unique(group["case"].to_numpy())
    slices = int(group["slice_id"].nunique()) if "slice_id" in group.columns else 0
    weights = case_weights(len(cases), draws, seed)
    repeats = [group] if by is None else [g for _, g in group.groupby(by, sort=True)]
    point: dict[str, list[float]] = {"dsc_clean": [], "dsc_adv": [], "as": []}
    drawn: dict[str, list[np.ndarray]] = {"dsc_clean": [], "dsc_adv": [], "as": []}
    for part in repeats:
        per_case = {w: _per_case_sums(part, protocol, w, cases) for w in ("clean", "adv")}
        full = {w: _finish(s.sum(0, keepdims=True), protocol)[0] for w, s in per_case.items()}
        sampled = {w: _finish(weights @ s, protocol) for w, s in per_case.items()}
        with np.errstate(invalid="ignore", divide="ignore"):
            success = np.where(
                sampled["clean"] > 0, (sampled["clean"] - sampled["adv"]) / sampled["clean"], np.nan
            )
        full_as = (full["clean"] - full["adv"]) / full["clean"] if full["clean"] > 0 else np.nan
        for key, value, values in (
            ("dsc_clean", full["clean"], sampled["clean"]),
            ("dsc_adv", full["adv"], sampled["adv"]),
            ("as", full_as, success),
        ):
            point[key].append(float(value))
            drawn[key].append(values)
    return {
        key: _interval(
            float(np.mean(point[key])), np.mean(drawn[key], axis=0), len(cases), level, slices
        )
        for key in STATISTICS
    }


def with_intervals(
    records: pd.DataFrame,
    protocol: str = "per-class",
    *,
    draws: int = DRAWS,
    seed: int = 0,
    level: float = LEVEL,
) -> pd.DataFrame:
    """Table II (:func:`advseg.stats.summary.summarize`) with a case-bootstrap interval per number.

    Every ``DSC ...`` and ``AS ...`` column is followed by ``<column> low`` and ``<column> high``,
    the bounds of its ``level`` interval over cases (``draws`` draws, seeded by ``seed``); the
    clean DSC is resampled over the model's distinct (slice, class) records, as
    :func:`~advseg.stats.summary.summarize` computes it.

    ``cases`` and ``slices`` (after ``excluded``) count the distinct cases and slices of each
    model's records (``folds``, when a model's records pool 2 or more cross-validation folds: how
    many, every case scored by the fold model that did not train on it), and ``interval``
    says what its bounds rest on: below :data:`MIN_CASES`
    cases the bounds are NaN and it says they are not meaningful (one case gave zero-width
    intervals that looked exact).

    When the records hold several training seeds of a model (a ``seed`` column), each number is
    the mean over the seeds of the per-seed Table II, ``<column> seed sd`` beside it is the
    standard deviation over seeds, a ``seeds`` column counts them, and each bootstrap draw
    resamples the same cases for every seed. ``attrs``: ``protocol``, ``draws``, ``seed``,
    ``level``, ``seeds``.
    """
    from advseg.stats.summary import CELL_KEYS, MODEL_KEYS, cell_label, summarize

    seeded = "seed" in records.columns and records["seed"].nunique() > 1
    by = "seed" if seeded else None
    table = summarize(records, protocol)
    numbers = [c for c in table.columns if c.startswith(("DSC ", "AS "))]
    spread: dict[str, pd.Series] = {}
    if seeded:
        per_seed = pd.concat(
            [summarize(g, protocol) for _, g in records.groupby("seed", sort=True)],
            ignore_index=True,
        )
        grouped = per_seed.groupby(MODEL_KEYS, sort=False)[numbers]
        means, sds = grouped.mean(), grouped.std()
        at = pd.MultiIndex.from_frame(table[MODEL_KEYS])
        for column in numbers:
            table[column] = means[column].reindex(at).to_numpy()
            spread[column] = sds[column].reindex(at).to_numpy()
        counts = records.groupby(MODEL_KEYS, sort=False)["seed"].nunique()
        table.insert(len(MODEL_KEYS), "seeds", counts.reindex(at).to_numpy())
    bounds: dict[str, dict[tuple, tuple[float, float]]] = {}
    distinct_keys = ["seed", "slice_id", "class"] if seeded else ["slice_id", "class"]
    for keys, group in records.groupby(MODEL_KEYS, sort=False):
        distinct = group.drop_duplicates(distinct_keys)
        clean = case_bootstrap(distinct, protocol, draws=draws, seed=seed, level=level, by=by)
        bounds.setdefault("DSC clean", {})[keys] = (clean["dsc_clean"].low, clean["dsc_clean"].high)
        for cell, cell_group in group.groupby(CELL_KEYS, sort=False):
            ci = case_bootstrap(cell_group, protocol, draws=draws, seed=seed, level=level, by=by)
            label = cell_label(*cell)
            bounds.setdefault(f"DSC {label}", {})[keys] = (ci["dsc_adv"].low, ci["dsc_adv"].high)
            bounds.setdefault(f"AS {label}", {})[keys] = (ci["as"].low, ci["as"].high)
    model_keys = list(table[MODEL_KEYS].itertuples(index=False, name=None))
    grouped_units = records.groupby(MODEL_KEYS, sort=False)
    case_counts = grouped_units["case"].nunique()
    slice_counts = grouped_units["slice_id"].nunique()
    at_excluded = list(table.columns).index("excluded") + 1
    table.insert(at_excluded, "cases", [int(case_counts[k]) for k in model_keys])
    table.insert(at_excluded + 1, "slices", [int(slice_counts[k]) for k in model_keys])
    folds = {k: 0 for k in model_keys}
    if "fold" in records.columns:  # cross-validated models: their folds' records pooled
        folded = records[records["fold"] >= 0].groupby(MODEL_KEYS, sort=False)["fold"].nunique()
        folds.update({k: int(v) for k, v in folded.items() if k in folds and v > 1})
    notes = [interval_note(int(case_counts[k]), int(slice_counts[k]), folds[k]) for k in model_keys]
    table.insert(at_excluded + 2, "interval", notes)
    if any(folds.values()):
        table.insert(at_excluded + 2, "folds", [folds[k] for k in model_keys])
    columns: list[str] = []
    for column in list(table.columns):
        columns.append(column)
        if column in spread:
            table[f"{column} seed sd"] = spread[column]
            columns.append(f"{column} seed sd")
        if column in bounds:
            for side, pos in (("low", 0), ("high", 1)):
                name = f"{column} {side}"
                table[name] = [bounds[column].get(k, (np.nan, np.nan))[pos] for k in model_keys]
                columns.append(name)
    table = table[columns]
    seeds = int(records["seed"].nunique()) if "seed" in records.columns else 1
    table.attrs.update(protocol=protocol, draws=draws, seed=seed, level=level, seeds=seeds)
    table.attrs["few_cases"] = [k for k in model_keys if case_counts[k] < MIN_CASES]
    return table
