import pandas as pd
import pytest

from advseg.errors import UserError
from advseg.runs.records import RECORD_COLUMNS, read_records, write_records


def _frame(n: int = 3, first: int = 1) -> pd.DataFrame:
    rows = []
    for i in range(first, first + n):
        row = {c: 0 for c in RECORD_COLUMNS}
        row.update(model="m", source="m", arch="unet", attack="fgsm", loss="bce", slice=i)
        row.update(slice_id=f"case1_day0_slice_{i:04d}", scan="case1_day0", dice_clean=0.9)
        row.update({"class": "stomach", "dice_adv": 0.5})
        rows.append(row)
    return pd.DataFrame(rows)


def test_write_then_read_a_run_directory(tmp_path):
    write_records(_frame(2), tmp_path / "records" / "a.parquet")
    write_records(_frame(3, first=3), tmp_path / "records" / "b.parquet")
    frame = read_records(tmp_path)
    assert len(frame) == 5
    assert list(frame.columns) == list(RECORD_COLUMNS)
    assert frame["dice_adv"].dtype == "float64"
    assert not list((tmp_path / "records").glob(".*"))  # no temporary file left behind


def test_missing_column_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(UserError, match="missing record columns: dice_adv"):
        write_records(_frame().drop(columns=["dice_adv"]), tmp_path / "x.parquet")
    assert not list(tmp_path.iterdir())


def test_broken_files_are_named(tmp_path):
    with pytest.raises(UserError, match="no records"):
        read_records(tmp_path)
    good = write_records(_frame(), tmp_path / "records" / "good.parquet")
    (tmp_path / "records" / "half.parquet").write_bytes(good.read_bytes()[:100])
    with pytest.raises(UserError, match=r"half.parquet: not a complete Parquet records file"):
        read_records(tmp_path)
    with pytest.raises(UserError, match="no such file"):
        read_records(tmp_path / "nope")


def test_a_copied_records_file_is_refused_naming_both(tmp_path):
    write_records(_frame(2), tmp_path / "records" / "a.parquet")
    write_records(_frame(3, first=2), tmp_path / "records" / "a-copy.parquet")  # slice 2 twice
    with pytest.raises(UserError) as err:
        read_records(tmp_path)
    message = str(err.value)
    assert "a-copy.parquet and" in message and "a.parquet;" in message and "\n" not in message
    assert "slice_id=case1_day0_slice_0002" in message


def test_records_without_hd95_in_millimetres_read_as_nan(tmp_path):
    old = _frame(2).drop(columns=["hd95_mm_clean", "hd95_mm_adv"])
    old.to_parquet(tmp_path / "old.parquet", index=False)
    frame = read_records(tmp_path / "old.parquet")
    assert frame["hd95_mm_clean"].isna().all() and frame["hd95_mm_adv"].isna().all()
