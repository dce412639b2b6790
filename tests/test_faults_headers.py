"""Sizes from headers before decoding (issue 25): a PNG declaring 40000 x 40000 pixels, a NIfTI
declaring terabytes, a JPEG named .png and complex voxels are refused in one line, unread."""

from __future__ import annotations

import gzip
import re
import struct
import zlib

import cv2
import nibabel as nib
import numpy as np
import pytest

from advseg.data import read_nifti, read_png
from advseg.data.nifti import read_volume
from advseg.errors import UserError
from data_corpus import nifti_pair


def _png_header(path, width: int, height: int) -> None:
    """A PNG whose IHDR declares ``width`` x ``height`` (16-bit grey), then an empty IDAT: what
    a decompression bomb shows before its pixels are inflated."""
    ihdr = struct.pack(">IIBBBBB", width, height, 16, 0, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr
    chunk += struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    idat = zlib.compress(b"\0" * 1024)
    body = struct.pack(">I", len(idat)) + b"IDAT" + idat + struct.pack(">I", zlib.crc32(b"IDAT"))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk + body + b"\0\0\0\0IEND\xaeB`\x82")


def test_a_png_declaring_40000_squared_pixels_is_refused_before_decoding(tmp_path):
    path = tmp_path / "slice_0001_40000_40000_1.50_1.50.png"
    _png_header(path, 40000, 40000)
    with pytest.raises(UserError, match=r"declares 40000x40000 pixels, more than 67,108,864; "
                                        r"refused before decoding"):  # fmt: skip
        read_png(path, 40000, 40000)


def test_a_png_whose_header_contradicts_its_name_is_refused_before_decoding(tmp_path):
    path = tmp_path / "slice_0001_266_266_1.50_1.50.png"
    _png_header(path, 40000, 40000)
    with pytest.raises(UserError, match=r"image is 40000x40000 \(WxH\) but its file name says "
                                        r"266x266"):  # fmt: skip
        read_png(path, 266, 266)


def test_a_jpeg_named_png_is_refused(tmp_path):
    path = tmp_path / "slice_0001_32_32_1.50_1.50.png"
    path.write_bytes(cv2.imencode(".jpg", np.full((32, 32), 90, np.uint8))[1].tobytes())
    with pytest.raises(UserError, match=r"not a PNG: a JPEG, lossy, named .png"):
        read_png(path, 32, 32)


def test_a_real_png_is_still_read(tmp_path):
    path = tmp_path / "slice_0001_7_5_1.50_1.50.png"
    pixels = np.arange(35, dtype=np.uint16).reshape(5, 7) * 100
    path.write_bytes(cv2.imencode(".png", pixels)[1].tobytes())
    assert np.array_equal(read_png(path, 7, 5), pixels)


def test_a_nifti_declaring_terabytes_is_refused_before_decoding(tmp_path):
    path = tmp_path / "bomb.nii.gz"
    image = nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4))
    image.header.set_data_shape((30000, 30000, 600))  # NIfTI-1 dims are int16
    header = image.header.binaryblock + b"\0" * 4  # the header, the extension flag, no voxels
    with gzip.open(path, "wb") as handle:
        handle.write(header)
    with pytest.raises(UserError, match=r"bomb.nii.gz: its header declares 30000x30000x600 voxels"
                                        r" of float32 \(2011.7 GiB decoded"):  # fmt: skip
        read_volume(path)


def test_complex_voxels_are_refused(tmp_path):
    image = (np.random.default_rng(0).random((8, 6, 3)) + 1j).astype(np.complex64)
    label = np.zeros((8, 6, 3), np.uint8)
    root = nifti_pair(tmp_path, image, label)
    with pytest.raises(UserError, match=r"voxels are complex numbers \(complex64\)"):
        read_nifti(root, {1: "organ"})


@pytest.mark.parametrize(("value", "said"), [(-1, "e.g. -1"), (1e20, "e.g. 1e+20")])
def test_labels_that_are_no_class_number_are_refused(tmp_path, value, said):
    image = np.random.default_rng(0).random((8, 6, 3)).astype(np.float32)
    label = np.zeros((8, 6, 3), np.float32)
    label[1, 1, 1] = value
    root = nifti_pair(tmp_path, image, label)
    said = f"vol_001.nii.gz: 1 voxels hold labels outside 0..65535 ({said}); labels are class"
    with pytest.raises(UserError, match=re.escape(said)):
        read_nifti(root, {1: "organ"})


