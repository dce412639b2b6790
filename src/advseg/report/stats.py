"""Correlation tests for the report: the paper's claims, tested with p-values.

The paper says parameter count has "negligible correlation" with attack success, and names slice
luminosity against attack success as future work. Both are answered here with Pearson's r and
Spearman's rho from :mod:`scipy.stats`; with fewer than three points, or a constant variable, there
is no test to run and the result says so in words instead of carrying a NaN into a table.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

MIN_POINTS = 3


@dataclass(frozen=True)
class Correlation:
    """Pearson and Spearman coefficients of two variables, or the reason they are undefined.

    Attributes:
        n: number of (x, y) pairs used.
        pearson_r, pearson_p, spearman_rho, spearman_p: the coefficients and two-sided p-values;
            ``None`` when ``reason`` is set.
        reason: why no coefficient exists (``"n < 3"``, ``"x is constant"``), else ``""``.
    """

    n: int
    pearson_r: float | None = None
    pearson_p: float | None = None
    spearman_rho: float | None = None
    spearman_p: float | None = None
    reason: str = ""

    def describe(self) -> str:
        """One line for a caption, e.g. ``Pearson r = 0.12 (p = 0.85); ... n = 5``."""
        if self.reason:
            return f"n/a ({self.reason}), n = {self.n}"
        return (
            f"Pearson r = {self.pearson_r:.3f} (p = {_p(self.pearson_p)}); "
            f"Spearman rho = {self.spearman_rho:.3f} (p = {_p(self.spearman_p)}); n = {self.n}"
        )

    def as_row(self) -> dict[str, object]:
        """Table cells: numbers where they exist, the reason in words where they do not."""
        if self.reason:
            text = f"n/a ({self.reason})"
            return {
                "n": self.n,
                "pearson_r": text,
                "pearson_p": text,
                "spearman_rho": text,
                "spearman_p": text,
            }
        return {
            "n": self.n,
            "pearson_r": round(self.pearson_r, 4),
            "pearson_p": _p(self.pearson_p),
            "spearman_rho": round(self.spearman_rho, 4),
            "spearman_p": _p(self.spearman_p),
        }


def _p(p: float | None) -> str:
    return "n/a" if p is None else (f"{p:.3g}" if p >= 1e-4 else f"{p:.1e}")


def correlate(
    x: np.ndarray | pd.Series, y: np.ndarray | pd.Series, names: tuple[str, str] = ("x", "y")
) -> Correlation:
    """Pearson and Spearman correlation of ``x`` and ``y`` (pairs with a NaN are left out).

    Args:
        x, y: 1-D arrays of equal length.
        names: what ``x`` and ``y`` are, for the reason given when one of them is constant.
    """
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    n = len(x)
    if n < MIN_POINTS:
        return Correlation(n=n, reason=f"n < {MIN_POINTS}")
    for name, values in zip(names, (x, y), strict=True):
        if np.all(values == values[0]):
            return Correlation(n=n, reason=f"{name} is constant")
    pearson = stats.pearsonr(x, y)
    spearman = stats.spearmanr(x, y)
    return Correlation(
        n=n,
        pearson_r=float(pearson.statistic),
        pearson_p=float(pearson.pvalue),
        spearman_rho=float(spearman.statistic),
        spearman_p=float(spearman.pvalue),
    )
