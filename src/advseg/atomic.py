"""Atomic file writes: a file appears complete under its final name, or not at all.

Everything advseg writes that a later run reads (caches, checkpoints, records, reports) goes
through here, so an interrupted run never leaves a half-written file behind.

Three more duties live here because they concern every such write:

- **Failures are one line.** A full disk, a read-only file system or a missing permission while
  writing becomes a :class:`~advseg.errors.UserError` naming the file and what failed, instead of
  a traceback (the temporary file is removed; the final name keeps its previous content).
- **Debris is recognisable.** A temporary file is named ``.NAME.PID.RANDOM.tmp``: a process
  killed before its rename leaves one behind, and :func:`remove_debris` removes exactly those whose
  writer (PID) is gone, never a file another live process is writing, never a file of another name.
- **Faults can be injected.** :func:`fault_point` ends the process at a named point when the
  ``ADVSEG_FAULT`` environment variable asks for it; the tests kill runs there (between the two
  files of a checkpoint, before a rename) and check that a resume loses nothing finished.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from advseg.errors import UserError

FAULT_ENV = "ADVSEG_FAULT"
"""``POINT[:TEXT][@N]``: exit (status 137, like ``kill -9``) the N-th time (default 1st) the
process reaches :func:`fault_point` ``POINT`` with a detail containing ``TEXT``."""

_DEBRIS = re.compile(r"^\..+\.(\d+)\.[A-Za-z0-9_]+\.tmp$")
_fault_hits: dict[str, int] = {}

# errno values that are the machine's state, not a bug: said in one line, naming the path.
_ENVIRONMENT_ERRORS = {
    errno.ENOSPC: "no space left on the device",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EDQUOT: "disk quota exceeded",
    errno.ENOTDIR: "a parent of it is a file, not a directory",
    errno.EISDIR: "it is a directory",
    errno.EEXIST: "a parent of it is a file, not a directory",
}


def fault_point(point: str, detail: str = "") -> None:
    """Exit at once (``os._exit(137)``) if ``ADVSEG_FAULT`` names this point; else do nothing.

    Used only by the fault tests: ``ADVSEG_FAULT=rename:last.json@2`` kills the process the second
    time it is about to rename a file whose final name contains ``last.json``.
    """
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    target, _, count = spec.partition("@")
    name, _, text = target.partition(":")
    if name != point or text not in detail:
        return
    _fault_hits[spec] = _fault_hits.get(spec, 0) + 1
    if _fault_hits[spec] == int(count or 1):
        os._exit(137)


def write_error(path: str | Path, err: OSError, what: str = "cannot write") -> UserError | None:
    """One-line :class:`UserError` for an OSError that is the machine's state, else None."""
    reason = _ENVIRONMENT_ERRORS.get(err.errno or -1)
    if reason is None:
        return None
    return UserError(f"{path}: {what} ({reason})")


@contextmanager
def atomic_path(path: str | Path, fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it to ``path``, else delete it.

    Args:
        path: the final file name.
        fsync: flush the file to the disk before the rename (for files whose loss costs hours,
            such as checkpoints: after a power cut the rename never shows an empty file).

    Raises:
        UserError: the disk is full, the file system read-only, a parent is a file, ...: one line
            naming ``path`` (an error raised by the caller's block that is no OSError passes).

    Example:
        >>> with atomic_path("records/cell.parquet") as tmp:  # doctest: +SKIP
        ...     frame.to_parquet(tmp)
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(
            dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp"
        )
    except OSError as err:
        raise (write_error(path, err) or err) from None
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if fsync:
            with tmp.open("rb+") as handle:
                os.fsync(handle.fileno())
        _respect_umask(tmp)
        fault_point("rename", path.name)
        os.replace(tmp, path)
    except OSError as err:
        raise (write_error(path, err) or err) from None
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a new empty directory beside ``path``; on success it replaces ``path``, else it is
    removed. For a directory written as a whole (a synthetic data set): it appears complete or
    not at all.

    The temporary directory is named ``.NAME.PID.RANDOM.tmp`` (debris :func:`remove_debris`
    knows); ``mkdtemp`` makes it 0700, and it gets the umask's mode before the rename. An
    existing ``path`` is removed just before the rename; whether it may be replaced is the
    caller's decision, taken before any work.

    Raises:
        UserError: the disk is full, the file system read-only, ...: one line naming ``path``.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(
            tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
        )
    except OSError as err:
        raise (write_error(path, err) or err) from None
    try:
        yield tmp
        _respect_umask(tmp)
        if path.exists():
            shutil.rmtree(path)
        fault_point("rename", path.name)
        tmp.rename(path)
    except OSError as err:
        raise (write_error(path, err) or err) from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


@contextmanager
def staged_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty directory beside ``path`` to write a set of files in; on success move each
    into ``path`` (created if need be; files of the same name replaced, any other kept), else
    remove it. For outputs of many files (a report): a failure midway, such as a full disk,
    leaves ``path`` as it was, with no file of the half-written set.

    Raises:
        UserError: the disk is full, the file system read-only, ...: one line naming ``path``.
    """
    path = Path(path)
    made = [p for p in (path, *path.parents) if not p.exists()]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(
            tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
        )
    except OSError as err:
        raise (write_error(path, err) or err) from None
    done = False
    try:
        yield tmp
        path.mkdir(exist_ok=True)
        for file in sorted(f for f in tmp.rglob("*") if f.is_file()):
            target = path / file.relative_to(tmp)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(file, target)
        done = True
    except OSError as err:
        raise (write_error(path, err) or err) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        for folder in [] if done else made:  # the folders this call created, if left empty
            with contextlib.suppress(OSError):
                folder.rmdir()


def _current_umask() -> int:
    """The process umask (read by setting and restoring it: there is no getter)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _respect_umask(tmp: Path) -> None:
    """Give ``tmp`` the mode a plain ``open``/``mkdir`` would: 0o666 (dirs 0o777) less the umask.

    ``mkstemp`` creates its file mode 0600, which would keep reports and records from colleagues
    and web servers; the final file gets the permissions the user's umask asks for.
    """
    if tmp.is_symlink() or not tmp.exists():
        return
    base = 0o777 if tmp.is_dir() else 0o666
    tmp.chmod(base & ~_current_umask())


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def is_debris(path: Path) -> bool:
    """True for a temporary file (or cache build directory) whose writing process is gone."""
    match = _DEBRIS.match(path.name)
    return match is not None and path.exists() and not _alive(int(match.group(1)))


def remove_debris(directory: str | Path, recursive: bool = True) -> list[Path]:
    """Remove the temporary files left in ``directory`` by killed advseg writers.

    Only names of the form ``.NAME.PID.RANDOM.tmp`` whose PID is no running process are removed
    (files, and the data cache's build directories): the debris advseg owns, and only that.

    Returns:
        The files removed (for the caller to report).
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    candidates = directory.rglob(".*.tmp") if recursive else directory.glob(".*.tmp")
    removed = []
    for path in sorted(candidates):
        if is_debris(path):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def check_output_dir(path: str | Path, what: str = "output directory") -> Path:
    """Refuse an output directory that is a file, lies under a file, or cannot be written.

    Nothing is created; the nearest existing ancestor must be a writable directory.

    Raises:
        UserError: one line naming ``path`` and what is wrong.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{path}: the {what} is a file, not a directory")
    existing = path
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise UserError(f"{path}: cannot create the {what}: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        why = "read-only file system" if _read_only(existing) else "no write permission"
        raise UserError(f"{path}: cannot write the {what} ({why} at {existing})")
    return path


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:  # pragma: no cover - statvfs missing
        return False
