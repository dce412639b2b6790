import math

import numpy as np
import pandas as pd
import pytest

from advseg.errors import UserError
from advseg.runs.records import RECORD_COLUMNS, check_records
from advseg.stats.summary import PROTOCOLS, cell_label, summarize, summarize_cells

CLASSES = ("large_bowel", "small_bowel", "stomach")


def _records(model, loss, slices, params=10):
    """Records from ``slices``: {slice_id: [(gt, tp_c, fp_c, fn_c, tp_a, fp_a, fn_a)] per class}."""
    rows = []
    for slice_id, per_class in slices.items():
        for name, (gt, tpc, fpc, fnc, tpa, fpa, fna) in zip(CLASSES, per_class, strict=True):
            row = dict.fromkeys(RECORD_COLUMNS, 0)
            row.update(model=model, arch="unet", params=params, attack="fgsm", loss=loss)
            row.update(eps=0.01, slice_id=slice_id, scan="case1_day0", class_=None)
            row.update({"class": name, "gt_pixels": gt, "tp_clean": tpc, "fp_clean": fpc})
            row.update(fn_clean=fnc, tp_adv=tpa, fp_adv=fpa, fn_adv=fna)
            row.pop("class_")
            rows.append(row)
    return check_records(pd.DataFrame(rows))


EMPTY = (0, 0, 0, 0, 0, 0, 0)
SLICES = {
    # one class with a mask: clean Dice 2*8/(16+2+0) = 8/9, adversarial 2*4/(8+0+4) = 2/3
    "s1": [(8, 8, 2, 0, 4, 0, 4), EMPTY, EMPTY],
    # no mask at all, clean predicts nothing, the attack makes 5 false positives in one class
    "s2": [EMPTY, EMPTY, (0, 0, 0, 0, 0, 5, 0)],
    # two classes with masks
    "s3": [(4, 4, 0, 0, 0, 0, 4), (6, 3, 0, 3, 3, 0, 3), EMPTY],
}


def test_per_class_protocol_averages_pairs_with_a_mask():
    cells = summarize_cells(_records("m", "bce", SLICES), "per-class")
    row = cells.iloc[0]
    assert row["units"] == 3 and row["excluded"] == 6
    assert row["dsc_clean"] == pytest.approx((8 / 9 + 1 + 6 / 9) / 3)
    assert row["dsc_adv"] == pytest.approx((2 / 3 + 0 + 6 / 9) / 3)
    assert row["as"] == pytest.approx((row["dsc_clean"] - row["dsc_adv"]) / row["dsc_clean"])


def test_paper_protocol_is_monai_style_per_slice_over_slices_with_a_mask():
    s = 1e-5
    cells = summarize_cells(_records("m", "bce", SLICES), "paper")
    row = cells.iloc[0]
    assert row["units"] == 2 and row["excluded"] == 1  # s2 has no mask
    s1 = ((16 + s) / (18 + s) + 1 + 1) / 3  # empty-empty classes count as 1
    s3 = (1 + (6 + s) / (9 + s) + 1) / 3
    assert row["dsc_clean"] == pytest.approx((s1 + s3) / 2)
    s1_adv = ((8 + s) / (12 + s) + 1 + 1) / 3
    s3_adv = (s / (4 + s) + (6 + s) / (9 + s) + 1) / 3
    assert row["dsc_adv"] == pytest.approx((s1_adv + s3_adv) / 2)


def test_global_protocol_is_micro_dice_per_class():
    row = summarize_cells(_records("m", "bce", SLICES), "global").iloc[0]
    # clean: large bowel tp 12 fp 2 fn 0; small bowel tp 3 fn 3; stomach has no mask -> excluded
    assert row["units"] == 2 and row["excluded"] == 1
    assert row["dsc_clean"] == pytest.approx((24 / 26 + 6 / 9) / 2)
    # adversarial: stomach's 5 false positives do not bring it back (units follow the masks)
    assert row["dsc_adv"] == pytest.approx((8 / 16 + 6 / 9) / 2)


