"""NIfTI volumes (nnU-Net / MSD layout) written here with nibabel, then indexed and loaded."""

import json

import nibabel as nib
import numpy as np
import pytest

from advseg.data import DataConfig, PreprocessConfig, load_data, parse_label_map, read_nifti
from advseg.errors import UserError


def _write(root, name, image, label, image_suffix=""):
    for folder in ("imagesTr", "labelsTr"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    affine = np.diag([0.8, 0.9, 3.0, 1.0])
    nib.save(nib.Nifti1Image(image, affine), root / "imagesTr" / f"{name}{image_suffix}.nii.gz")
    nib.save(nib.Nifti1Image(label, affine), root / "labelsTr" / f"{name}.nii.gz")


@pytest.fixture
def volumes(tmp_path):
    rng = np.random.default_rng(0)
    x, y, z = 20, 14, 5  # non-square in-plane
    for number in (3, 11):
        image = rng.normal(100, 20, (x, y, z)).astype(np.float32)
        label = np.zeros((x, y, z), np.uint8)
        label[2:8, 3:6, 1:4] = 1
        label[10:15, 4:10, 2] = 2
        label[12:14, 5:7, 2] = 3  # also "tumour", inside the kidney box
        _write(tmp_path, f"kid_{number:03d}", image, label, image_suffix="_0000")
    return tmp_path


def test_index_rows_are_axial_slices_with_mapped_classes(volumes):
    index, exclusions = read_nifti(volumes, {1: "kidney", 2: "tumour", 3: "tumour"})
    assert index.attrs["classes"] == ["kidney", "tumour"]
    assert len(index) == 10 and sorted(index["case"].unique()) == [3, 11]
    row = index[(index["case"] == 3) & (index["image_z"] == 2)].iloc[0]
    assert row["id"] == "case3_day0_slice_0003" and row["scan"] == "case3_day0"
    assert (row["width"], row["height"]) == (20, 14)  # width = first voxel axis
    assert (row["spacing_w"], row["spacing_h"]) == pytest.approx((0.8, 0.9))
    assert row["kidney"] and row["tumour"]
    assert index[index["image_z"] == 0]["kidney"].eq("").all()
    assert exclusions.unlabelled == 0


def test_loaded_masks_match_the_label_volume(volumes, tmp_path):
    cfg = DataConfig(
        path=volumes,
        nifti_labels={"1": "kidney", "2": "tumour", "3": "tumour"},
        cache_dir=tmp_path / "cache",
        preprocess=PreprocessConfig(size=16),
    )
    data = load_data(cfg)
    assert data.images.shape == (10, 16, 16) and data.decoded == 10
    row = int(np.flatnonzero((data.index["case"] == 3) & (data.index["image_z"] == 2))[0])
    tumour = data.masks[row, 1]
    kidney = data.masks[row, 0]
    assert tumour.sum() > 0 and kidney.sum() > 0
    # kidney box: x 2..8 of 20 -> columns, y 3..6 of 14 -> rows
    cols = np.flatnonzero(kidney.any(axis=0))
    assert cols[0] <= 2 * 16 / 20 + 1 and cols[-1] >= 7 * 16 / 20 - 1
    assert data.images.min() >= 0 and data.images.max() <= 1


def test_label_map_from_json_and_text(tmp_path):
    path = tmp_path / "labels.json"
    path.write_text(json.dumps({"1": "liver", "2": "tumour"}))
    assert parse_label_map(path) == {1: "liver", 2: "tumour"}
    assert parse_label_map("1=liver, 2=tumour") == {1: "liver", 2: "tumour"}
    with pytest.raises(UserError, match="'x' is not an integer"):
        parse_label_map({"x": "liver"})
    with pytest.raises(UserError, match="not VALUE=NAME"):
        parse_label_map("liver")
    with pytest.raises(UserError, match="label 0 is the background"):
        parse_label_map("0=bg")


def test_label_shape_mismatch_names_both_files(tmp_path):
    _write(tmp_path, "vol_001", np.zeros((8, 8, 4), np.float32), np.zeros((8, 8, 5), np.uint8))
    with pytest.raises(UserError, match=r"labelsTr/vol_001\.nii\.gz: shape \(8, 8, 5\) differs"):
        read_nifti(tmp_path, {1: "organ"})


def test_cli_info_reads_a_json_label_mapping(volumes, tmp_path, capsys):
    from advseg.cli import main

    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"1": "kidney", "2": "tumour", "3": "tumour"}))
    with pytest.raises(SystemExit) as exit_info:
        main(["data", "info", str(volumes), "--labels", str(labels)])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "kidney, tumour" in out and "20x14: 10" in out
