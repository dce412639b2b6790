import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from monai.metrics import DiceMetric, HausdorffDistanceMetric, PSNRMetric

from advseg.metrics import (
    attack_success,
    confusion_counts,
    dice_from_counts,
    dice_score,
    hard_prediction,
    hd95,
    iou_score,
    luminosity,
    perturbation_norms,
    psnr,
    ssim,
)


def random_masks(seed: int, b: int = 3, k: int = 3, size: int = 16, p: float = 0.3):
    g = torch.Generator().manual_seed(seed)
    pred = torch.rand(b, k, size, size, generator=g) < p
    target = torch.rand(b, k, size, size, generator=g) < p
    pred[0, 0] = False  # empty prediction, non-empty target
    target[1, 1] = False  # empty target, non-empty prediction
    pred[2, 2], target[2, 2] = False, False  # both empty
    return pred, target


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16), p=st.floats(0.0, 1.0))
def test_counts_add_up(seed, p):
    pred, target = random_masks(seed, p=p)
    tp, fp, fn = confusion_counts(pred, target)
    assert torch.equal(tp + fn, target.flatten(2).sum(2))
    assert torch.equal(tp + fp, pred.flatten(2).sum(2))
    assert tp.shape == (3, 3) and tp.dtype == torch.int64


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dice_agrees_with_monai_dice_metric(seed):
    pred, target = random_masks(seed)
    reference = DiceMetric(include_background=True, reduction="none", ignore_empty=False)
    expected = reference(pred.float(), target.float()).double()
    assert torch.allclose(dice_score(pred, target), expected, atol=1e-6)
    assert dice_score(pred, target)[2, 2] == 1.0  # both empty
    assert dice_score(pred, target)[1, 1] == 0.0  # false positives only


def test_dice_on_empty_pairs_follows_the_documented_convention():
    pred = torch.zeros(2, 1, 8, 8, dtype=torch.bool)
    target = pred.clone()
    target[1, 0, 2:4, 2:4] = True  # slice 1: organ there, nothing predicted
    assert dice_score(pred, target).flatten().tolist() == [1.0, 0.0]  # empty-empty: 1
    left_out = dice_score(pred, target, empty=float("nan")).flatten()
    assert torch.isnan(left_out[0]) and left_out[1] == 0.0
    assert torch.isnan(iou_score(pred, target, empty=float("nan"))[0, 0])


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (torch.full((1, 1, 4, 4), 0.3), r"values in \[0.3, 0.3\], not a hard mask"),
        (torch.linspace(-2, 3, 16).reshape(1, 1, 4, 4), r"values in \[-2, 3\]"),
        (torch.full((1, 1, 4, 4), float("nan")), "holds NaN or inf"),
    ],
)
def test_dice_refuses_probabilities_logits_and_images(bad, match):
    hard = torch.ones(1, 1, 4, 4)  # 0/1 floats are masks
    assert dice_score(hard, hard.bool()).item() == 1.0
    with pytest.raises(ValueError, match=f"dice_score pred: {match}"):
        dice_score(bad, hard)
    with pytest.raises(ValueError, match="iou_score target: "):
        iou_score(hard, bad)
    with pytest.raises(ValueError, match=r"pred \(1, 1, 4, 4\) and target \(1, 2, 4, 4\)"):
        dice_score(hard, torch.ones(1, 2, 4, 4))


def test_iou_is_dice_over_two_minus_dice():
    pred, target = random_masks(4)
    d, j = dice_score(pred, target), iou_score(pred, target)
    assert torch.allclose(j, d / (2 - d))


@pytest.mark.parametrize("seed", [0, 1])
def test_hd95_agrees_with_monai_where_both_masks_exist(seed):
    g = torch.Generator().manual_seed(seed)
    pred = torch.zeros(2, 3, 24, 24, dtype=torch.bool)
    target = torch.zeros_like(pred)
    for b in range(2):
        for k in range(3):
            r, c, s = torch.randint(0, 14, (3,), generator=g).tolist()
            pred[b, k, r : r + s + 2, c : c + 6] = True
            target[b, k, c : c + 5, r : r + s + 3] = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = HausdorffDistanceMetric(include_background=True, percentile=95)
        expected = reference(pred.float(), target.float()).double()
    assert torch.allclose(hd95(pred, target), expected)
    assert (hd95(pred, target) > 0).any()


def test_hd95_convention_for_empty_masks():
    pred, target = random_masks(0)
    values = hd95(pred, target)
    assert values[2, 2] == 0.0  # both empty: right
    assert np.isnan(values[0, 0]) and np.isnan(values[1, 1])  # one empty: undefined
    assert np.isfinite(values[0, 1])


def test_hard_prediction():
    logits = torch.tensor([[[[0.5, -0.1]], [[1.0, -2.0]]]])  # (1, 2, 1, 2)
    assert hard_prediction(logits).tolist() == [[[[True, False]], [[True, False]]]]
    assert hard_prediction(logits, "softmax").tolist() == [[[[False, True]], [[True, False]]]]


def test_dice_from_counts_smoothing_is_monai_dice_loss():
    assert dice_from_counts(0, 0, 0, smooth=1e-5) == 1.0
    assert np.isnan(dice_from_counts(0, 0, 0))
    assert dice_from_counts(2, 1, 1) == pytest.approx(4 / 6)


def test_attack_success():
    values = attack_success(np.array([0.8, 0.5, 0.0]), np.array([0.4, 0.5, 0.0]))
    assert values[:2].tolist() == [0.5, 0.0] and np.isnan(values[2])


def test_perturbation_norms_psnr_ssim_luminosity():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 16, 16, generator=g)
    delta = torch.zeros_like(x)
    delta[0, 0, 0, 0], delta[0, 1, 2, 2] = 0.03, -0.04
    linf, l2 = perturbation_norms(x, x + delta)
    assert linf.tolist() == pytest.approx([0.04, 0.0])
    assert l2.tolist() == pytest.approx([0.05, 0.0])
    noisy = (x + 0.05 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    expected = PSNRMetric(max_val=1.0, reduction="none")(noisy, x).flatten().tolist()
    assert psnr(x, noisy).tolist() == pytest.approx(expected, rel=1e-4)
    assert torch.isinf(psnr(x, x)).all()
    assert ssim(x, x).tolist() == pytest.approx([1.0, 1.0])
    assert (ssim(x, noisy) < 0.99).all()
    assert ssim(x[:, :, :5, :5], noisy[:, :, :5, :5]).shape == (2,)  # smaller than the window
    assert luminosity(x).tolist() == pytest.approx(x.flatten(1).mean(1).tolist())


def test_hd95_in_millimetres_scales_each_axis_by_its_pixel_size():
    pred = torch.zeros(2, 1, 20, 20, dtype=torch.bool)
    target = torch.zeros(2, 1, 20, 20, dtype=torch.bool)
    pred[0, 0, 5, 5], target[0, 0, 5, 9] = True, True  # 4 pixels across
    pred[1, 0, 2, 5], target[1, 0, 9, 5] = True, True  # 7 pixels down
    pixels = hd95(pred, target)
    assert pixels.flatten().tolist() == pytest.approx([4.0, 7.0])
    spacing = np.array([[0.5, 2.0], [3.0, 0.1]])  # (mm down, mm across) per slice
    assert hd95(pred, target, spacing).flatten().tolist() == pytest.approx([8.0, 21.0])
    pred[0, 0] = False  # one empty mask: NaN in mm too; both empty: 0
    target[1, 0] = pred[1, 0] = False
    result = hd95(pred, target, spacing).flatten()
    assert np.isnan(result[0].item()) and result[1].item() == 0
