"""Correlation tests for the report: the paper's claims, tested with p-values that hold for small n.

The paper says parameter count has "negligible correlation" with attack success, and names slice
luminosity against attack success as future work. Both are answered here with Pearson's r and
Spearman's rho. Their p-values come from :func:`scipy.stats.permutation_test` on the pairings
(the null hypothesis: any pairing of x with y is as likely), so a handful of models gets the p
it can honestly have (three models, rho = -1: p = 2/3! = 0.33, not scipy's asymptotic 0):

- ``n <= EXACT_MAX_N`` (8): every one of the n! pairings, exactly once (``exact``);
- ``n <= PERMUTATION_MAX_N`` (100): ``RESAMPLES`` seeded random pairings (``permutation``);
- above: scipy's ``pearsonr`` / ``spearmanr`` p (t distribution; ``asymptotic``), accurate there.

The statistic is vectorised (one matrix product per batch of pairings), so 8! pairings take
milliseconds. With fewer than three points, or a constant variable, there is no test to run and
the result says so in words instead of carrying a NaN into a table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

MIN_POINTS = 3
EXACT_MAX_N = 8
PERMUTATION_MAX_N = 100
RESAMPLES = 9999
SEED = 0


def _pearson_along(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
    """Pearson r of each row of ``a`` (pairings along ``axis``) with the fixed vector ``b``."""
    a = np.moveaxis(np.asarray(a, float), axis, -1)
    a = a - a.mean(axis=-1, keepdims=True)
    b = b - b.mean()
    with np.errstate(invalid="ignore", divide="ignore"):
        return (a @ b) / np.sqrt((a * a).sum(axis=-1) * (b @ b))


def association_p(x: np.ndarray, y: np.ndarray) -> tuple[float, float, str]:
    """Pearson r of ``x`` and ``y`` with its two-sided p over pairings, and how p was found.

    Spearman's rho is this on ranks (:func:`spearman_test`). Needs ``n >= 3`` and neither
    variable constant (:func:`correlate` checks).

    Returns:
        ``(r, p, method)``, ``method`` one of ``exact``, ``permutation``, ``asymptotic``.
    """
    x, y = np.asarray(x, float), np.asarray(y, float)
    n = len(x)
    r = float(_pearson_along(x, y))
    if n > PERMUTATION_MAX_N:
        return r, float(stats.pearsonr(x, y).pvalue), "asymptotic"
    exact = n <= EXACT_MAX_N
    result = stats.permutation_test(
        (x,),
        lambda a, axis: _pearson_along(a, y, axis),
        permutation_type="pairings",
        vectorized=True,
        n_resamples=math.inf if exact else RESAMPLES,
        alternative="two-sided",
        rng=np.random.default_rng(SEED),
    )
    return r, float(min(1.0, result.pvalue)), "exact" if exact else "permutation"


def smallest_p(n: int) -> float:
    """The smallest two-sided p :func:`association_p` can give with ``n`` distinct points."""
    if n < MIN_POINTS:
        return float("nan")
    if n <= EXACT_MAX_N:
        return 2 / math.factorial(n)
    return 2 / (RESAMPLES + 1) if n <= PERMUTATION_MAX_N else 0.0


def spearman_test(x: np.ndarray, y: np.ndarray) -> tuple[float, float, str]:
    """Spearman's rho (ties: average ranks) with :func:`association_p`'s p on the ranks."""
    if len(x) > PERMUTATION_MAX_N:
        result = stats.spearmanr(x, y)
        return float(result.statistic), float(result.pvalue), "asymptotic"
    return association_p(stats.rankdata(x), stats.rankdata(y))


@dataclass(frozen=True)
class Correlation:
    """Pearson and Spearman coefficients of two variables, or the reason they are undefined.

    Attributes:
        n: number of (x, y) pairs used.
        pearson_r, pearson_p, spearman_rho, spearman_p: the coefficients and two-sided p-values;
            ``None`` when ``reason`` is set.
        method: how both p-values were found: ``exact`` (every pairing), ``permutation``
            (``RESAMPLES`` seeded pairings) or ``asymptotic``; ``""`` when ``reason`` is set.
        reason: why no coefficient exists (``"n < 3"``, ``"x is constant"``), else ``""``.
        cases: when the points are slices, the number of cases (patients) they come from: the
            p-values treat the slices as independent, which slices of one patient are not, so
            the description says how many patients stand behind ``n`` (issue 26: p = 1e-23
            from the 152 slices of one brain).
    """

    n: int
    pearson_r: float | None = None
    pearson_p: float | None = None
    spearman_rho: float | None = None
    spearman_p: float | None = None
    method: str = ""
    reason: str = ""
    cases: int | None = None

    def units(self) -> str:
        """``n = 5``, or ``n = 152 slices of 1 case (p treats slices as independent)``."""
        if self.cases is None:
            return f"n = {self.n}"
        plural = "s" * (self.cases != 1)
        return f"n = {self.n} slices of {self.cases} case{plural} (p treats slices as independent)"

    def describe(self) -> str:
        """One line for a caption, e.g. ``Pearson r = 0.12 (exact p = 0.85); ... n = 5``."""
        if self.reason:
            return f"n/a ({self.reason}), {self.units()}"
        return (
            f"Pearson r = {self.pearson_r:.3f} ({self.method} p = {_p(self.pearson_p)}); "
            f"Spearman rho = {self.spearman_rho:.3f} ({self.method} p = "
            f"{_p(self.spearman_p)}); {self.units()}"
        )

    def as_row(self) -> dict[str, object]:
        """Table cells: numbers where they exist, the reason in words where they do not."""
        if self.reason:
            text = f"n/a ({self.reason})"
            return {
                "n": self.n,
                **({} if self.cases is None else {"cases": self.cases}),
                "pearson_r": text,
                "pearson_p": text,
                "spearman_rho": text,
                "spearman_p": text,
                "p_method": text,
            }
        return {
            "n": self.n,
            **({} if self.cases is None else {"cases": self.cases}),
            "pearson_r": round(self.pearson_r, 4),
            "pearson_p": _p(self.pearson_p),
            "spearman_rho": round(self.spearman_rho, 4),
            "spearman_p": _p(self.spearman_p),
            "p_method": self.method,
        }


def _p(p: float | None) -> str:
    return "n/a" if p is None else (f"{p:.3g}" if p >= 1e-4 else f"{p:.1e}")


def correlate(
    x: np.ndarray | pd.Series,
    y: np.ndarray | pd.Series,
    names: tuple[str, str] = ("x", "y"),
    cases: np.ndarray | pd.Series | None = None,
) -> Correlation:
    """Pearson and Spearman correlation of ``x`` and ``y`` (pairs with a NaN are left out),
    with p-values from :func:`association_p` / :func:`spearman_test`.

    Args:
        x, y: 1-D arrays of equal length.
        names: what ``x`` and ``y`` are, for the reason given when one of them is constant.
        cases: when the points are slices, each point's case: the result counts the cases
            behind the kept points (:attr:`Correlation.cases`).
    """
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    n = len(x)
    groups = None if cases is None else int(pd.Series(np.asarray(cases)[keep]).nunique())
    if n < MIN_POINTS:
        return Correlation(n=n, reason=f"n < {MIN_POINTS}", cases=groups)
    for name, values in zip(names, (x, y), strict=True):
        if np.all(values == values[0]):
            return Correlation(n=n, reason=f"{name} is constant", cases=groups)
    r, r_p, method = association_p(x, y)
    rho, rho_p, _ = spearman_test(x, y)
    return Correlation(n, r, r_p, rho, rho_p, method, cases=groups)
