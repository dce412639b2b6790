"""The export round trip on the synthetic data sets (issue 26): the cached masks put back on the
source grid by ``restore_slice`` (what ``advseg export`` writes as ``truth_mask``) against the
source labels.

At 64 px a binary mask cannot carry Dice 0.98 on the phantom's bowel and the CT's kidneys: a
model pixel is 3 to 5.6 source pixels, and the binary mask knows each outline only to within
one. The tests show where the loss is (binarisation, not the geometry: the same 64 px grid
carrying each pixel's coverage restores to >= 0.98) and check >= 0.98 per class at 224 px (the
default size), where the information exists. Measured numbers (6 cases): docs/architecture.md.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from advseg.data import DataConfig, PreprocessConfig, load_data, restore_slice, write_synthetic
from advseg.data.preprocess import fit_square, fitted_size
from advseg.data.rle import rle_decode
from advseg.data.synth_nifti import write_synthetic_nifti


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("roundtrip")
    write_synthetic(root / "phantom", cases=2, scans=1, slices=6, seed=0)
    write_synthetic_nifti(root / "ct", cases=2, slices=6, seed=0)
    return root


def _round_trip(root, name: str, size: int) -> dict[str, dict[str, float]]:
    """Per class, the Dice (pooled over slices) against the source label of: ``export``, the
    cached binary mask restored as ``advseg export`` does; ``coverage``, each model pixel's
    share of the class (the source label area-averaged onto the same grid, as the image is)
    restored the same way (bilinear or area back, kept where >= 0.5)."""
    config = PreprocessConfig(size=size)
    data = load_data(DataConfig(path=root / name, cache_dir=root / "cache", preprocess=config))
    classes = list(data.classes)
    sums = {kind: np.zeros((2, len(classes))) for kind in ("export", "coverage")}
    for row in range(len(data.index)):
        meta = data.index.iloc[row]
        h, w = int(meta["height"]), int(meta["width"])
        label = np.stack([rle_decode(meta[c], h, w) for c in classes]) > 0
        if label.sum() == 0:
            continue
        geometry = data.geometry.iloc[row]
        fh, fw = fitted_size(h, w, size, config.resize)
        how = cv2.INTER_AREA if fh * fw < h * w else cv2.INTER_LINEAR
        coverage = np.stack([fit_square(m.astype(np.float32), size, config.resize, how)
                             for m in label])  # fmt: skip
        back = {
            "export": restore_slice(data.masks[row] > 0, geometry, h, w),
            "coverage": restore_slice(coverage, geometry, h, w) >= 0.5,
        }
        for kind, mask in back.items():
            sums[kind][0] += 2 * (mask & label).sum(axis=(1, 2))
            sums[kind][1] += mask.sum(axis=(1, 2)) + label.sum(axis=(1, 2))
    return {
        kind: {c: float(o / s) for c, o, s in zip(classes, *sums[kind], strict=True) if s}
        for kind in sums
    }


@pytest.mark.parametrize("name", ["phantom", "ct"])
def test_at_64_px_the_binary_mask_is_what_limits_the_round_trip(sets, name):
    dice = _round_trip(sets, name, 64)
    assert min(dice["export"].values()) < 0.98  # the binary 64 px mask cannot carry it ...
    assert min(dice["export"].values()) > 0.9  # ... though it is aligned (0.6-0.87 before)
    assert min(dice["coverage"].values()) >= 0.98  # the same grid with coverage can


@pytest.mark.parametrize("name", ["phantom", "ct"])
def test_at_224_px_the_exported_truth_mask_is_the_source_label(sets, name):
    dice = _round_trip(sets, name, 224)
    assert dice["export"] and min(dice["export"].values()) >= 0.98, dice["export"]
