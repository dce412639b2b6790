"""Volumes as data: one row per scan, canonical, spacing kept, normalised as nnU-Net, cached,
resampled, and patches with foreground oversampling (tiny synthetic sets)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from advseg.data import (
    UWMGI_SLICE_THICKNESS,
    DataConfig,
    VolumeConfig,
    load_volumes,
    write_synthetic,
    write_synthetic_nifti,
)
from advseg.data.patches import PatchDataset, crop
from advseg.errors import UserError


@pytest.fixture(scope="module")
def ct(tmp_path_factory):
    root = tmp_path_factory.mktemp("volumes")
    write_synthetic_nifti(root / "ct", cases=4, slices=20, size=(36, 28), seed=3)
    return root


def test_one_row_per_scan_canonical_and_spacing_kept(ct):
    data = load_volumes(DataConfig(path=ct / "ct", cache_dir=ct / "cache"))
    assert list(data.index["scan"]) == [f"case{i}_day0" for i in range(1, 5)]
    assert data.classes == ["liver", "spleen", "kidney_left", "kidney_right"]
    row = data.index.iloc[0]
    assert (row.depth, row.height, row.width) == (20, 28, 36)
    assert (row.spacing_d, row.spacing_h, row.spacing_w) == pytest.approx((2.5, 0.8, 0.8))
    label = np.asarray(nib.load(ct / "ct/labelsTr/abct_001.nii.gz").dataobj)  # (W, H, Z), RAS
    expected = np.transpose(label, (2, 1, 0))  # (Z, H, W): axial first
    for k in range(4):
        assert np.array_equal(data.masks[0][k], expected == k + 1)
    image, mask = data.volume(0)
    assert image.shape == (1, 20, 28, 36) and mask.shape == (4, 20, 28, 36)


def test_ct_normalisation_is_nnunets(ct):
    from nnunetv2.preprocessing.normalization.default_normalization_schemes import (
        CTNormalization,
    )

    data = load_volumes(DataConfig(path=ct / "ct", cache_dir=ct / "cache"))
    raws, labels = [], []
    for i in range(1, 5):
        raws.append(np.asarray(nib.load(ct / f"ct/imagesTr/abct_{i:03d}.nii.gz").dataobj))
        labels.append(np.asarray(nib.load(ct / f"ct/labelsTr/abct_{i:03d}.nii.gz").dataobj))
    fg = np.concatenate(
        [r[lab > 0].astype(np.float64) for r, lab in zip(raws, labels, strict=True)]
    )
    props = {
        "mean": fg.mean(), "std": fg.std(),
        "percentile_00_5": np.percentile(fg, 0.5), "percentile_99_5": np.percentile(fg, 99.5),
    }  # fmt: skip
    reference = CTNormalization(intensityproperties=props, target_dtype=np.float64)
    expected = reference.run(raws[2].astype(np.float64).copy()).transpose(2, 1, 0)
    assert np.abs(data.images[2] - expected).max() < 1e-5
    low, high = data.valid_range
    assert data.normalisation["kind"] == "ct"
    assert low == pytest.approx(expected.min()) and high == pytest.approx(expected.max())
    assert data.index["std"].iloc[0] == pytest.approx(fg.std())  # model units -> HU


def test_cache_reused_and_keyed_by_settings(ct):
    config = DataConfig(path=ct / "ct", cache_dir=ct / "cache")
    first = load_volumes(config)
    again = load_volumes(config)
    assert again.decoded == 0 and again.cache_path == first.cache_path
    mri = load_volumes(DataConfig(path=ct / "ct", cache_dir=ct / "cache",
                                  volume=VolumeConfig(modality="mri")))  # fmt: skip
    assert mri.cache_path != first.cache_path and mri.decoded == 4
    low, high = mri.valid_range  # the z-scored volumes' extremes: every volume as it is
    assert low == min(float(im.min()) for im in mri.images)
    assert high == max(float(im.max()) for im in mri.images)
    assert mri.data_range == high - low and low < -0.5 and high > 0.5
    for i in range(4):  # a z-score per volume
        assert float(mri.images[i].mean()) == pytest.approx(0.0, abs=1e-4)
        assert float(mri.images[i].std()) == pytest.approx(1.0, abs=1e-3)


def test_resampling_to_a_spacing(ct):
    config = DataConfig(path=ct / "ct", cache_dir=ct / "cache")
    base = load_volumes(config)
    config.volume = VolumeConfig(spacing=(2.0, 1.6, 1.6))
    data = load_volumes(config)
    row = data.index.iloc[1]
    assert (row.depth, row.height, row.width) == (25, 14, 18)
    assert (row.spacing_d, row.spacing_h, row.spacing_w) == pytest.approx((2.0, 1.6, 1.6))
    assert (row.source_depth, row.source_spacing_d) == (20, pytest.approx(2.5))
    low, high = data.valid_range  # trilinear: a convex combination stays in range
    assert low - 1e-5 <= data.images[1].min() and data.images[1].max() <= high + 1e-5
    for k in range(2):  # liver and spleen keep their volume in mm^3 (kidneys: too few voxels)
        before = base.masks[1][k].sum() * 2.5 * 0.8 * 0.8
        after = data.masks[1][k].sum() * 2.0 * 1.6 * 1.6
        assert after == pytest.approx(before, rel=0.15)


def test_uwmgi_scans_stacked_by_slice(tmp_path):
    write_synthetic(tmp_path / "mri", cases=2, scans=1, slices=6, seed=1)
    data = load_volumes(DataConfig(path=tmp_path / "mri", cache_dir=tmp_path / "cache"))
    assert len(data) == 2 and data.normalisation["kind"] == "mri"
    assert data.valid_range == (min(float(i.min()) for i in data.images),
                                max(float(i.max()) for i in data.images))  # fmt: skip
    assert (data.index["spacing_d"] == UWMGI_SLICE_THICKNESS).all()
    assert (data.index["depth"] == 6).all()
    from advseg.data import load_data

    slices = load_data(DataConfig(path=tmp_path / "mri", cache_dir=tmp_path / "cache"))
    first = slices.index[slices.index["scan"] == data.index["scan"].iloc[0]]
    assert list(first["slice"]) == sorted(first["slice"])
    assert float(slices.index["spacing_h"].iloc[0]) == pytest.approx(data.index["spacing_h"][0])


def test_crop_pads_with_zeros():
    array = np.arange(2 * 4 * 5 * 6).reshape(2, 4, 5, 6)
    out = crop(array, (-2, 1, 3), (6, 3, 5))
    padded = np.pad(array, ((0, 0), (2, 0), (0, 0), (0, 2)))
    assert np.array_equal(out, padded[:, 0:6, 1:4, 3:8])


def test_patches_foreground_oversampling(ct):
    data = load_volumes(DataConfig(path=ct / "ct", cache_dir=ct / "cache"))
    # the smallest class: kidney_right; a patch of 8^3 rarely holds it by chance
    only = PatchDataset(data, [0, 1], (8, 8, 8), samples=20, foreground=1.0)
    torch.manual_seed(0)
    items = [only[i] for i in range(len(only))]
    assert all(item["mask"].sum() > 0 for item in items)
    assert items[0]["image"].shape == (1, 8, 8, 8) and items[0]["mask"].shape == (4, 8, 8, 8)
    torch.manual_seed(0)
    assert torch.equal(only[0]["image"], items[0]["image"])  # torch's seed fixes the draw
    share = PatchDataset(data, [0, 1, 2, 3], (8, 8, 8), samples=150, foreground=1 / 3)
    none = PatchDataset(data, [0, 1, 2, 3], (8, 8, 8), samples=150, foreground=0.0)
    torch.manual_seed(1)
    right = [share[i]["mask"][3].sum() > 0 for i in range(len(share))]
    torch.manual_seed(1)
    base = [none[i]["mask"][3].sum() > 0 for i in range(len(none))]
    # a third centred on foreground (a quarter of those on this class): more of it than chance
    assert np.mean(right) > np.mean(base) + 0.04


def test_patch_larger_than_volume_is_padded(ct):
    data = load_volumes(DataConfig(path=ct / "ct", cache_dir=ct / "cache"))
    patches = PatchDataset(data, [0], (32, 32, 40), samples=2, foreground=0.5)
    torch.manual_seed(0)
    item = patches[0]
    assert item["image"].shape == (1, 32, 32, 40)
    assert item["mask"].sum() == pytest.approx(data.masks[0].sum())  # the whole volume inside


def test_bad_volume_settings_refused():
    with pytest.raises(UserError, match=r"data\.volume\.spacing"):
        VolumeConfig(spacing=(1.0, 0.0, 1.0))
    with pytest.raises(UserError, match=r"data\.volume\.patch"):
        VolumeConfig(patch=(4, 32, 32))
    with pytest.raises(UserError, match=r"data\.volume\.modality"):
        VolumeConfig(modality="pet")
