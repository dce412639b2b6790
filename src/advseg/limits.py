"""The ranges every seed and count must lie in, checked in one place (issue 25).

A seed is a whole number in ``[0, 2**63 - 1]``: NumPy refuses negative seeds with a traceback,
torch wraps some and refuses others, and the records' ``seed`` column is an int64. A count is a
whole number between a floor (1, or 0 where none is meaningful) and a ceiling far above any real
use, so that ``certify --n 2**40`` is one line now instead of a run that never ends. The CLI's
options and the YAML keys call the same two functions: ``train --seed``, ``export --seed``,
``certify --seed``, ``data synth --seed``, a grid's ``seed``, ``seeds`` and ``split.seed`` answer
alike.
"""

from __future__ import annotations

from typing import Any

from advseg.errors import UserError

SEED_MAX = 2**63 - 1
"""The largest seed (the records' int64 ``seed`` column)."""

COUNT_MAX = 10**9
"""The largest count of slices, cases, examples or batches anyone means."""

NOISE_MAX = 10**6
"""The most noisy forwards per slice (``certify --n``, ``--n0``): Cohen et al. certify with
100,000; a million takes days per slice already."""


def check_seed(value: Any, where: str) -> int:
    """``value`` as a seed, else a one-line UserError naming ``where`` (the option or key)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"{where}: expected a whole-number seed, got {value!r}")
    if not 0 <= value <= SEED_MAX:
        raise UserError(f"{where}: {value} is not a seed in [0, 2**63 - 1]")
    return value


def check_count(value: Any, where: str, low: int = 1, high: int = COUNT_MAX) -> int:
    """``value`` as a whole number in ``[low, high]``, else a one-line UserError."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"{where}: expected a whole number, got {value!r}")
    if not low <= value <= high:
        raise UserError(f"{where}: {value} must lie in [{low}, {high:,}]")
    return value
