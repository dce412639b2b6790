import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from advseg.data.rle import rle_decode, rle_decode_loop, rle_encode
from advseg.errors import UserError


@st.composite
def masks(draw):
    h = draw(st.integers(1, 40))
    w = draw(st.integers(1, 40))
    return draw(arrays(np.uint8, (h, w), elements=st.integers(0, 1)))


@settings(max_examples=200, deadline=None)
@given(masks())
def test_round_trip_any_shape(mask):
    h, w = mask.shape
    rle = rle_encode(mask)
    np.testing.assert_array_equal(rle_decode(rle, h, w), mask)
    np.testing.assert_array_equal(rle_decode_loop(rle, h, w), mask)


def test_kaggle_convention_is_row_major_and_one_indexed():
    # H=2, W=3: pixels numbered 1..6 along rows; "2 2" covers pixels 2 and 3 of row 0.
    mask = rle_decode("2 2 6 1", 2, 3)
    np.testing.assert_array_equal(mask, [[0, 1, 1], [0, 0, 1]])
    assert rle_encode(mask) == "2 2 6 1"


def test_non_square_orientation():
    mask = np.zeros((310, 360), np.uint8)  # H x W as in the 360x310 scans
    mask[0, 359] = 1  # end of the first row
    mask[1, 0] = 1  # start of the second row
    assert rle_encode(mask) == "360 2"


def test_empty_inputs_give_empty_masks():
    for empty in ("", None, float("nan")):
        assert rle_decode(empty, 4, 5).sum() == 0
    assert rle_encode(np.zeros((3, 3))) == ""


def test_run_ending_exactly_at_image_end_is_valid():
    assert rle_decode("5 4", 2, 4).sum() == 4


@pytest.mark.parametrize(
    ("rle", "message"),
    [
        ("1 2 3", "odd number of fields"),
        ("1 x", "'x' is not an integer"),
        ("1.5 2", "is not an integer"),
        ("7 4", "past the image end"),
        ("1 4 3 2", "overlap"),
        ("5 1 1 1", "out of order"),
        ("0 3", "below 1"),
        ("1 0", "below 1"),
    ],
)
def test_bad_rle_names_where(rle, message):
    with pytest.raises(UserError, match=message) as err:
        rle_decode(rle, 2, 4, where="train.csv: case1_day0_slice_0001, stomach")
    text = str(err.value)
    assert text.startswith("train.csv: case1_day0_slice_0001, stomach:")
    assert "\n" not in text


def test_extra_whitespace_is_tolerated():
    for rle in (" 1 2 ", "1  2", "1 2\n", "\t1\t2"):
        np.testing.assert_array_equal(rle_decode(rle, 1, 4), [[1, 1, 0, 0]])
