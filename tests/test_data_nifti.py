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


def _pair(root, name, image, label, image_affine, label_affine=None):
    for folder in ("imagesTr", "labelsTr"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    label_affine = image_affine if label_affine is None else label_affine
    nib.save(nib.Nifti1Image(image, image_affine), root / "imagesTr" / f"{name}.nii.gz")
    nib.save(nib.Nifti1Image(label, label_affine), root / "labelsTr" / f"{name}.nii.gz")


def _asymmetric_volume():
    rng = np.random.default_rng(3)
    image = rng.normal(100, 20, (20, 14, 4)).astype(np.float32)
    image[:4, :3] += 300  # a bright corner: a 180-degree turn would move it
    label = np.zeros((20, 14, 4), np.uint8)
    label[1:6, 2:5, 1:3] = 1
    label[12:18, 8:12, 2] = 2
    return image, label


def test_an_lps_volume_gives_the_same_slices_as_the_ras_one(tmp_path):
    image, label = _asymmetric_volume()
    ras = np.diag([0.8, 0.9, 3.0, 1.0])
    ras[:3, 3] = (-7.6, -5.85, 0.0)
    lps = np.diag([-0.8, -0.9, 3.0, 1.0])  # x and y run the other way: the arrays are flipped
    lps[:3, 3] = (7.6, 5.85, 0.0)  # same world position of every voxel
    _pair(tmp_path / "ras", "vol_001", image, label, ras)
    _pair(tmp_path / "lps", "vol_001", image[::-1, ::-1].copy(), label[::-1, ::-1].copy(), lps)
    loaded = {}
    for name in ("ras", "lps"):
        config = DataConfig(
            path=tmp_path / name,
            nifti_labels={"1": "liver", "2": "spleen"},
            cache_dir=tmp_path / f"cache-{name}",
            preprocess=PreprocessConfig(size=16),
        )
        loaded[name] = load_data(config)
    ras_data, lps_data = loaded["ras"], loaded["lps"]
    columns = ["id", "width", "height", "spacing_w", "spacing_h", "liver", "spleen"]
    assert ras_data.index[columns].equals(lps_data.index[columns])
    np.testing.assert_array_equal(ras_data.images, lps_data.images)
    np.testing.assert_array_equal(ras_data.masks, lps_data.masks)
    # and the stored-as-RAS arrays were not flipped: the bright corner is at the top left
    top, height = ras_data.geometry.loc[0, ["top", "fitted_h"]]  # rows of padding above
    first, last = ras_data.images[0, top : top + 2, :3], ras_data.images[0, top + height - 3, -3:]
    assert first.mean() > 2 * last.mean()


def test_canonical_geometry_from_the_header_equals_nibabels_reorientation(tmp_path):
    from advseg.data.nifti import canonical_geometry

    affine = np.array([[0, -0.9, 0, 10], [0, 0, 3.0, 5], [-0.8, 0, 0, 2], [0, 0, 0, 1.0]])
    path = tmp_path / "oblique.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((5, 4, 3), np.int16), affine), path)
    shape, canonical_affine = canonical_geometry(path)
    reoriented = nib.as_closest_canonical(nib.load(path))
    assert shape == reoriented.shape == (4, 3, 5)
    np.testing.assert_allclose(canonical_affine, reoriented.affine)


def test_an_image_and_label_with_other_affines_are_refused_naming_both(tmp_path):
    image, label = _asymmetric_volume()
    shifted = np.diag([0.8, 0.9, 3.0, 1.0])
    shifted[0, 3] = 2.0  # the label sits 2 mm to the side
    _pair(tmp_path, "vol_001", image, label, np.diag([0.8, 0.9, 3.0, 1.0]), shifted)
    with pytest.raises(UserError) as err:
        read_nifti(tmp_path, {1: "liver", 2: "spleen"})
    message = str(err.value)
    assert "labelsTr/vol_001.nii.gz" in message and "imagesTr/vol_001.nii.gz" in message
    assert "affine differs" in message and "\n" not in message
    # within the tolerance (float rounding of a real header) is accepted
    nudged = np.diag([0.8, 0.9, 3.0, 1.0])
    nudged[0, 3] = 1e-5
    _pair(tmp_path, "vol_001", image, label, np.diag([0.8, 0.9, 3.0, 1.0]), nudged)
    assert len(read_nifti(tmp_path, {1: "liver", 2: "spleen"})[0]) == 4


def test_unmapped_label_values_are_counted_warned_and_refused_when_strict(tmp_path):
    from advseg.errors import AdvsegWarning

    image, label = _asymmetric_volume()
    label[0, 0, 0] = 7
    label[0, 1, 0:2] = 9
    affine = np.diag([0.8, 0.9, 3.0, 1.0])
    _pair(tmp_path, "vol_001", image, label, affine)
    _pair(tmp_path, "vol_002", image, np.where(label == 9, 0, label).astype(np.uint8), affine)
    counts = r"2 \(48 voxels\), 7 \(2 voxels\), 9 \(2 voxels\), in 2 volumes"
    with pytest.warns(AdvsegWarning, match=counts):
        _, exclusions = read_nifti(tmp_path, {1: "liver"})
    assert exclusions.unmapped == {2: 48, 7: 2, 9: 2}  # label 2 (spleen) is unmapped here too
    assert exclusions.unmapped_volumes == ["vol_001", "vol_002"]
    assert any("made background" in line for line in exclusions.lines())
    with pytest.raises(UserError) as err:
        read_nifti(tmp_path, {1: "liver", 2: "spleen"}, strict=True)
    message = str(err.value)
    assert message.startswith(str(tmp_path / "labelsTr" / "vol_001.nii.gz"))
    assert "7 (1 voxel), 9 (2 voxels)" in message and "--strict-labels" in message
    assert "\n" not in message
    _, clean = read_nifti(tmp_path, {1: "liver", 2: "spleen", 7: "a", 9: "b"}, strict=True)
    assert clean.unmapped == {}


def test_labels_are_refused_for_kaggle_data(tmp_path):
    from advseg.data import build_index, write_synthetic

    write_synthetic(tmp_path / "mri", cases=1, scans=1, slices=2)
    config = DataConfig(path=tmp_path / "mri", nifti_labels={"1": "liver"})
    with pytest.raises(UserError, match="NIfTI data only"):
        build_index(config)
