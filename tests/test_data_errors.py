"""The corpus of broken inputs: each is answered with one line naming the file or row.

Every case goes through the CLI (``advseg data info [--check]``): exit code 2, one line on
stderr, no traceback.
"""

import shutil

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from advseg.cli import main
from data_corpus import copy_of, edit_csv, first_png, tiny_synthetic


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return tiny_synthetic(tmp_path_factory.mktemp("errors"), cases=1, scans=1, slices=4)


def _fails(argv, capfd):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    out, err = capfd.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err + out
    return lines[0]


def _no_csv(root):
    (root / "train.csv").unlink()
    return "train.csv", "no train.csv"


def _wrong_columns(root):
    table = pd.read_csv(root / "train.csv", dtype=str, keep_default_na=False)
    table.rename(columns={"segmentation": "rle"}).to_csv(root / "train.csv", index=False)
    return "train.csv", "missing column(s) segmentation"


def _bad_id(root):
    edit_csv(root, 4, "id", "case1_dayX_slice_0002")
    return "train.csv line 6", "id 'case1_dayX_slice_0002' does not match"


def _missing_png(root):
    first_png(root).unlink()
    return "train.csv line 2", f"no image for case1_day{_day(root)}_slice_0001"


def _empty_rows(root):
    (root / "train.csv").write_text("id,class,segmentation\n")
    return "train.csv", "no rows (empty data set)"


def _empty_file(root):
    (root / "train.csv").write_text("")
    return "train.csv", "empty file"


def _everything_excluded(root):
    return "train.csv", "empty data set after exclusions"


def _day(root):
    return next((root / "train" / "case1").iterdir()).name.split("day")[1]


def _misspelt_class(root):
    table = pd.read_csv(root / "train.csv", dtype=str, keep_default_na=False)
    table["class"] = table["class"].replace("stomach", "stomack")  # in every row: a 4th class
    table.to_csv(root / "train.csv", index=False)
    return "train.csv line 4", "class 'stomack' is not one of large_bowel, small_bowel, stomach"


def _class_row_missing(root):
    edit_csv(root, 3, "class", "liver")  # slice 2's large_bowel row now names another class
    return "train.csv line 5", "class 'liver' has rows for 1 of 4 slices"


BROKEN_INDEX = {
    "no train.csv": (_no_csv, []),
    "wrong columns": (_wrong_columns, []),
    "id does not parse": (_bad_id, []),
    "missing png": (_missing_png, []),
    "header only": (_empty_rows, []),
    "empty file": (_empty_file, []),
    "all excluded": (_everything_excluded, ["--exclude", "case1_day{day}"]),
    "misspelt class": (_misspelt_class, []),
    "a slice without a row for a class": (_class_row_missing, []),
}


@pytest.mark.parametrize("case", list(BROKEN_INDEX))
def test_broken_index_one_line(case, synth, tmp_path, capfd):
    root = copy_of(synth, tmp_path / "d")
    breaker, extra = BROKEN_INDEX[case]
    extra = [a.format(day=_day(root)) for a in extra]
    where, what = breaker(root)
    line = _fails(["data", "info", str(root), *extra], capfd)
    assert where in line and what in line


def _truncated_png(root):
    png = first_png(root)
    png.write_bytes(png.read_bytes()[:300])
    return png.name, "cannot decode image (truncated or not a PNG)"


def _truncated_in_the_data(root):
    png = first_png(root)
    data = png.read_bytes()
    png.write_bytes(data[: len(data) * 9 // 10])  # libpng would print its own line here
    return png.name, "cannot decode image (truncated or not a PNG"


def _not_a_png(root):
    first_png(root).write_text("hello")
    return first_png(root).name, "cannot decode image"


def _size_mismatch(root):
    png = first_png(root)
    png.rename(png.with_name(png.name.replace("_266_266_", "_200_266_")))
    return "_200_266_", "image is 266x266 (WxH) but its file name says 200x266"


def _rle(value, message):
    def breaker(root):
        edit_csv(root, 7, "segmentation", value)  # slice 3, small_bowel
        return f"train.csv: case1_day{_day(root)}_slice_0003, small_bowel", message

    return breaker


BROKEN_SLICE = {
    "truncated png": _truncated_png,
    "not a png": _not_a_png,
    "size differs from file name": _size_mismatch,
    "rle odd fields": _rle("1 2 3", "odd number of fields (3)"),
    "rle non-integer": _rle("1 2 x 4", "'x' is not an integer"),
    "rle past the end": _rle("70000 758", "past the image end (266x266 = 70756 pixels)"),
    "rle overlapping": _rle("10 5 12 3", "overlap or are out of order"),
    "truncated png data": _truncated_in_the_data,
    "rle int64 overflow": _rle(
        "100 9223372036854775800", "RLE value 9223372036854775800 is out of range"
    ),
    "rle huge": _rle("100 99999999999999999999", "RLE value 99999999999999999999 is out of"),
    "rle beyond the image": _rle(
        "100 900000000000000000", "RLE run 100 900000000000000000 lies past the image end"
    ),
}


@pytest.mark.parametrize("case", list(BROKEN_SLICE))
def test_broken_slice_one_line_or_skipped_and_counted(case, synth, tmp_path, capfd):
    root = copy_of(synth, tmp_path / "d")
    where, what = BROKEN_SLICE[case](root)
    line = _fails(["data", "info", str(root), "--check", "--size", "16"], capfd)
    assert where in line and what in line
    with pytest.raises(SystemExit) as exit_info:
        main(["data", "info", str(root), "--check", "--size", "16", "--skip-unreadable"])
    assert exit_info.value.code == 0
    out = capfd.readouterr().out
    assert "skipped unreadable slices: 1" in out and "│ slices        │ 3 " in out


def test_nifti_label_shape_differs(tmp_path, capfd):
    for folder in ("imagesTr", "labelsTr"):
        (tmp_path / folder).mkdir()
    nib.save(
        nib.Nifti1Image(np.zeros((6, 6, 3), np.float32), np.eye(4)),
        tmp_path / "imagesTr" / "v_1.nii.gz",
    )
    nib.save(
        nib.Nifti1Image(np.zeros((6, 7, 3), np.uint8), np.eye(4)),
        tmp_path / "labelsTr" / "v_1.nii.gz",
    )
    line = _fails(["data", "info", str(tmp_path), "--labels", "1=organ"], capfd)
    assert "labelsTr/v_1.nii.gz: shape (6, 7, 3) differs from its image" in line


def test_nifti_without_label_mapping(tmp_path, capfd):
    (tmp_path / "imagesTr").mkdir()
    line = _fails(["data", "info", str(tmp_path)], capfd)
    assert "needs a label mapping" in line


def test_not_a_data_directory(tmp_path, capfd):
    shutil.rmtree(tmp_path)
    line = _fails(["data", "info", str(tmp_path)], capfd)
    assert str(tmp_path) in line and "no such data directory" in line
