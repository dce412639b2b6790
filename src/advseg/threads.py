"""How many CPU threads torch uses: chosen from the machine's load, settable, recorded.

On a shared machine torch's default (one thread per core) oversubscribes the cores: two torch
threads on a busy 2-core machine ran ``advseg demo`` in 715 s against 137 s with one (issue 26).
The thread count also moves results in the 4th decimal (reductions are split differently), so it
is part of a run's provenance (:func:`advseg.runs.provenance.session` records it).

The default (:func:`default_threads`) is the cores this process may use minus the machine's
1-minute load average, rounded, at least 1 and at most the cores: all of them on an idle machine,
one on a busy one; ``$ADVSEG_THREADS`` overrides it (a batch job's allocation, a test session).
``--threads N`` on every heavy command (``train``, ``evaluate``, ``certify``, ``run``, ``demo``)
sets it.
"""

from __future__ import annotations

import os

from advseg.errors import UserError

THREADS_ENV = "ADVSEG_THREADS"
THREADS_HELP = (
    "Torch CPU threads (default: $ADVSEG_THREADS, else the cores not busy, i.e. cores minus the "
    "1-minute load, at least 1; recorded in provenance)."
)


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity), else the machine's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def default_threads(cores: int | None = None, load: float | None = None) -> int:
    """``cores - round(load)``, clamped to ``[1, cores]``: the idle cores.

    Args:
        cores: usable cores (default :func:`usable_cores`).
        load: the 1-minute load average (default ``os.getloadavg()``; 0 where unknown).
    """
    cores = usable_cores() if cores is None else cores
    if load is None:
        try:
            load = os.getloadavg()[0]
        except OSError:  # pragma: no cover - no load average here
            load = 0.0
    return max(1, min(cores, cores - round(load)))


def set_threads(threads: int | None = None) -> int:
    """Set torch's intra-op CPU threads to ``threads`` (default ``$ADVSEG_THREADS``, else
    :func:`default_threads`); returns the count set.

    Raises:
        UserError: ``threads`` below 1.
    """
    import torch

    if threads is not None and threads < 1:
        raise UserError(f"threads: must be at least 1, got {threads}")
    if threads is None:
        threads = _from_environment()
    count = default_threads() if threads is None else int(threads)
    torch.set_num_threads(count)
    return count


def _from_environment() -> int | None:
    """``$ADVSEG_THREADS`` as a count, None when unset or empty."""
    text = os.environ.get(THREADS_ENV, "").strip()
    if not text:
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise UserError(f"${THREADS_ENV}: expected a thread count of 1 or more, got {text!r}")
    return value
