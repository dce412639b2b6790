import errno
import os
import subprocess
import sys

import pytest

from advseg.atomic import (
    atomic_dir,
    atomic_path,
    fault_point,
    is_debris,
    remove_debris,
    write_text_atomic,
)
from advseg.errors import UserError


def test_debris_of_a_dead_writer_is_removed_and_nothing_else(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    pid = int(dead.stdout)
    debris = tmp_path / "records" / f".cell.parquet.{pid}.abc123_x.tmp"
    debris.parent.mkdir()
    debris.write_text("half")
    live = tmp_path / f".cell.parquet.{os.getpid()}.abcdefgh.tmp"  # this process is writing it
    live.write_text("busy")
    users = [tmp_path / "notes.tmp", tmp_path / ".hidden.tmp", tmp_path / "records" / "a.parquet"]
    for path in users:
        path.write_text("the user's")
    assert remove_debris(tmp_path) == [debris]
    assert not debris.exists() and live.exists() and all(p.exists() for p in users)


@pytest.mark.parametrize(
    ("code", "said"),
    [
        (errno.ENOSPC, "no space left on the device"),
        (errno.EROFS, "the file system is read-only"),
        (errno.EACCES, "permission denied"),
    ],
)
def test_a_failing_disk_is_one_line_naming_the_file(tmp_path, monkeypatch, code, said):
    target = tmp_path / "summary.csv"
    target.write_text("previous\n")

    def broken_write(self, *args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr("pathlib.Path.write_text", broken_write)
    with pytest.raises(UserError) as err:
        write_text_atomic(target, "new\n")
    monkeypatch.undo()
    assert str(err.value) == f"{target}: cannot write ({said})"
    assert target.read_text() == "previous\n"  # untouched, and no temporary file left
    assert [p.name for p in tmp_path.iterdir()] == ["summary.csv"]


def test_an_output_under_a_file_is_one_line(tmp_path):
    (tmp_path / "out").write_text("a file")
    target = tmp_path / "out" / "records" / "x.parquet"
    expected = r"out/records/x.parquet: cannot write \(a parent"
    with pytest.raises(UserError, match=expected), atomic_path(target) as tmp:
        tmp.write_text("never")


def test_fault_point_fires_only_where_and_when_asked(monkeypatch):
    exits = []
    monkeypatch.setattr("advseg.atomic.os._exit", exits.append)
    monkeypatch.setenv("ADVSEG_FAULT", "rename:last.json@2")
    fault_point("rename", "best.json")
    fault_point("checkpoint-between", "last.json")
    fault_point("rename", "last.json")
    assert exits == []
    fault_point("rename", "last.json")
    assert exits == [137]


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_written_files_respect_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        write_text_atomic(tmp_path / "report.md", "x")
        with atomic_path(tmp_path / "cache") as tmp:
            tmp.unlink()
            tmp.mkdir()
        with atomic_dir(tmp_path / "synthetic") as tmp:
            (tmp / "train.csv").write_text("x")
    finally:
        os.umask(old)
    assert (tmp_path / "report.md").stat().st_mode & 0o777 == 0o666 & ~umask
    assert (tmp_path / "cache").stat().st_mode & 0o777 == 0o777 & ~umask
    assert (tmp_path / "synthetic").stat().st_mode & 0o777 == 0o777 & ~umask


def test_a_directory_appears_complete_or_not_at_all(tmp_path):
    out = tmp_path / "data"
    with pytest.raises(RuntimeError), atomic_dir(out) as tmp:
        (tmp / "half.csv").write_text("a")
        assert is_debris(tmp) is False and tmp.name.startswith(f".data.{os.getpid()}.")
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []  # no directory, no temporary one
    out.mkdir()
    (out / "old.csv").write_text("old")
    with atomic_dir(out) as tmp:
        (tmp / "new.csv").write_text("new")
        assert [p.name for p in out.iterdir()] == ["old.csv"]  # replaced only at the end
    assert [p.name for p in out.iterdir()] == ["new.csv"]
    assert [p.name for p in tmp_path.iterdir()] == ["data"]


def test_a_directory_that_cannot_be_written_is_one_line(tmp_path):
    (tmp_path / "file").write_text("a file")
    with pytest.raises(UserError, match="cannot write"), atomic_dir(tmp_path / "file" / "d"):
        pass
