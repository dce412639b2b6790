"""The synthetic writer and the Kaggle-layout reader, on the phantom (the same reader path)."""

import hashlib
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from advseg.data.index import BASE_COLUMNS, UWMGI_CLASSES
from advseg.data.rle import rle_decode
from advseg.data.synth import write_synthetic
from advseg.data.uwmgi import HOST_EXCLUDED, read_png, read_uwmgi
from advseg.errors import UserError
from data_corpus import copy_of, tiny_synthetic


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return tiny_synthetic(tmp_path_factory.mktemp("uwmgi"))


def _digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode() + p.read_bytes())
    return h.hexdigest()


def test_synthetic_is_deterministic_by_seed(synth, tmp_path):
    again = tmp_path / "again"
    write_synthetic(again, cases=2, scans=2, slices=6, seed=3)
    assert _digest(again) == _digest(synth)
    other = tmp_path / "other"
    write_synthetic(other, cases=2, scans=2, slices=6, seed=4)
    assert _digest(other) != _digest(synth)


def test_synthetic_refuses_to_overwrite(synth):
    with pytest.raises(UserError, match="exists and is not empty"):
        write_synthetic(synth, cases=1, scans=1, slices=1)


def test_index_schema_and_values(synth):
    index, exclusions = read_uwmgi(synth)
    assert list(index.columns) == [*BASE_COLUMNS, *UWMGI_CLASSES]
    assert index.attrs["classes"] == list(UWMGI_CLASSES)
    assert len(index) == 2 * 2 * 6
    assert index["scan"].nunique() == 4 and index["case"].nunique() == 2
    assert (index["image_z"] == -1).all()
    sizes = set(zip(index["width"], index["height"], strict=True))
    assert sizes == {(266, 266), (360, 310)}
    row = index.iloc[0]
    assert row["id"] == f"case{row['case']}_day{row['day']}_slice_{row['slice']:04d}"
    assert exclusions.scans == {} and exclusions.skipped == {}


def test_png_is_16_bit_and_read_without_loss(synth):
    index, _ = read_uwmgi(synth)
    row = index[index["width"] == 360].iloc[3]
    image = read_png(row["image_path"], row["width"], row["height"])
    assert image.dtype == np.uint16 and image.shape == (310, 360)
    assert image.max() > 4000  # 16-bit range, not rescaled to 8 bits
    raw = cv2.imread(row["image_path"], cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(image, raw)


def test_anatomy_changes_smoothly_and_some_slices_are_empty(tmp_path):
    root = tmp_path / "s"
    write_synthetic(root, cases=1, scans=1, slices=40, seed=0)
    index, _ = read_uwmgi(root)
    present = index[list(UWMGI_CLASSES)].ne("").any(axis=1)
    assert 0.3 < present.mean() < 0.8  # real set: 43 %
    assert not present.iloc[0] and not present.iloc[-1]  # the slab's ends show no organ
    masks = np.stack([rle_decode(r, 266, 266) for r in index["small_bowel"]]).astype(bool)
    areas = masks.sum(axis=(1, 2))
    on = np.flatnonzero(areas)
    inter = (masks[on[:-1]] & masks[on[1:]]).sum(axis=(1, 2))
    union = (masks[on[:-1]] | masks[on[1:]]).sum(axis=(1, 2))
    assert (inter / union).min() > 0.3  # consecutive slices overlap: smooth anatomy


def test_exclusions_are_counted(synth, tmp_path):
    root = copy_of(synth, tmp_path / "d")
    index, _ = read_uwmgi(root, exclude="none")
    scan = index["scan"].iloc[0]
    kept, exclusions = read_uwmgi(root, exclude=[scan, "case99_day1"])
    assert len(kept) == len(index) - 6
    assert scan not in set(kept["scan"])
    assert exclusions.scans == {scan: 6}
    text = " ".join(exclusions.lines())
    assert "1 of 2 listed, 6 slices" in text and "case99_day1" in text
    _, host = read_uwmgi(root, exclude="host")
    assert host.listed == HOST_EXCLUDED


def test_unknown_exclusion_list_names_the_valid_ones(synth):
    with pytest.raises(UserError, match="default, host, none"):
        read_uwmgi(synth, exclude="hosts")


def test_missing_image_can_be_skipped_and_counted(synth, tmp_path):
    root = copy_of(synth, tmp_path / "d")
    index, _ = read_uwmgi(root)
    gone = index.iloc[4]
    Path(gone["image_path"]).unlink()
    with pytest.raises(UserError, match=f"no image for {gone['id']}"):
        read_uwmgi(root)
    kept, exclusions = read_uwmgi(root, skip_unreadable=True)
    assert len(kept) == len(index) - 1
    assert exclusions.skipped == {gone["id"]: "image file missing"}


def test_images_without_labels_are_counted(synth, tmp_path):
    root = copy_of(synth, tmp_path / "d")
    table = pd.read_csv(root / "train.csv", dtype=str, keep_default_na=False)
    table.iloc[3:].to_csv(root / "train.csv", index=False)  # drop the first slice's 3 rows
    index, exclusions = read_uwmgi(root)
    assert len(index) == 23 and exclusions.unlabelled == 1


def test_phantom_ellipses_drawn_on_their_box_equal_the_whole_grid_formula():
    from advseg.data.synth import _Painter

    painter = _Painter(360, 310, np.random.default_rng(0))
    rng = np.random.default_rng(1)
    for _ in range(500):  # centres and radii within, across and beyond the image's edges
        cx, cy = (float(v) for v in rng.uniform(-1.5, 1.5, 2))
        rx, ry = (float(v) for v in rng.uniform(0.002, 1.2, 2))
        whole = ((painter.x - cx) / rx) ** 2 + ((painter.y - cy) / ry) ** 2 <= 1
        assert (painter._ellipse(cx, cy, rx, ry) == whole).all()
