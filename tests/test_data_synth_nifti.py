"""The second synthetic data set: CT volumes in the Decathlon layout, read with no --labels."""

import json

import nibabel as nib
import numpy as np
import pytest

from advseg.data import (
    NIFTI_LABELS,
    DataConfig,
    PreprocessConfig,
    dataset_json_labels,
    load_data,
    read_nifti,
    write_synthetic_nifti,
)
from advseg.errors import UserError


@pytest.fixture(scope="module")
def ct(tmp_path_factory):
    root = tmp_path_factory.mktemp("ct") / "abct"
    write_synthetic_nifti(root, cases=3, slices=12, size=(48, 40), seed=1)
    return root


def test_volumes_are_ct_in_hounsfield_units_with_four_organs(ct):
    image = nib.load(ct / "imagesTr" / "abct_001.nii.gz")
    label = np.asanyarray(nib.load(ct / "labelsTr" / "abct_001.nii.gz").dataobj)
    voxels = np.asanyarray(image.dataobj)
    assert voxels.dtype == np.int16 and image.shape == (48, 40, 12) == label.shape
    assert voxels.min() < -900 and voxels.max() > 500  # air and bone
    assert set(np.unique(label)) == {0, 1, 2, 3, 4}
    assert image.header.get_zooms() == pytest.approx((0.8, 0.8, 2.5))
    organ = voxels[label == 1].mean()
    assert 0 < organ < 150  # soft tissue: low contrast against its surroundings
    assert not label[:, :, 0].any() or not label[:, :, -1].any()  # organ-free ends


def test_same_seed_same_voxels_other_seed_differs(tmp_path):
    a = write_synthetic_nifti(tmp_path / "a", cases=1, slices=6, size=(32, 32), seed=3).path
    b = write_synthetic_nifti(tmp_path / "b", cases=1, slices=6, size=(32, 32), seed=3).path
    c = write_synthetic_nifti(tmp_path / "c", cases=1, slices=6, size=(32, 32), seed=4).path

    def voxels(root):
        return np.asanyarray(nib.load(root / "imagesTr" / "abct_001.nii.gz").dataobj)

    assert np.array_equal(voxels(a), voxels(b))
    assert not np.array_equal(voxels(a), voxels(c))


def test_dataset_json_gives_the_label_map(ct):
    assert dataset_json_labels(ct) == NIFTI_LABELS
    assert json.loads((ct / "dataset.json").read_text())["numTraining"] == 3


def test_nnunet_v2_labels_form(tmp_path):
    labels = {"background": 0, "left kidney": 1, "tumour": [2, 3]}
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": labels}))
    assert dataset_json_labels(tmp_path) == {1: "left_kidney", 2: "tumour", 3: "tumour"}


def test_dataset_json_without_labels_is_one_clear_error(tmp_path):
    (tmp_path / "dataset.json").write_text(json.dumps({"name": "x"}))
    with pytest.raises(UserError, match=r"dataset.json: has no 'labels'"):
        dataset_json_labels(tmp_path)
    assert dataset_json_labels(tmp_path / "nowhere") is None


def test_loads_without_a_label_mapping(ct, tmp_path):
    data = load_data(
        DataConfig(path=ct, cache_dir=tmp_path / "cache", preprocess=PreprocessConfig(size=32))
    )
    assert data.classes == list(NIFTI_LABELS.values())
    assert data.images.shape == (36, 32, 32)
    index, _ = read_nifti(ct, NIFTI_LABELS)
    assert set(zip(index["width"], index["height"], strict=True)) == {(48, 40)}
    liver = data.masks[:, 0].reshape(36, -1).any(axis=1)
    assert 0 < liver.sum() < 36  # some slices show the liver, some do not


def test_refuses_a_non_empty_directory_and_leaves_no_debris(tmp_path):
    out = tmp_path / "ct"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="exists and is not empty"):
        write_synthetic_nifti(out, cases=1, slices=4, size=(32, 32))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct"]


def test_cli_writes_the_nifti_kind(tmp_path, capsys):
    from advseg.cli import main

    argv = ["data", "synth", "--kind", "nifti", "--out", str(tmp_path / "v"), "--cases", "1"]
    with pytest.raises(SystemExit) as done:
        main([*argv, "--slices", "4"])
    assert done.value.code == 0
    assert "1 CT volumes" in capsys.readouterr().out
    assert (tmp_path / "v" / "dataset.json").is_file()
    with pytest.raises(SystemExit) as done:
        main(["data", "synth", "--kind", "xray", "--out", str(tmp_path / "w")])
    assert done.value.code == 2 and "--kind: 'xray'" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


def test_non_square_ct_is_padded_by_default_and_hd95_spacing_is_recorded(ct, tmp_path):
    from advseg.data import saved_preprocess

    pad = load_data(
        DataConfig(path=ct, cache_dir=tmp_path / "cache", preprocess=PreprocessConfig(size=32))
    )
    # 48 x 40 (W x H) at 0.8 mm: 32 x 27 in the array, 2 rows of padding above, 3 below
    assert pad.geometry.iloc[0][["top", "left", "fitted_h", "fitted_w"]].tolist() == [2, 0, 27, 32]
    assert (pad.masks[:, :, :2] == 0).all() and (pad.masks[:, :, 29:] == 0).all()
    pad_rows = np.flatnonzero(pad.images.max(axis=(0, 2)) > 0)  # rows the body reaches
    assert pad_rows.min() >= 2 and pad_rows.max() < 29
    assert pad.geometry["mm_w"].iloc[0] == pytest.approx(0.8 * 48 / 32)
    assert pad.geometry["mm_h"].iloc[0] == pytest.approx(0.8 * 40 / 27)
    stretch_config = PreprocessConfig(size=32, resize="stretch")
    stretch = load_data(
        DataConfig(path=ct, cache_dir=tmp_path / "cache", preprocess=stretch_config)
    )
    assert stretch.cache_path != pad.cache_path  # the setting is part of the cache key
    stretch_rows = np.flatnonzero(stretch.images.max(axis=(0, 2)) > 0)
    assert len(stretch_rows) > len(pad_rows) + 2  # stretched: the body is taller
    assert stretch.geometry["mm_h"].iloc[0] == pytest.approx(0.8 * 40 / 32)
    # a checkpoint saved before the setting existed was trained on stretched slices
    assert saved_preprocess({"size": 32}, "old").resize == "stretch"
    assert saved_preprocess({"size": 32, "resize": "pad"}, "new").resize == "pad"
