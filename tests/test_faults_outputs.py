"""Output faults are one line, and a refusal leaves nothing behind (issue 25): empty and
non-UTF-8 arguments, ``--overwrite`` over a user's own directory, a full disk while writing a
synthetic set, a cache entry or a report, a cache directory that is a file."""

from __future__ import annotations

import errno
import json
import os
import pathlib

import pytest

from advseg.cli import main
from advseg.data import DataConfig, PreprocessConfig, load_data, write_synthetic
from advseg.data.synth import MARK
from advseg.data.synth_nifti import write_synthetic_nifti
from advseg.errors import UserError
from data_corpus import copy_of, tiny_synthetic


def _one_line(argv, capfd) -> str:
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    out, err = capfd.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err + out, err
    return lines[0]


def _listing(folder: pathlib.Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _fail_after(monkeypatch, method: str, calls: int) -> None:
    """``pathlib.Path.<method>`` raises ENOSPC from its ``calls + 1``-th call on (a disk that
    fills up part-way)."""
    real = getattr(pathlib.Path, method)
    count = [0]

    def write(self, *args, **kwargs):
        count[0] += 1
        if count[0] > calls:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, method, write)


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["evaluate", "ckpt", "--out", ""], "error: --out: an empty value"),
        (["evaluate", "ckpt", "--out="], "error: --out: an empty value"),
        (["evaluate", "", "--out", "o"], "error: argument 2 of the command line: an empty value"),
        (["data", "synth", "--out", ""], "error: --out: an empty value"),
        (["train", "--data", "", "--out", "o"], "error: --data: an empty value"),
    ],
)
def test_an_empty_argument_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capfd, argv, said):
    monkeypatch.chdir(tmp_path)  # '' was read as '.': evaluate wrote its records here
    assert _one_line(argv, capfd).startswith(said)
    assert list(tmp_path.iterdir()) == []


def test_a_non_utf8_argument_is_one_line(tmp_path, capfd):
    bad = tmp_path / os.fsdecode(b"caf\xe9")  # Latin-1 bytes: a surrogate in Python's str
    write_synthetic(bad, cases=1, scans=1, slices=1)
    line = _one_line(["data", "info", str(bad)], capfd)
    assert line.startswith("error: '") and "caf\\xe9' is not UTF-8 text" in line
    line = _one_line(["evaluate", "ckpt", "--out", str(tmp_path / os.fsdecode(b"o\xff"))], capfd)
    assert line.startswith("error: --out: '") and "o\\xff' is not UTF-8 text" in line
    assert sorted(os.listdir(tmp_path)) == [bad.name]


def test_a_non_utf8_name_found_on_disk_is_one_line(tmp_path, monkeypatch, capfd):
    """A relative path resolved in a directory whose name is not UTF-8 (the scan wrote it into
    a Parquet index: a UnicodeEncodeError traceback)."""
    parent = tmp_path / os.fsdecode(b"dir\xff")
    write_synthetic(parent / "synth", cases=1, scans=1, slices=1)
    monkeypatch.chdir(parent)
    line = _one_line(["data", "info", "synth"], capfd)
    assert "dir\\xff/synth/" in line and "is not UTF-8 text" in line


def test_overwrite_never_replaces_a_users_directory(tmp_path, capfd):
    mine = tmp_path / "thesis"
    mine.mkdir()
    (mine / "chapter1.tex").write_text("months of work")
    line = _one_line(["data", "synth", "--out", str(mine), "--overwrite", "--cases", "2"], capfd)
    assert line == (
        f"error: {mine}: --overwrite replaces only a synthetic data set advseg wrote (marked by "
        f"its {MARK} file); this directory holds other files: choose another --out"
    )
    assert _listing(mine) == {"chapter1.tex": b"months of work"}
    with pytest.raises(UserError, match="replaces only a synthetic data set"):
        write_synthetic_nifti(mine, cases=1, slices=2, size=(16, 16), overwrite=True)
    # a real Kaggle-layout set (train.csv + train/) is the user's too, whatever its layout
    kaggle = copy_of(tiny_synthetic(tmp_path / "k", cases=1, scans=1, slices=1), tmp_path / "uw")
    (kaggle / MARK).unlink()
    with pytest.raises(UserError, match="replaces only a synthetic data set"):
        write_synthetic(kaggle, cases=1, scans=1, slices=2, overwrite=True)


