import numpy as np
import pytest

from advseg.config import from_dict, to_dict
from advseg.data.preprocess import (
    PreprocessConfig,
    neighbour_rows,
    normalize_intensity,
    preprocess_slice,
    resize_masks,
)
from advseg.errors import UserError


def test_divide_by_slice_max_is_the_default():
    image = np.array([[0, 100], [200, 400]], np.uint16)
    out = normalize_intensity(image, PreprocessConfig())
    np.testing.assert_allclose(out, [[0, 0.25], [0.5, 1.0]])
    assert out.dtype == np.float32


@pytest.mark.parametrize("intensity", ["max", "percentile"])
def test_blank_slice_gives_zeros_not_nan(intensity):
    out = normalize_intensity(np.zeros((10, 12), np.uint16), PreprocessConfig(intensity=intensity))
    assert np.isfinite(out).all() and (out == 0).all()


def test_constant_slice_never_gives_nan():
    image = np.full((10, 12), 7, np.uint16)
    assert (normalize_intensity(image, PreprocessConfig(intensity="max")) == 1).all()
    assert (normalize_intensity(image, PreprocessConfig(intensity="percentile")) == 0).all()


def test_percentile_clips_hot_pixels():
    rng = np.random.default_rng(0)
    image = rng.uniform(0, 1000, (50, 50)).astype(np.float32)
    image[0, 0] = 1e6  # one hot pixel
    by_max = normalize_intensity(image, PreprocessConfig(intensity="max"))
    robust = normalize_intensity(image, PreprocessConfig(intensity="percentile"))
    assert by_max.mean() < 0.01 < 0.4 < robust.mean()
    assert robust.min() == 0 and robust.max() == 1


def test_preprocess_slice_shapes_and_ranges_non_square():
    image = (np.random.default_rng(0).uniform(0, 16000, (310, 360))).astype(np.uint16)
    masks = np.zeros((3, 310, 360), np.uint8)
    masks[1, 100:200, 50:300] = 1
    x, m = preprocess_slice(image, masks, PreprocessConfig(size=64, resize="stretch"))
    assert x.shape == (64, 64) and x.dtype == np.float32 and x.min() >= 0 and x.max() <= 1
    assert m.shape == (3, 64, 64) and m.dtype == np.uint8 and set(np.unique(m)) <= {0, 1}
    assert m[0].sum() == 0 and m[1].sum() > 0
    # the box covers rows 100..200 of 310 (pixel edges): its model pixels' edges are there too
    rows = np.flatnonzero(m[1].any(axis=1))
    assert abs(rows[0] - 100 * 64 / 310) <= 0.5 and abs(rows[-1] + 1 - 200 * 64 / 310) <= 0.5


def test_area_resize_drops_thin_structures_nearest_may_keep():
    masks = np.zeros((1, 100, 100), np.uint8)
    masks[0, :, 50] = 1  # one pixel wide line
    area = resize_masks(masks, 10, "area")
    assert area.sum() == 0  # 10 % coverage of each output pixel: below the 0.5 threshold
    block = np.zeros((1, 100, 100), np.uint8)
    block[0, 20:60, 30:70] = 1
    for method in ("nearest", "area"):
        out = resize_masks(block, 10, method)
        assert out[0, 2:6, 3:7].all() and out.sum() == 16


def test_copy_channels_repeat_the_row():
    scans = np.array(["a", "a", "b"])
    rows = neighbour_rows(scans, np.array([1, 2, 1]), PreprocessConfig(channels=3))
    np.testing.assert_array_equal(rows, [[0, 0, 0], [1, 1, 1], [2, 2, 2]])


def test_neighbours_stay_in_their_scan_and_clamp():
    # rows deliberately not sorted: scan b first, slices out of order
    scans = np.array(["b", "a", "a", "a", "a", "b"])
    slices = np.array([2, 3, 1, 4, 2, 1])
    cfg = PreprocessConfig(channels=3, stack="neighbours", stride=2)
    rows = neighbour_rows(scans, slices, cfg)
    # row 1 (a, slice 3): slices 1, 3, 5 -> 5 clamps to 4
    np.testing.assert_array_equal(rows[1], [2, 1, 3])
    # row 0 (b, slice 2): slices 0 -> 1, 2, 4 -> 2
    np.testing.assert_array_equal(rows[0], [5, 0, 0])
    assert (scans[rows] == scans[:, None]).all()