@pytest.mark.parametrize(
    ("bad_id", "said"),
    [
        (
            "case" + "9" * 30 + "_day0_slice_0001",
            "case, day and slice numbers have at most 9 digits",
        ),
        ("case1_day0_slice_0001\n", "holds white space"),
    ],
)
def test_kaggle_ids_that_are_no_ids_are_one_line(tmp_path, bad_id, said):
    import pandas as pd

    from advseg.data import read_uwmgi

    root = tmp_path / "k"
    (root / "train").mkdir(parents=True)
    rows = [{"id": bad_id, "class": "stomach", "segmentation": ""}]
    pd.DataFrame(rows).to_csv(root / "train.csv", index=False)
    with pytest.raises(UserError, match=re.escape(f"train.csv line 2: id {bad_id!r}")) as err:
        read_uwmgi(root)
    assert said in str(err.value)


def test_dataset_json_names_that_sanitise_alike_are_refused(tmp_path):
    import json

    from advseg.data import dataset_json_labels

    labels = {"0": "background", "1": "left kidney", "2": "left-kidney"}
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": labels}))
    with pytest.raises(UserError, match="labels 'left kidney' and 'left-kidney' both become class "
                                        "'left_kidney'; rename one"):  # fmt: skip
        dataset_json_labels(tmp_path)
    regions = {"background": 0, "kidney": [1, 2]}  # nnU-Net regions: one name, two values
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": regions}))
    assert dataset_json_labels(tmp_path) == {1: "kidney", 2: "kidney"}


def _peak_mib(call) -> float:
    """Peak Python/numpy allocation while ``call`` runs, in MiB (numpy reports to tracemalloc)."""
    import tracemalloc

    tracemalloc.start()
    try:
        call()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak / 2**20


def test_a_gzip_bomb_under_the_size_limit_is_refused_by_the_memory_it_needs(tmp_path, monkeypatch):
    """A label of zeros declaring 256**3 voxels gzips to a few hundred KB; with less memory
    available than its decoding needs it is one line before any voxel is decoded."""
    zeros = np.zeros((256, 256, 256), np.uint8)
    root = nifti_pair(tmp_path, zeros, zeros)
    label = root / "labelsTr" / "vol_001.nii.gz"
    assert label.stat().st_size < 2**20  # a few hundred KB declaring 16 MiB
    monkeypatch.setattr("advseg.data.nifti.available_memory", lambda: 8 * 2**20)

    def read():
        with pytest.raises(UserError, match=re.escape(
            f"{label}: decoding it needs about 0.03 GiB (its header declares 256x256x256 voxels "
            "of uint8), more than the 0.01 GiB of memory available now; refused before decoding"
        )):  # fmt: skip
            read_nifti(root, {1: "organ"})

    assert _peak_mib(read) < 8  # nothing of its 16 MiB decoded


def test_a_label_whose_header_differs_from_its_image_is_refused_before_decoding(tmp_path):
    root = nifti_pair(tmp_path, np.zeros((8, 6, 4), np.float32), np.zeros((8, 6, 4), np.uint8))
    label = root / "labelsTr" / "vol_001.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((256, 256, 256), np.uint8), np.eye(4)), label)

    def read():
        with pytest.raises(UserError, match=r"shape \(256, 256, 256\) differs from its image "
                                            r".* \(8, 6, 4\)"):  # fmt: skip
            read_nifti(root, {1: "organ"})

    assert _peak_mib(read) < 8  # refused from the two headers


def test_out_of_memory_while_decoding_is_one_line(tmp_path, monkeypatch):
    root = nifti_pair(tmp_path, np.zeros((8, 6, 4), np.float32), np.zeros((8, 6, 4), np.uint8))

    def no_memory(self, *args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(nib.arrayproxy.ArrayProxy, "__array__", no_memory)
    with pytest.raises(UserError, match=r"vol_001.nii.gz: out of memory while decoding"):
        read_volume(root / "labelsTr" / "vol_001.nii.gz")


def test_label_values_checked_in_chunks_still_count_them_all(tmp_path):
    """The value checks run a few slices at a time: the count covers every chunk."""
    from advseg.data.nifti import _check_label_values, label_counts

    label = np.zeros((4, 4, 10), np.float32)
    label[0, 0, 1], label[1, 1, 9] = 0.5, 2.5
    with pytest.raises(UserError, match=r"2 voxels hold non-integer labels \(e.g. 0.5\)"):
        _check_label_values(tmp_path / "l.nii.gz", label, chunk=16)
    label = np.zeros((4, 4, 10), np.int32)
    label[0, 0, 1], label[1, 1, 9], label[2, 2, 5] = -1, 70000, 3
    with pytest.raises(UserError, match=r"2 voxels hold labels outside 0..65535 \(e.g. -1\)"):
        _check_label_values(tmp_path / "l.nii.gz", label, chunk=16)
    assert label_counts(label, chunk=16) == label_counts(label, chunk=2**24) == {
        -1: 1, 0: 157, 3: 1, 70000: 1}  # fmt: skip
