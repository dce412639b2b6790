"""Case-grouped splits: no case has slices on both sides.

Slices of one patient are strongly correlated, so the paper (FACTS.md section 1) splits by case:
90 / 10 train / test, and 10-fold GroupKFold in its notebook. Both functions return positional row
arrays into the index, and the same seed gives the same split.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from advseg.errors import AdvsegWarning, UserError


def _cases(index: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """The distinct cases (sorted) and each row's position in that list."""
    if len(index) == 0:
        raise UserError("split: the index is empty (no slices to split)")
    cases, inverse = np.unique(index["case"].to_numpy(), return_inverse=True)
    return cases, inverse


#: Fewest test cases the default split holds out where the data allows (issue 26): intervals
#: and tests over one patient's slices say nothing about other patients.
MIN_TEST_CASES = 2
#: Cases the other side keeps when the test side is raised to :data:`MIN_TEST_CASES` (training
#: and validation need one each).
KEEP_CASES = 2


def held_out_count(n_cases: int, test_fraction: float, min_test: int = MIN_TEST_CASES) -> int:
    """How many of ``n_cases`` cases :func:`split_cases` holds out.

    ``round(test_fraction * n_cases)``, raised to ``min_test`` where at least
    :data:`KEEP_CASES` cases stay for training and validation, and always between 1 and
    ``n_cases - 1``. With ``min_test=1`` it is the rule of checkpoints saved before the split was
    stored (``round``, at least 1).
    """
    wanted = max(round(test_fraction * n_cases), 1)
    if wanted < min_test:
        wanted = max(1, min(min_test, n_cases - KEEP_CASES))
    return min(wanted, n_cases - 1)