def test_config_round_trips_and_is_checked():
    cfg = PreprocessConfig(size=96, intensity="percentile", percentiles=(1.0, 99.0))
    assert from_dict(PreprocessConfig, to_dict(cfg)) == cfg
    with pytest.raises(UserError, match=r"preprocess\.channels"):
        PreprocessConfig(channels=4, stack="neighbours")
    with pytest.raises(UserError, match="mask_resize"):
        from_dict(PreprocessConfig, {"mask_resize": "cubic"})


def test_pad_keeps_the_aspect_ratio_and_records_the_padding():
    import pandas as pd

    from advseg.data.preprocess import restore_slice, slice_geometry

    image = np.full((310, 360), 1000, np.uint16)  # the Kaggle 360x310 scans (W x H)
    masks = np.zeros((1, 310, 360), np.uint8)
    masks[0, 100:200, 50:300] = 1
    x, m = preprocess_slice(image, masks, PreprocessConfig(size=64))  # pad is the default
    fitted = round(310 * 64 / 360)  # 55 rows of image, 4 padding rows above, 5 below
    top = (64 - fitted) // 2
    assert (x[:top] == 0).all() and (x[top + fitted :] == 0).all()
    assert (x[top : top + fitted] == 1).all()  # the whole width is image
    rows = np.flatnonzero(m[0].any(axis=1))
    cols = np.flatnonzero(m[0].any(axis=0))
    scale = 64 / 360  # one factor for both axes: a circle stays a circle
    down = fitted / 310  # rows: 310 became 55 (the rounding makes it a hair off `scale`)
    assert (
        abs(rows[0] - (top + 100 * down)) <= 0.5 and abs(rows[-1] + 1 - (top + 200 * down)) <= 0.5
    )
    assert abs(cols[0] - 50 * scale) <= 0.5 and abs(cols[-1] + 1 - 300 * scale) <= 0.5
    index = pd.DataFrame(
        {
            "width": [360, 266],
            "height": [310, 266],
            "spacing_w": [1.5, 1.5],
            "spacing_h": [1.5, 1.5],
        }
    )
    geometry = slice_geometry(index, PreprocessConfig(size=64))
    assert geometry.iloc[0][["top", "left", "fitted_h", "fitted_w"]].tolist() == [4, 0, 55, 64]
    assert geometry.iloc[1][["top", "left", "fitted_h", "fitted_w"]].tolist() == [0, 0, 64, 64]
    assert geometry["mm_w"].tolist() == pytest.approx([1.5 * 360 / 64, 1.5 * 266 / 64])
    assert geometry["mm_h"].tolist() == pytest.approx([1.5 * 310 / 55, 1.5 * 266 / 64])
    stretched = slice_geometry(index, PreprocessConfig(size=64, resize="stretch"))
    assert stretched["mm_h"].tolist() == pytest.approx([1.5 * 310 / 64, 1.5 * 266 / 64])
    assert stretched[["top", "left"]].to_numpy().sum() == 0
    # un-padding gives the source slice back (to the resize's rounding)
    back = restore_slice(m, geometry.iloc[0], 310, 360)
    assert back.shape == (1, 310, 360) and back.dtype == np.uint8
    overlap = (back & masks).sum() / (back | masks).sum()
    assert overlap > 0.93  # 5.6 source pixels per model pixel: the border moves by a few


def test_restore_slice_is_exact_where_the_resize_is():
    import pandas as pd

    from advseg.data.preprocess import restore_slice, slice_geometry

    masks = np.zeros((2, 16, 32), bool)
    masks[0, 4:10, 6:20] = True
    masks[1, 0:2, 30:32] = True
    config = PreprocessConfig(size=32, mask_resize="nearest")
    _, m = preprocess_slice(np.ones((16, 32)), masks.astype(np.uint8), config)
    index = pd.DataFrame({"width": [32], "height": [16], "spacing_w": [1.0], "spacing_h": [1.0]})
    geometry = slice_geometry(index, config).iloc[0]
    assert (m[:, :8] == 0).all() and (m[:, 24:] == 0).all()  # 8 padding rows above and below
    np.testing.assert_array_equal(restore_slice(m.astype(bool), geometry, 16, 32), masks)


def test_resize_is_checked():
    with pytest.raises(UserError, match=r"preprocess\.resize: 'crop' is not one of pad, stretch"):
        PreprocessConfig(resize="crop")
