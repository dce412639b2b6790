"""One writer per output directory (issue 25): a second advseg writing the same directory is
refused in one line; a lock left by a killed process is taken over; a refusal leaves nothing."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from advseg.cli import main
from advseg.errors import AdvsegWarning, UserError
from advseg.lock import LOCK_FILE, output_lock


@pytest.fixture
def live_pid():
    """The PID of another live process (as a second advseg would be)."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield child.pid
    child.kill()
    child.wait()


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _held_by(directory, pid, command="advseg run") -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / LOCK_FILE).write_text(f"{pid} {socket.gethostname()} {command}\n")


def test_the_lock_is_held_while_working_and_released_after(tmp_path):
    with output_lock(tmp_path / "out", "advseg evaluate"):
        holder = (tmp_path / "out" / LOCK_FILE).read_text().split()
        assert holder[:2] == [str(os.getpid()), socket.gethostname()]
        (tmp_path / "out" / "work").write_text("x")
    assert not (tmp_path / "out" / LOCK_FILE).exists()
    assert (tmp_path / "out" / "work").exists()


def test_a_second_writer_is_refused_naming_the_first(tmp_path, live_pid):
    _held_by(tmp_path, live_pid, "advseg evaluate")
    said = f"another advseg process is writing here \\(advseg evaluate, pid {live_pid} on "
    with pytest.raises(UserError, match=said), output_lock(tmp_path, "advseg evaluate"):
        pytest.fail("the body ran")
    assert (tmp_path / LOCK_FILE).exists()  # the holder's lock is left alone


def test_a_stale_lock_of_a_killed_process_is_taken_over(tmp_path):
    _held_by(tmp_path, _dead_pid())
    stale = pytest.warns(AdvsegWarning, match="a stale lock of a process that is gone")
    with stale, output_lock(tmp_path, "advseg run"):
        assert (tmp_path / LOCK_FILE).read_text().startswith(f"{os.getpid()} ")
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_lock_of_another_host_is_respected(tmp_path):
    (tmp_path / LOCK_FILE).write_text(f"{_dead_pid()} some-other-host advseg run\n")
    with pytest.raises(UserError, match="on some-other-host"), output_lock(tmp_path, "advseg run"):
        pass


def test_a_refusal_inside_leaves_no_directory_behind(tmp_path):
    out = tmp_path / "new" / "out"
    with pytest.raises(UserError, match="bad"), output_lock(out, "advseg evaluate"):
        raise UserError("bad")
    assert not (tmp_path / "new").exists()


def test_a_second_evaluate_on_one_out_is_one_line(tmp_path, capfd, live_pid):
    out = tmp_path / "eval"
    _held_by(out, live_pid, "advseg evaluate")
    with pytest.raises(SystemExit) as stop:
        main(["evaluate", str(tmp_path / "ckpt"), "--out", str(out), "--device", "cpu"])
    assert stop.value.code == 2
    err = [line for line in capfd.readouterr().err.splitlines() if line.startswith("error")]
    assert len(err) == 1 and f"pid {live_pid}" in err[0] and "advseg evaluate" in err[0]
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # nothing else written


def test_a_second_run_on_one_directory_is_one_line(tmp_path, capfd, live_pid):
    run_dir = tmp_path / "run"
    _held_by(run_dir, live_pid)
    experiment = tmp_path / "exp.yaml"
    experiment.write_text("data:\n  path: synthetic\nmodels:\n  - arch: unet-tiny\n")
    with pytest.raises(SystemExit) as stop:
        main(["run", str(experiment), "--out", str(run_dir)])
    assert stop.value.code == 2
    err = [line for line in capfd.readouterr().err.splitlines() if line.startswith("error")]
    assert len(err) == 1 and "another advseg process is writing here (advseg run" in err[0]
    assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_FILE]