def test_table_two_layout_one_row_per_model():
    records = pd.concat(
        [
            _records("a", "bce", SLICES, params=5),
            _records("a", "focal", SLICES, params=5),
            _records("b", "bce", {"s1": SLICES["s1"]}, params=7),
        ],
        ignore_index=True,
    )
    table = summarize(records, "per-class")
    assert table.attrs["protocol"] == "per-class"
    bce, focal = cell_label("fgsm", "bce", 0.01), cell_label("fgsm", "focal", 0.01)
    assert list(table.columns) == [
        "model",
        "arch",
        "params",
        "units",
        "excluded",
        "DSC clean",
        f"DSC {bce}",
        f"AS {bce}",
        f"DSC {focal}",
        f"AS {focal}",
    ]
    assert table["model"].tolist() == ["a", "b"]
    assert table["params"].tolist() == [5, 7]
    # clean Dice of model a is counted once over distinct (slice, class) pairs, not per cell
    assert table.loc[0, "units"] == 3
    assert table.loc[1, "DSC clean"] == pytest.approx(8 / 9)
    assert math.isnan(table.loc[1, f"DSC {focal}"])  # model b was not attacked with focal


def test_no_nan_reaches_the_table_when_every_unit_has_a_mask():
    table = summarize(_records("m", "bce", SLICES), "paper")
    assert not table.isna().to_numpy().any()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_perfect_predictions_give_dice_one_and_no_success(protocol):
    perfect = {k: [(g, g, 0, 0, g, 0, 0) for g, *_ in v] for k, v in SLICES.items()}
    row = summarize_cells(_records("m", "bce", perfect), protocol).iloc[0]
    assert row["dsc_clean"] == pytest.approx(1.0)
    assert row["as"] == pytest.approx(0.0)


def test_bad_protocol_and_empty_records_are_user_errors():
    with pytest.raises(UserError, match="valid: paper, per-class, global"):
        summarize(_records("m", "bce", SLICES), "macro")
    with pytest.raises(UserError, match="no rows"):
        summarize(_records("m", "bce", SLICES).iloc[:0])


def test_counts_are_the_only_input():
    # Dice columns in records are ignored by the summary: it recomputes from counts
    records = _records("m", "bce", SLICES).assign(dice_clean=np.nan, dice_adv=np.nan)
    assert not np.isnan(summarize_cells(records, "per-class")["dsc_clean"]).any()


def test_hd95_means_over_present_organs_count_vanished_predictions():
    records = _records("m", "bce", SLICES)  # organs present in rows 0, 6 and 7
    records["hd95_clean"] = [1.0, 0.0, 0.0, 0.0, 0.0, np.nan, 2.0, 4.0, 0.0]
    records["hd95_adv"] = [3.0, 0.0, 0.0, 0.0, 0.0, 0.0, np.nan, 6.0, 0.0]
    row = summarize_cells(records, "per-class").iloc[0]
    assert row["hd95_pairs"] == 2 and row["hd95_excluded"] == 1  # row 6: the organ vanished
    assert row["hd95_clean"] == pytest.approx((1.0 + 4.0) / 2)
    assert row["hd95_adv"] == pytest.approx((3.0 + 6.0) / 2)
    older = records.drop(columns=["hd95_mm_clean", "hd95_mm_adv"])  # before HD95 in mm
    assert np.isnan(summarize_cells(older, "per-class").iloc[0]["hd95_mm_clean"])
    records["hd95_mm_clean"] = records["hd95_clean"] * 1.5  # 1.5 mm pixels
    records["hd95_mm_adv"] = records["hd95_adv"] * 0.5
    row = summarize_cells(records, "per-class").iloc[0]
    assert row["hd95_mm_clean"] == pytest.approx(1.5 * (1.0 + 4.0) / 2)  # the same pairs
    assert row["hd95_mm_adv"] == pytest.approx(0.5 * (3.0 + 6.0) / 2)