def split_cases(
    index: pd.DataFrame, test_fraction: float = 0.1, seed: int = 0, min_test: int = MIN_TEST_CASES
) -> tuple[np.ndarray, np.ndarray]:
    """Split rows into train and test by case.

    :func:`held_out_count` cases (``round(test_fraction * n_cases)``, at least ``min_test``
    where the data allows) are drawn at random for the test side.

    Args:
        index: a SliceIndex.
        test_fraction: share of the cases held out, in (0, 1).
        seed: random seed.
        min_test: the fewest test cases where the data allows (1: the rule before issue 26).

    Returns:
        ``(train_rows, test_rows)``: sorted positional row arrays.
    """
    if not 0 < test_fraction < 1:
        raise UserError(f"test_fraction: must lie in (0, 1), got {test_fraction}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise UserError(f"split_seed: expected an integer, got {seed!r}")
    cases, inverse = _cases(index)
    if len(cases) < 2:
        raise UserError(f"split: need at least 2 cases to split by case, found {len(cases)}")
    n_test = held_out_count(len(cases), test_fraction, min_test)
    order = np.random.default_rng(seed).permutation(len(cases))
    is_test = np.zeros(len(cases), bool)
    is_test[order[:n_test]] = True
    test = is_test[inverse]
    return np.flatnonzero(~test), np.flatnonzero(test)


def split_train_val_test(
    index: pd.DataFrame, test_fraction: float = 0.1, val_fraction: float = 0.1, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Train, validation and test rows, each a set of whole cases.

    The test side is exactly ``split_cases(index, test_fraction, seed)`` (at least
    :data:`MIN_TEST_CASES` cases where the data allows; fewer is warned about, saying why);
    validation (for early stopping) is then ``val_fraction`` of the remaining cases, drawn the
    same way (at least 1).

    Returns:
        ``(train_rows, val_rows, test_rows)``: sorted positional row arrays.
    """
    learn, test = split_cases(index, test_fraction, seed)
    if index["case"].iloc[learn].nunique() < 2:
        raise UserError(
            f"validation split: {index['case'].iloc[learn].nunique()} case(s) left after holding "
            f"out test_fraction {test_fraction}; training and validation need 2 or more"
        )
    n_test = index["case"].iloc[test].nunique()
    if n_test < MIN_TEST_CASES:
        warnings.warn(
            f"split: {n_test} test case of {index['case'].nunique()}: {MIN_TEST_CASES} need "
            f"{MIN_TEST_CASES + KEEP_CASES} cases or more (training and validation keep "
            f"{KEEP_CASES}); its intervals and tests describe one patient",
            AdvsegWarning,
            stacklevel=2,
        )
    train_part, val_part = split_cases(index.iloc[learn], val_fraction, seed, min_test=1)
    return learn[train_part], learn[val_part], test


def kfold_cases(
    index: pd.DataFrame, k: int = 5, seed: int = 0
) -> list[tuple[np.ndarray, np.ndarray]]:
    """K folds by case, balanced by slice count (as scikit-learn's GroupKFold).

    Cases are shuffled with ``seed`` (to break ties), then taken largest first and each put in the
    fold that holds the fewest slices so far.

    Returns:
        ``k`` pairs ``(train_rows, val_rows)``; every row is in exactly one ``val_rows``.
    """
    cases, inverse = _cases(index)
    if not 2 <= k <= len(cases):
        raise UserError(f"k: need 2 <= k <= number of cases ({len(cases)}), got {k}")
    sizes = np.bincount(inverse, minlength=len(cases))
    shuffled = np.random.default_rng(seed).permutation(len(cases))
    order = shuffled[np.argsort(-sizes[shuffled], kind="stable")]
    fold_of_case = np.empty(len(cases), np.int64)
    load = np.zeros(k, np.int64)
    for c in order:
        f = int(np.argmin(load))
        fold_of_case[c] = f
        load[f] += sizes[c]
    fold = fold_of_case[inverse]
    return [(np.flatnonzero(fold != f), np.flatnonzero(fold == f)) for f in range(k)]


def fold_train_val_test(
    index: pd.DataFrame, folds: int, fold: int, val_fraction: float = 0.1, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fold ``fold`` of ``folds``-fold case-level cross-validation: train, validation, test rows.

    The test side is fold ``fold`` of :func:`kfold_cases` ``(index, folds, seed)``, so the
    ``folds`` test sides partition the cases (every case tested exactly once, by the one model
    that never saw it); validation (early stopping) is then ``val_fraction`` of the other cases,
    drawn as in :func:`split_train_val_test` (at least 1).

    Returns:
        ``(train_rows, val_rows, test_rows)``: sorted positional row arrays, no case on two sides.
    """
    for name, value in (("folds", folds), ("fold", fold)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise UserError(f"{name}: expected a whole number, got {value!r}")
    cases = index["case"].nunique() if len(index) else 0
    if folds < 2:
        raise UserError(f"folds: need 2 or more folds for cross-validation, got {folds}")
    if folds > cases:
        raise UserError(
            f"folds: {folds} folds need at least {folds} cases (one test case each); "
            f"the data has {cases}"
        )
    if not 0 <= fold < folds:
        raise UserError(f"fold: {fold} is not one of 0..{folds - 1}")
    learn, test = kfold_cases(index, folds, seed)[fold]
    left = index["case"].iloc[learn].nunique()
    if left < 2:
        raise UserError(
            f"folds: fold {fold} of {folds} leaves {left} case for training and validation; "
            "they need 2 or more (use fewer folds)"
        )
    train_part, val_part = split_cases(index.iloc[learn], val_fraction, seed, min_test=1)
    return learn[train_part], learn[val_part], test


def spread_positions(groups: np.ndarray | list, count: int, seed: int = 0) -> np.ndarray:
    """``count`` positions into ``groups`` drawn at random (seeded) and spread over the groups.

    The groups (cases) are visited in a seeded random order, round after round, each giving one
    of its positions (a seeded random one not yet taken) per round, until ``count`` are taken: N
    positions from G groups take ``N // G`` or one more from each group, never the first N in
    order (one case, the bottom of a volume).

    Args:
        groups: ``(N,)`` the group (case) of each position.
        count: how many positions; all of them (in order) when ``count >= N``.
        seed: the random draw.

    Returns:
        The chosen positions, sorted ascending.
    """
    groups = np.asarray(groups)
    if count >= len(groups):
        return np.arange(len(groups))
    if count <= 0:
        return np.zeros(0, np.int64)
    rng = np.random.default_rng(seed)
    names, inverse = np.unique(groups, return_inverse=True)
    members = [rng.permutation(np.flatnonzero(inverse == g)) for g in range(len(names))]
    order = rng.permutation(len(names))
    taken: list[int] = []
    depth = 0
    while len(taken) < count:
        for g in order:
            if depth < len(members[g]) and len(taken) < count:
                taken.append(int(members[g][depth]))
        depth += 1
    return np.sort(np.asarray(taken, np.int64))


def spread_rows(index: pd.DataFrame, rows: np.ndarray, count: int, seed: int = 0) -> np.ndarray:
    """At most ``count`` of ``rows`` (positions in ``index``), seeded and spread over cases
    (:func:`spread_positions` on their ``case``), in the order of ``rows``."""
    rows = np.asarray(rows, dtype=np.int64)
    return rows[spread_positions(index["case"].to_numpy()[rows], count, seed)]
