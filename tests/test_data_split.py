import numpy as np
import pandas as pd
import pytest

from advseg.data.split import kfold_cases, split_cases
from advseg.errors import UserError


def _index(n_cases=20, seed=0):
    rng = np.random.default_rng(seed)
    sizes = rng.choice([80, 144], n_cases)
    return pd.DataFrame({"case": np.repeat(np.arange(1, n_cases + 1) * 3, sizes)})


def test_split_is_by_case_and_covers_every_row():
    index = _index()
    train, test = split_cases(index, test_fraction=0.1, seed=1)
    assert set(index["case"].iloc[train]).isdisjoint(index["case"].iloc[test])
    assert np.array_equal(np.sort(np.r_[train, test]), np.arange(len(index)))
    assert index["case"].iloc[test].nunique() == 2  # 10 % of 20 cases


def test_same_seed_same_split_other_seed_other_split():
    index = _index()
    a = split_cases(index, 0.25, seed=7)
    b = split_cases(index, 0.25, seed=7)
    c = split_cases(index, 0.25, seed=8)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not np.array_equal(a[1], c[1])


def test_split_keeps_both_sides_non_empty():
    train, test = split_cases(_index(3), test_fraction=0.01)
    assert len(train) and len(test)
    with pytest.raises(UserError, match="at least 2 cases"):
        split_cases(_index(1))
    with pytest.raises(UserError, match="test_fraction"):
        split_cases(_index(), test_fraction=1.0)


def test_kfold_partitions_cases_and_balances_slices():
    index = _index(23)
    folds = kfold_cases(index, k=5, seed=0)
    assert len(folds) == 5
    val = np.concatenate([v for _, v in folds])
    assert np.array_equal(np.sort(val), np.arange(len(index)))  # each row validated once
    for train, v in folds:
        assert set(index["case"].iloc[train]).isdisjoint(index["case"].iloc[v])
        assert len(train) + len(v) == len(index)
    sizes = [len(v) for _, v in folds]
    assert max(sizes) - min(sizes) <= 144
    again = kfold_cases(index, k=5, seed=0)
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(folds, again, strict=True))


def test_kfold_rejects_more_folds_than_cases():
    with pytest.raises(UserError, match="k: need"):
        kfold_cases(_index(3), k=4)


def test_spread_rows_are_seeded_and_spread_over_cases():
    import pandas as pd

    from advseg.data import spread_positions, spread_rows

    index = pd.DataFrame({"case": np.repeat([5, 1, 9, 3], [40, 30, 20, 10])})  # 100 slices
    rows = np.arange(100)
    picked = spread_rows(index, rows, 10, seed=0)
    assert len(picked) == 10 and (np.diff(picked) > 0).all()
    counts = index["case"].iloc[picked].value_counts()
    assert sorted(counts.index) == [1, 3, 5, 9] and counts.max() - counts.min() <= 1
    assert not np.array_equal(picked, np.arange(10))  # not the first ten (one case)
    np.testing.assert_array_equal(spread_rows(index, rows, 10, seed=0), picked)
    assert not np.array_equal(spread_rows(index, rows, 10, seed=1), picked)
    # a case with few slices gives all it has; the rest come from the others
    few = spread_positions(np.array([1] * 2 + [2] * 20), 8, seed=0)
    assert set(few[:2]) == {0, 1} and len(few) == 8
    assert spread_rows(index, rows[::-1], 200).tolist() == rows[::-1].tolist()
    assert len(spread_rows(index, rows, 0)) == 0


@pytest.mark.parametrize(
    ("cases", "held"), [(2, 1), (3, 1), (4, 2), (6, 2), (14, 2), (15, 2), (30, 3)]
)
def test_the_default_split_holds_out_two_cases_where_the_data_allows(cases, held):
    """Issue 26: 10 % of 6 cases held out 1; intervals over one patient had zero width."""
    _, test = split_cases(_index(cases), test_fraction=0.1, seed=0)
    assert _index(cases)["case"].iloc[test].nunique() == held
    _, legacy = split_cases(_index(cases), test_fraction=0.1, seed=0, min_test=1)
    assert _index(cases)["case"].iloc[legacy].nunique() == max(1, round(0.1 * cases))


def test_fewer_than_two_test_cases_are_warned_about_saying_why():
    from advseg.data.split import split_train_val_test
    from advseg.errors import AdvsegWarning

    with pytest.warns(AdvsegWarning, match=r"split: 1 test case of 3: 2 need 4 cases or more"):
        split_train_val_test(_index(3), 0.1, 0.1, seed=0)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train, val, test = split_train_val_test(_index(6), 0.1, 0.1, seed=0)
    index = _index(6)
    assert [index["case"].iloc[r].nunique() for r in (train, val, test)] == [3, 1, 2]
