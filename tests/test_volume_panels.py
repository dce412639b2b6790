"""Report panels of volumes in the radiological convention: a NIfTI volume is canonical RAS+, so
its axial slice is drawn anterior up with the patient's right on the viewer's left (letters R,
L); stacked PNG slices (orientation unknown) are drawn as stored, without letters."""

from __future__ import annotations

import pandas as pd
import torch

from advseg.data import DataConfig, load_volumes, write_synthetic, write_synthetic_nifti
from advseg.evaluate.engine import BatchOutput
from advseg.evaluate.scoring import example_arrays, merge_examples, volume_slices
from advseg.report.figures import example_panel


def test_volume_index_marks_canonical_volumes(tmp_path):
    write_synthetic_nifti(tmp_path / "ct", cases=2, slices=8, size=(16, 16), seed=0)
    ct = load_volumes(DataConfig(path=tmp_path / "ct", cache_dir=tmp_path / "cache"))
    assert ct.index["ras"].tolist() == [1, 1]
    write_synthetic(tmp_path / "png", cases=2, scans=1, slices=6, seed=1)
    png = load_volumes(DataConfig(path=tmp_path / "png", cache_dir=tmp_path / "cache"))
    assert png.index["ras"].tolist() == [0, 0]


def _panel(ras: int):
    """The panel of one example volume (z-scored, 4 x 6 x 8) whose axial slice 2 holds the
    truth and a bright voxel at the last row and column: anterior, the patient's right."""
    x = torch.full((1, 1, 4, 6, 8), -1.0)
    x[0, 0, 2, -1, -1] = 2.0
    y = torch.zeros(1, 1, 4, 6, 8)
    y[0, 0, 2, 1:3, 1:3] = 1
    out = BatchOutput(torch.zeros(1, 1, 4, 6, 8), [x + 0.1], [torch.zeros(1, 1, 4, 6, 8)])
    meta = pd.DataFrame({"id": ["case1_day0"], "ras": [ras]})
    examples = volume_slices(
        merge_examples([(0, example_arrays(out, x, y, meta, "sigmoid", [0]))], ["bce"])
    )
    assert examples["ras"].tolist() == [ras] and examples["image"].shape == (1, 1, 6, 8)
    return example_panel(examples, "bce", ["organ"], "t", max_rows=1)


def test_a_canonical_volume_is_drawn_radiologically_with_its_letters():
    figure = _panel(ras=1)
    image = figure.axes[0].images[0].get_array()
    assert image[0, 0] == 1.0 and float(image.sum()) == 1.0  # anterior right: top left
    letters = {t.get_text(): t.get_position() for t in figure.axes[0].texts}
    assert letters["R"][0] < 0.5 < letters["L"][0]  # patient's right on the viewer's left
    assert letters["A"][1] > 0.5 > letters["P"][1]  # anterior up


def test_stacked_png_volumes_are_drawn_as_stored_without_letters():
    figure = _panel(ras=0)
    image = figure.axes[0].images[0].get_array()
    assert image[-1, -1] == 1.0 and float(image.sum()) == 1.0
    assert not figure.axes[0].texts