def test_overwrite_replaces_a_synthetic_set(tmp_path):
    out = tmp_path / "s"
    write_synthetic(out, cases=1, scans=1, slices=1)
    assert (out / MARK).is_file()
    write_synthetic(out, cases=1, scans=1, slices=2, overwrite=True)
    assert len(list(out.rglob("*.png"))) == 2
    ct = tmp_path / "ct"
    write_synthetic_nifti(ct, cases=1, slices=2, size=(16, 16))
    (ct / MARK).unlink()  # one written before the mark: known by its dataset.json
    write_synthetic_nifti(ct, cases=2, slices=2, size=(16, 16), overwrite=True)
    assert json.loads((ct / "dataset.json").read_text())["numTraining"] == 2
    assert (ct / MARK).is_file()


def test_synth_of_one_case_warns_that_nothing_can_be_held_out(tmp_path, capfd):
    with pytest.raises(SystemExit) as stop:
        main(["data", "synth", "--kind", "nifti", "--out", str(tmp_path / "v"), "--cases", "1",
              "--slices", "2"])  # fmt: skip
    assert stop.value.code == 0
    assert "warning: --cases 1: a data set of one case has no case to hold out" in (
        capfd.readouterr().err
    )


@pytest.mark.parametrize(("method", "calls"), [("write_bytes", 3), ("write_text", 0)])
def test_a_full_disk_during_data_synth_is_one_line_and_leaves_nothing(
    tmp_path, monkeypatch, capfd, method, calls
):
    """PNGs (numpy's tofile raised a full disk without its errno: a traceback) and train.csv
    (pandas' to_csv let it pass)."""
    _fail_after(monkeypatch, method, calls)
    out = tmp_path / "synth"
    line = _one_line(["data", "synth", "--out", str(out), "--cases", "2", "--scans", "1",
                      "--slices", "3"], capfd)  # fmt: skip
    assert line == f"error: {out}: cannot write (no space left on the device)"
    assert list(tmp_path.iterdir()) == []  # no set, no temporary directory


def test_a_full_disk_at_the_cache_entrys_metadata_is_one_line(tmp_path, monkeypatch):
    """The entry's arrays written, then its meta.json or digests: one line, no entry."""
    root = tiny_synthetic(tmp_path / "d", cases=1, scans=1, slices=2)
    config = DataConfig(path=root, cache_dir=tmp_path / "cache",
                        preprocess=PreprocessConfig(size=16))  # fmt: skip
    real = pathlib.Path.write_text

    def full(self, *args, **kwargs):
        building = ".tmp" in str(self.parent)
        if building and (
            self.name == "digests.json" or (self.name == "meta.json" and "key" in args[0])
        ):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "write_text", full)
    with pytest.raises(UserError, match=r"cannot write the cache \(no space left") as caught:
        load_data(config)
    assert "\n" not in str(caught.value)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == []


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from advseg.runs.records import write_records
    from test_records import _frame

    run = tmp_path_factory.mktemp("report") / "run"
    write_records(_frame(1), run / "records" / "cell.parquet")
    return run


def test_a_full_disk_during_a_report_leaves_no_partial_file(run_dir, monkeypatch, capfd):
    """The report's files go to a staging directory moved in at the end: a full disk after
    a few files (it left 4 partial files) leaves the previous report as it was."""
    with pytest.raises(SystemExit):
        main(["report", str(run_dir)])
    report = run_dir / "report"
    before = _listing(report)
    assert "report.html" in before
    capfd.readouterr()
    _fail_after(monkeypatch, "write_text", 3)
    line = _one_line(["report", str(run_dir), "--protocol", "global"], capfd)
    assert line.startswith("error: ") and "no space left on the device" in line
    assert _listing(report) == before
    assert sorted(p.name for p in run_dir.iterdir()) == ["records", "report"]


def test_a_full_disk_during_a_first_report_leaves_no_directory(
    run_dir, tmp_path, monkeypatch, capfd
):
    out = tmp_path / "new" / "report"
    _fail_after(monkeypatch, "write_text", 2)
    _one_line(["report", str(run_dir), "--out", str(out)], capfd)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("under", [False, True])
def test_run_with_a_cache_dir_that_is_a_file_writes_nothing(tmp_path, capfd, under):
    data = tiny_synthetic(tmp_path / "d", cases=3, scans=1, slices=2)
    taken = tmp_path / "afile"
    taken.write_text("not a directory")
    cache = taken / "sub" if under else taken
    experiment = tmp_path / "exp.yaml"
    experiment.write_text(f"data: {{path: {data}, cache_dir: {cache}}}\n"
                          "models: [{arch: unet-tiny}]\n")  # fmt: skip
    out = tmp_path / "run"
    line = _one_line(["run", str(experiment), "--out", str(out)], capfd)
    where = f"lies under a file ({taken})" if under else "is a file"
    assert line == f"error: data.cache_dir: {cache}: the cache directory {where}"
    assert not out.exists()
