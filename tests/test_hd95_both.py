"""HD95 from one edge extraction per pair (metrics.hd95_both) equals MONAI's
compute_hausdorff_distance exactly, in pixels and in millimetres, with the empty-mask convention."""

from __future__ import annotations

import numpy as np
import torch
from monai.metrics import compute_hausdorff_distance

from advseg.metrics import hd95, hd95_both


def _masks(seed: int, shape=(6, 3, 32, 40)) -> torch.Tensor:
    """Blobs of random size and place (smoothed noise, thresholded), some classes empty."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.rand(shape, generator=g)
    smooth = torch.nn.functional.avg_pool2d(noise, 7, stride=1, padding=3)
    masks = smooth > 0.52
    masks[0, 1] = False  # empty in this one
    return masks


def _monai(pred, target, spacing=None) -> torch.Tensor:
    """The reference: MONAI on every defined pair; 0 both empty, NaN one empty."""
    out = torch.zeros(pred.shape[:2], dtype=torch.float64)
    for b, k in np.ndindex(*pred.shape[:2]):
        p, t = pred[b, k], target[b, k]
        if not p.any() and not t.any():
            continue
        if not p.any() or not t.any():
            out[b, k] = float("nan")
            continue
        kwargs = {} if spacing is None else {"spacing": [list(map(float, spacing[b]))]}
        value = compute_hausdorff_distance(
            p[None, None].float(), t[None, None].float(), include_background=True,
            percentile=95, **kwargs,
        )  # fmt: skip
        out[b, k] = value.flatten().double()[0]
    return out


def test_hd95_both_equals_monai_exactly():
    pred, target = _masks(0), _masks(1)
    target[2, 0] = False  # one empty, the other not: NaN
    spacing = np.array([[0.7, 1.3], [1.0, 1.0], [2.5, 0.4], [1.1, 1.1], [0.9, 3.0], [1.5, 1.5]])
    pixels, mm = hd95_both(pred, target, spacing)
    assert torch.equal(pixels.isnan(), _monai(pred, target).isnan())
    torch.testing.assert_close(pixels, _monai(pred, target), rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(mm, _monai(pred, target, spacing), rtol=0, atol=0, equal_nan=True)
    assert (mm != pixels)[~pixels.isnan() & (pixels > 0)].any()  # the spacing is used
    none_pixels, none_mm = hd95_both(pred, target, None)
    assert torch.equal(none_pixels.nan_to_num(-1), pixels.nan_to_num(-1)) and none_mm.isnan().all()
    torch.testing.assert_close(hd95(pred, target, spacing), mm, rtol=0, atol=0, equal_nan=True)
