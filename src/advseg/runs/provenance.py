"""Where a run's numbers came from: the advseg version, the device and the date of each session.

``advseg run`` and ``advseg evaluate`` call :func:`record_session` once per invocation (a resumed
run adds a session), writing ``RUN_DIR/provenance.json``: ``{"sessions": [{"command", "argv"
(the command line), "started", "advseg", "python", "torch", "device"}, ...]}``. The report reads
it back with :func:`read_sessions` for its provenance section; a run from before this file
existed has none, and the report says so rather than guessing.
"""

from __future__ import annotations

import json
import platform
import shlex
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import advseg
from advseg.atomic import write_text_atomic

FILE = "provenance.json"

_arguments: list[str] | None = None  # set by advseg.cli.main: what the user passed


def set_arguments(argv: list[str] | None) -> None:
    """Remember the command line's arguments while ``advseg.cli.main`` runs (None after it, and
    for Python API calls, which record the process's ``sys.argv`` marked as such)."""
    global _arguments
    _arguments = None if argv is None else list(argv)


def describe_device(device: Any) -> str:
    """A device in words: ``cpu``, or ``cuda:0 (NVIDIA H100 80GB HBM3)`` with the GPU's name."""
    import torch

    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return str(device)


def now() -> str:
    """The current time, UTC, to the second (ISO 8601)."""
    return datetime.now(UTC).replace(microsecond=0).isoformat()


def session(command: str, device: Any) -> dict[str, str]:
    """This process's entry: command, its command line, start time, versions and the device."""
    import torch

    return {
        "command": command,
        "argv": (
            f"(Python API) {shlex.join(sys.argv)}"
            if _arguments is None
            else shlex.join(["advseg", *_arguments])
        ),
        "started": now(),
        "advseg": advseg.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": describe_device(device),
        "threads": str(torch.get_num_threads()),  # results move in the 4th decimal with it
    }


def read_sessions(run_dir: str | Path) -> list[dict[str, Any]]:
    """The sessions recorded in ``run_dir/provenance.json``; empty when there is none (or it is
    unreadable: provenance is descriptive, never a reason to refuse a report)."""
    try:
        saved = json.loads((Path(run_dir) / FILE).read_text())
    except (OSError, ValueError):
        return []
    sessions = saved.get("sessions") if isinstance(saved, dict) else None
    return [s for s in sessions if isinstance(s, dict)] if isinstance(sessions, list) else []


def record_session(run_dir: str | Path, command: str, device: Any) -> None:
    """Append this session to ``run_dir/provenance.json`` (written atomically)."""
    sessions = [*read_sessions(run_dir), session(command, device)]
    text = json.dumps({"sessions": sessions}, indent=1) + "\n"
    write_text_atomic(Path(run_dir) / FILE, text)
