"""The one record builder (advseg.runs.record_rows), on masks small enough to count by hand."""

import numpy as np
import pandas as pd
import torch

from advseg.runs.record_rows import Scores, pixel_mm, score, slice_records
from advseg.runs.records import RECORD_COLUMNS, check_records

CLASSES = ["a", "b"]
META = pd.DataFrame(
    {"id": ["s1", "s2"], "case": [1, 2], "scan": ["c1", "c2"], "slice": [7, 9]}, index=[5, 3]
)


def _masks() -> tuple[torch.Tensor, torch.Tensor]:
    """Two slices x two classes, 4 x 4: target and prediction with known counts."""
    target = torch.zeros(2, 2, 4, 4, dtype=torch.bool)
    pred = torch.zeros_like(target)
    target[0, 0, 0, :] = True  # slice 1, class a: 4 true pixels
    pred[0, 0, 0, :2] = True  # 2 found, 2 missed
    pred[0, 0, 3, 3] = True  # 1 false positive
    # slice 1, class b: both empty
    target[1, 0, 1:3, 1:3] = True  # slice 2, class a: 4 true, all found
    pred[1, 0, 1:3, 1:3] = True
    pred[1, 1, 0, 0] = True  # slice 2, class b: empty truth, 1 false positive
    return pred, target


def test_score_counts_pixels_and_distances():
    pred, target = _masks()
    s = score(pred, target, spacing=np.array([[1.0, 1.0], [0.5, 2.0]]))
    assert s.tp.tolist() == [2, 0, 4, 0]
    assert s.fp.tolist() == [1, 0, 0, 1]
    assert s.fn.tolist() == [2, 0, 0, 0]
    assert s.hd95[1] == 0 and s.hd95[2] == 0 and np.isnan(s.hd95[3])  # empty pairs
    assert s.hd95_mm[2] == 0 and np.isnan(s.hd95_mm[3])
    assert np.isnan(score(pred, target).hd95_mm).all()  # no spacing: no millimetres


def test_slice_records_fill_the_common_columns():
    pred, target = _masks()
    clean = score(target, target)  # a perfect prediction
    adv = score(pred, target)
    frame = slice_records(
        META, CLASSES, clean, adv, {"linf": np.array([0.1, 0.2])}, loss="bce", eps=0.5
    )
    assert frame["slice_id"].tolist() == ["s1", "s1", "s2", "s2"]
    assert frame["case"].tolist() == [1, 1, 2, 2] and frame["slice"].tolist() == [7, 7, 9, 9]
    assert frame["class"].tolist() == ["a", "b", "a", "b"]
    assert frame["gt_pixels"].tolist() == [4, 0, 4, 0]
    assert frame["dice_clean"].tolist() == [1.0, 1.0, 1.0, 1.0]  # the empty pair counts as 1
    assert np.allclose(frame["dice_adv"], [4 / 7, 1.0, 1.0, 0.0])
    assert np.allclose(frame["iou_adv"], [2 / 5, 1.0, 1.0, 0.0])
    assert frame["linf"].tolist() == [0.1, 0.1, 0.2, 0.2]  # per slice, repeated per class
    assert set(frame["loss"]) == {"bce"} and set(frame["eps"]) == {0.5}


def test_records_built_here_complete_the_format():
    pred, target = _masks()
    s = score(pred, target)
    per_slice = {name: np.zeros(2) for name in ("linf", "l2", "psnr", "ssim", "luminosity")}
    frame = slice_records(META, CLASSES, s, s, per_slice, loss="bce", member="", eps=0.0)
    frame = frame.assign(model="m", arch="unet", params=1, attack="fgsm")
    records = check_records(frame)  # the defaulted columns (seed, source, abstained) filled
    assert list(records.columns) == list(RECORD_COLUMNS) and len(records) == 4


def test_adversarial_counts_may_differ_from_a_prediction():
    """Certification counts abstentions wrong: its counts are given, not derived."""
    pred, target = _masks()
    clean = score(pred, target)
    zeros = np.zeros(4, dtype=np.int64)
    adv = Scores(zeros, zeros + 16, zeros + 0, np.zeros(4), np.full(4, np.nan))
    frame = slice_records(META, CLASSES, clean, adv)
    assert frame["fp_adv"].tolist() == [16] * 4 and frame["dice_adv"].tolist() == [0.0] * 4


def test_pixel_mm_reads_the_geometry_rows():
    class Data:
        geometry = pd.DataFrame({"mm_h": [1.0, 2.0, 3.0], "mm_w": [4.0, 5.0, 6.0]})

    assert pixel_mm(Data(), [2, 0]).tolist() == [[3.0, 6.0], [1.0, 4.0]]
    assert pixel_mm(object(), [0]) is None
