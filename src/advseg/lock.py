"""One writer per output directory (issue 25): a lock file taken atomically, released on exit.

Two ``advseg evaluate`` on one ``--out`` at once both wrote it, and two ``advseg run`` of one
grid on one directory both ran. :func:`output_lock` creates ``DIR/.advseg.lock`` with
``O_CREAT | O_EXCL`` (atomic on local file systems and NFSv3+), holding the writer's PID, host
and command; a second writer finds it and is refused in one line naming the holder. A lock whose
process is gone (killed with ``kill -9``: no ``finally`` ran) is stale: it is said in one warning
line and taken over, so a killed run still resumes. A lock from another host cannot be checked
and is respected. A directory the lock had to create, still empty when the work ends (a refusal),
is removed again: nothing is left behind.
"""

from __future__ import annotations

import os
import socket
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from advseg.atomic import _alive
from advseg.errors import AdvsegWarning, UserError

LOCK_FILE = ".advseg.lock"
"""The lock's name inside the directory it guards."""


@contextmanager
def output_lock(directory: str | Path, command: str) -> Iterator[None]:
    """Hold ``directory``'s lock while the body runs.

    A directory that cannot hold a file (it is a file, lies under one, is read-only) is not
    locked: the command's own output check says why in its words. Under torchrun rank 0 (the
    launcher's ``RANK``, known before the process group is joined) holds it for every rank.

    Raises:
        UserError: another live advseg process holds the lock (naming its PID, host and
            command).
    """
    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 holds it for all ranks
        yield
        return
    directory = Path(directory)
    created = _first_missing(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError:
        yield  # not a directory advseg can write: the command refuses it itself
        return
    path = directory / LOCK_FILE
    token = f"{os.getpid()} {socket.gethostname()} {command}"
    try:
        taken = _take(path, token)
    except BaseException:
        _remove_empty(directory, created)
        raise
    try:
        yield
    finally:
        if taken:
            _release(path, token)
        _remove_empty(directory, created)


def _take(path: Path, token: str) -> bool:
    """Create the lock; True when it is held now, False when it could not be written at all."""
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read(path)
            if holder is None:
                continue  # released meanwhile (or empty: its writer is still writing it)
            pid, host, command = holder
            if host != socket.gethostname() or (pid > 0 and _alive(pid)):
                raise UserError(
                    f"{path.parent}: another advseg process is writing here ({command}, pid "
                    f"{pid} on {host}); wait for it to end or use another directory (its lock: "
                    f"{path})"
                ) from None
            warnings.warn(
                f"{path}: a stale lock of a process that is gone (pid {pid}, {command}); "
                "taking it over",
                AdvsegWarning,
                stacklevel=4,
            )
            path.unlink(missing_ok=True)
            continue
        except OSError:
            return False  # read-only or full: nothing can be written here anyway
        with os.fdopen(fd, "w") as handle:
            handle.write(token + "\n")
        return True
    raise UserError(f"{path}: cannot take the lock (another process keeps taking it)")


def _read(path: Path) -> tuple[int, str, str] | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    pid, _, rest = text.partition(" ")
    host, _, command = rest.partition(" ")
    if not pid.isdigit():
        return (0, socket.gethostname(), "unreadable lock") if text else None
    return int(pid), host, command


def _release(path: Path, token: str) -> None:
    try:
        if path.read_text().strip() == token:  # ours still (not taken over as stale)
            path.unlink()
    except OSError:
        pass


def _first_missing(directory: Path) -> Path | None:
    """The outermost folder of ``directory`` (itself included) that does not exist yet."""
    missing = None
    for folder in [directory, *directory.parents]:
        if folder.exists():
            break
        missing = folder
    return missing


def _remove_empty(directory: Path, created: Path | None) -> None:
    """Remove ``directory`` and its parents up to ``created`` where this lock made them and they
    are still empty."""
    if created is None:
        return
    for folder in [directory, *directory.parents]:
        try:
            folder.rmdir()
        except OSError:
            return
        if folder == created:
            return
