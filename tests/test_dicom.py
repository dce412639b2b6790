"""DICOM in and out: a small CT series and its DICOM SEG made here (pydicom, highdicom), read
like a NIfTI volume (checked against SimpleITK's reading of the series), attacked, and written
back as a series with the source's header and pixel type."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pydicom = pytest.importorskip("pydicom", reason="the dicom extra is not installed")
highdicom = pytest.importorskip("highdicom", reason="the dicom extra is not installed")

from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid  # noqa: E402

from advseg.data import DataConfig, PreprocessConfig, intensity_range, load_data  # noqa: E402
from advseg.data.dicom import (  # noqa: E402
    from_canonical,
    read_series,
    series_affine,
    series_volume,
    write_series_like,
)
from advseg.data.nifti import canonical_geometry, read_volume  # noqa: E402
from advseg.errors import UserError  # noqa: E402

ROWS, COLUMNS, SLICES = 24, 32, 5
SPACING = (0.8, 0.7)  # (between rows, between columns), mm
STEP = 2.5


def _series(folder, hu: np.ndarray) -> list[Dataset]:
    """A CT series, int16 stored values with intercept -1024, one file per slice."""
    folder.mkdir(parents=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    datasets = []
    for k in range(SLICES):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        d = Dataset()
        d.file_meta = meta
        d.SOPClassUID, d.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        d.StudyInstanceUID, d.SeriesInstanceUID, d.FrameOfReferenceUID = study, series, frame
        d.PatientID, d.PatientName, d.PatientBirthDate, d.PatientSex = "P1", "Test^Phantom", "", "O"
        d.StudyID, d.StudyDate, d.StudyTime, d.AccessionNumber = "1", "20240101", "120000", ""
        d.ReferringPhysicianName, d.Manufacturer = "", "advseg-test"
        d.Modality, d.SeriesNumber, d.InstanceNumber = "CT", 1, k + 1
        d.SeriesDescription, d.ImageType = "phantom", ["ORIGINAL", "PRIMARY", "AXIAL"]
        d.ImagePositionPatient = [-10.0, -12.0, STEP * k]
        d.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        d.PixelSpacing, d.SliceThickness = list(SPACING), STEP
        d.Rows, d.Columns, d.SamplesPerPixel = ROWS, COLUMNS, 1
        d.PhotometricInterpretation = "MONOCHROME2"
        d.BitsAllocated, d.BitsStored, d.HighBit, d.PixelRepresentation = 16, 16, 15, 1
        d.RescaleIntercept, d.RescaleSlope, d.RescaleType = -1024, 1, "HU"
        d.PixelData = (hu[k] + 1024).astype(np.int16).tobytes()
        d.save_as(folder / f"{k:03d}.dcm", enforce_file_format=True)
        datasets.append(d)
    return datasets


def _seg(path, datasets, labels: np.ndarray) -> None:
    from highdicom.sr.coding import CodedConcept
    from pydicom.sr.codedict import codes

    descriptions = [
        highdicom.seg.SegmentDescription(
            segment_number=number, segment_label=name,
            segmented_property_category=codes.SCT.Organ,
            segmented_property_type=CodedConcept(code, "SCT", name),
            algorithm_type=highdicom.seg.SegmentAlgorithmTypeValues.MANUAL,
        )
        for number, name, code in ((1, "liver", "10200004"), (2, "left kidney", "64033007"))
    ]  # fmt: skip
    seg = highdicom.seg.Segmentation(
        source_images=datasets, pixel_array=labels.astype(np.uint8),
        segmentation_type=highdicom.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=generate_uid(), series_number=2,
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer="advseg-test",
        manufacturer_model_name="test", software_versions="0", device_serial_number="0",
    )  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(path)


@pytest.fixture(scope="module")
def dicom_set(tmp_path_factory):
    """root/imagesTr/case1/ (5 slices of 24 x 32, non-square pixels) + root/labelsTr/case1.dcm."""
    root = tmp_path_factory.mktemp("dicom")
    rng = np.random.default_rng(0)
    hu = rng.integers(0, 40, (SLICES, ROWS, COLUMNS)).astype(np.int16)  # (slices, rows, columns)
    labels = np.zeros((SLICES, ROWS, COLUMNS), np.uint8)
    labels[1:4, 4:14, 3:15] = 1  # liver: toward low column (patient right) and low row (anterior)
    labels[2:4, 15:20, 22:28] = 2  # left kidney
    hu[labels == 1] += 300
    hu[labels == 2] += 150
    datasets = _series(root / "imagesTr" / "case1", hu)
    _seg(root / "labelsTr" / "case1.dcm", datasets, labels)
    return root, hu, labels


def test_a_series_reads_as_simpleitk_reads_it_and_its_seg_lies_on_it(dicom_set):
    sitk = pytest.importorskip("SimpleITK")
    root, hu, labels = dicom_set
    folder = root / "imagesTr" / "case1"
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    image = reader.Execute()
    reference = sitk.GetArrayFromImage(image)  # (slices, rows, columns), HU, LPS voxel order
    np.testing.assert_array_equal(reference, hu)
    # the affine: SimpleITK's LPS geometry with x and y flipped (RAS)
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(image.GetDirection()).reshape(3, 3) * np.asarray(image.GetSpacing())
    lps[:3, 3] = image.GetOrigin()
    np.testing.assert_allclose(series_affine(read_series(folder)), np.diag([-1, -1, 1, 1]) @ lps)
    # canonical (RAS+) slices: rows posterior -> anterior, columns left -> right, as NIfTI's
    volume = read_volume(folder)  # (H, W, Z)
    assert volume.shape == (ROWS, COLUMNS, SLICES)
    for k in range(SLICES):
        np.testing.assert_array_equal(volume[:, :, k], reference[k, ::-1, ::-1])
        np.testing.assert_array_equal(read_volume(root / "labelsTr" / "case1.dcm")[:, :, k],
                                      labels[k, ::-1, ::-1])  # fmt: skip
    shape, affine = canonical_geometry(folder)
    assert shape == (COLUMNS, ROWS, SLICES)
    np.testing.assert_allclose(np.sqrt((affine[:3, :3] ** 2).sum(axis=0)), [0.7, 0.8, STEP])


def test_the_data_layer_indexes_it_like_nifti_attack_and_write_it_back(dicom_set, tmp_path):
    from advseg.attacks import create_attack
    from advseg.data import restore_slice
    from advseg.models import create_model

    root, _, labels = dicom_set
    config = DataConfig(path=root, cache_dir=tmp_path / "cache",
                        preprocess=PreprocessConfig(size=32))  # fmt: skip
    data = load_data(config)
    assert list(data.classes) == ["liver", "left_kidney"]  # the SEG's segment labels
    assert len(data.index) == SLICES and (data.index["image_z"] >= 0).all()
    assert data.index["spacing_w"].iloc[0] == pytest.approx(0.7)
    assert data.index["spacing_h"].iloc[0] == pytest.approx(0.8)
    masks = np.asarray(data.masks)  # (N, K, S, S)
    for k in range(SLICES):  # each class's mask where the SEG put it, slice by slice
        for c in (0, 1):
            assert masks[k, c].any() == bool((labels[k] == c + 1).any())

    # attack every slice (FGSM, 8/255), and put the perturbation back on the source grid in HU
    torch.manual_seed(0)
    net = create_model("unet-tiny", classes=2).eval()
    items = [data.dataset(range(SLICES))[i] for i in range(SLICES)]
    x = torch.stack([torch.as_tensor(item["image"]) for item in items]).float()  # (N, C, S, S)
    y = torch.stack([torch.as_tensor(item["mask"]) for item in items]).float()  # (N, K, S, S)
    eps = 8 / 255
    x_adv = create_attack("fgsm", net, eps=eps)(x, y)
    source = root / "imagesTr" / "case1"
    raw = read_volume(source)  # (H, W, Z): HU, canonical
    adversarial = raw.transpose(1, 0, 2).astype(np.float32)  # (x, y, z)
    for row in range(SLICES):
        z = int(data.index["image_z"].iloc[row])
        delta = (x_adv[row] - x[row]).mean(0).numpy()  # (S, S), the channels' copies agree
        back = restore_slice(delta, data.geometry.iloc[row], ROWS, COLUMNS)
        low, high = intensity_range(raw[:, :, z], data.preprocess)
        adversarial[:, :, z] += (back * (high - low)).T
    out = tmp_path / "adversarial"
    files = write_series_like(source, from_canonical(adversarial, source), out)
    assert len(files) == SLICES

    # read back: the source's header and dtype, a new series, the written values to the unit
    originals, written = read_series(source), read_series(out)
    for before, after in zip(originals, written, strict=True):
        for key in ("PatientID", "StudyInstanceUID", "FrameOfReferenceUID", "ImagePositionPatient",
                    "PixelSpacing", "BitsAllocated", "PixelRepresentation", "RescaleIntercept",
                    "Rows", "Columns", "Modality"):  # fmt: skip
            assert after[key].value == before[key].value, key
        assert after.SeriesInstanceUID != before.SeriesInstanceUID
        assert after.SOPInstanceUID != before.SOPInstanceUID
        assert after.pixel_array.dtype == before.pixel_array.dtype == np.int16
        assert after.ImageType[0] == "DERIVED"
    again = read_volume(out).transpose(1, 0, 2)  # (x, y, z) as written
    assert np.abs(again - adversarial).max() <= 0.5 + 1e-6  # rounded to whole stored values
    moved = np.abs(again - raw.transpose(1, 0, 2))
    budget = max(intensity_range(raw[:, :, z], data.preprocess)[1] for z in range(SLICES)) * eps
    assert 0 < moved.max() <= budget + 0.5
    np.testing.assert_array_equal(series_volume(written).shape, (COLUMNS, ROWS, SLICES))


def test_a_volume_off_the_grid_and_a_broken_file_are_one_line(dicom_set, tmp_path):
    root, _, _ = dicom_set
    with pytest.raises(UserError, match="is not on this series' grid"):
        write_series_like(root / "imagesTr" / "case1", np.zeros((3, 3, 3)), tmp_path / "o")
    broken = tmp_path / "series"
    broken.mkdir()
    (broken / "x.dcm").write_text("not dicom")
    with pytest.raises(UserError, match="not a readable DICOM file"):
        read_series(broken)


@pytest.mark.slow  # an evaluate and an export: about 100 s on a busy 2-core machine
def test_advseg_export_writes_the_adversarial_series_beside_nifti(dicom_set, tmp_path):
    """evaluate a checkpoint on the DICOM set, export a cell: a DICOM series of the source's
    dtype whose voxels moved by at most eps times each slice's intensity range."""
    from advseg.config import to_dict
    from advseg.evaluate import EvaluateConfig, evaluate
    from advseg.export import export_cell
    from advseg.models import create_model
    from advseg.models.checkpoint import metadata_for, save_checkpoint

    root, _, _ = dicom_set
    torch.manual_seed(0)
    net = create_model("unet-tiny", classes=2)
    source = {"config": {"path": str(root), "cache_dir": str(tmp_path / "cache")}}
    meta = metadata_for(net, ["liver", "left_kidney"], data=source,
                        preprocessing=to_dict(PreprocessConfig(size=32)))  # fmt: skip
    save_checkpoint(tmp_path / "tiny", net, meta)
    eps = 0.03
    evaluate(EvaluateConfig(checkpoints=[tmp_path / "tiny"], out=tmp_path / "run", split="all",
                            attacks=["fgsm"], losses=["bce"], eps=[eps], device="cpu"))  # fmt: skip
    result = export_cell(tmp_path / "run", count=2, device="cpu")
    written = sorted((result.out / "dicom").glob("*/*.dcm"))
    assert len(written) == SLICES
    folder = written[0].parent
    originals, exported = read_series(root / "imagesTr" / "case1"), read_series(folder)
    assert [d.pixel_array.dtype for d in exported] == [np.dtype(np.int16)] * SLICES
    assert exported[0].PatientID == originals[0].PatientID
    moved = np.abs(series_volume(exported) - series_volume(originals))
    changed = [k for k in range(SLICES) if moved[:, :, k].any()]
    assert len(changed) == 2  # the two exported slices, the others as they were
    raw = read_volume(root / "imagesTr" / "case1")
    for k in changed:  # axial order is kept: series slice k is canonical z = k
        low, high = intensity_range(raw[:, :, k], PreprocessConfig(size=32))
        assert moved[:, :, k].max() <= eps * (high - low) + 0.5
