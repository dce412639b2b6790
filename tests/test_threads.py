"""CPU honesty (issue 26): a thread count that fits the machine's load, set by --threads on every
heavy command, and recorded where the numbers are."""

import pytest
import torch

from advseg.errors import UserError
from advseg.threads import default_threads, set_threads

HEAVY = ["train", "evaluate", "certify", "run", "demo", "card", "export"]


@pytest.mark.parametrize(
    ("cores", "load", "threads"),
    [(2, 9.3, 1), (2, 0.1, 2), (8, 3.4, 5), (8, 0.0, 8), (16, 40.0, 1), (1, 0.0, 1)],
)
def test_the_default_is_the_idle_cores(cores, load, threads):
    """Two torch threads on a busy 2-core machine ran the demo 5x slower than one."""
    assert default_threads(cores, load) == threads


def test_set_threads_sets_torch_and_refuses_nonsense(monkeypatch):
    monkeypatch.delenv("ADVSEG_THREADS", raising=False)  # conftest pins it for the session
    before = torch.get_num_threads()
    try:
        assert set_threads(1) == 1 and torch.get_num_threads() == 1
        assert set_threads(None) == torch.get_num_threads() == default_threads()
        with pytest.raises(UserError, match="threads: must be at least 1, got 0"):
            set_threads(0)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("command", HEAVY)
def test_every_heavy_command_takes_threads(command, capsys):
    from advseg.cli import main

    with pytest.raises(SystemExit):
        main([command, "--help"])
    assert "--threads" in capsys.readouterr().out


def test_provenance_records_the_thread_count():
    from advseg.runs.provenance import session

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert session("advseg evaluate", "cpu")["threads"] == "1"
    finally:
        torch.set_num_threads(before)


def test_the_environment_overrides_the_load(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("ADVSEG_THREADS", "2")
        assert set_threads(None) == 2 and torch.get_num_threads() == 2
        assert set_threads(1) == 1  # --threads wins over the environment
        monkeypatch.setenv("ADVSEG_THREADS", "many")
        with pytest.raises(UserError, match=r"\$ADVSEG_THREADS: expected a thread count"):
            set_threads(None)
        monkeypatch.setenv("ADVSEG_THREADS", "")
        assert set_threads(None) == default_threads()
    finally:
        torch.set_num_threads(before)
