"""Progress for output that is no terminal: a plain line at intervals, with an ETA.

A rich progress bar draws nothing when the output is a log file or a pipe (batch jobs, ``| tee``),
so a long training or evaluation would be silent for minutes. :class:`IntervalLines` writes one
line such as ``epoch 3/40 train: 120/480 batches (25%), 0:01:10 elapsed, ETA 0:03:30`` at most
every :data:`INTERVAL_ENV` seconds (default 30), and always the first and the last step.
:func:`cell_progress` is an evaluation cell's bar (or such lines where the output is no terminal).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console

INTERVAL_ENV = "ADVSEG_PROGRESS_SECONDS"
"""Seconds between two progress lines when the output is no terminal (default 30)."""


def interval_seconds() -> float:
    """The interval between progress lines: ``$ADVSEG_PROGRESS_SECONDS``, else 30 s."""
    try:
        return max(0.0, float(os.environ.get(INTERVAL_ENV, "30")))
    except ValueError:
        return 30.0


def clock_text(seconds: float) -> str:
    """``3725.2`` -> ``1:02:05``."""
    seconds = max(0, round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def eta_seconds(elapsed: float, done: int, total: int | None) -> float | None:
    """Seconds left at the rate so far, or None while nothing is done or the total is unknown."""
    if not total or done <= 0:
        return None
    return elapsed / done * max(total - done, 0)


class IntervalLines:
    """Write ``what: done/total unit (p%), elapsed, ETA`` lines, at most one per interval.

    Args:
        write: where a line goes (``console.print``, ``print``, a list's ``append`` in tests).
        what: the task, e.g. ``epoch 3/40 train``.
        total: the number of steps, if known.
        unit: what a step is (``batches``).
        interval: seconds between lines (default :func:`interval_seconds`).
        clock: the time source (seconds; tests pass a fake one).
    """

    def __init__(
        self,
        write: Callable[[str], object],
        what: str,
        total: int | None,
        unit: str = "batches",
        interval: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.write, self.what, self.total, self.unit = write, what, total, unit
        self.interval = interval_seconds() if interval is None else interval
        self.clock = clock
        self.started = clock()
        self.last: float | None = None

    def update(self, done: int, total: int | None = None, extra: str = "") -> None:
        """Record ``done`` steps; write a line if the interval has passed (or at the first/last)."""
        self.total = total if total is not None else self.total
        now = self.clock()
        last_step = self.total is not None and done >= self.total
        if self.last is not None and now - self.last < self.interval and not last_step:
            return
        self.last = now
        elapsed = now - self.started
        count = f"{done}/{self.total}" if self.total else str(done)
        share = f" ({100 * done / self.total:.0f}%)" if self.total else ""
        eta = eta_seconds(elapsed, done, self.total)
        line = f"{self.what}: {count} {self.unit}{share}, {clock_text(elapsed)} elapsed"
        line += "" if eta is None or last_step else f", ETA {clock_text(eta)}"
        self.write(line + (f"  {extra}" if extra else ""))


def bar_columns() -> tuple:
    """The columns of every advseg progress bar: description, bar, done/total, elapsed, ETA."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )


@contextmanager
def cell_progress(console: Console, description: str) -> Iterator[Callable[[int, int], None]]:
    """A progress bar of one cell's batches on ``console``, removed when the cell ends.

    Yields the ``on_batch`` callback of :func:`advseg.evaluate.evaluate_cell`. A quiet console
    shows nothing; one that is not a terminal (a log file, a pipe) gets a plain line at
    intervals, with an ETA (:class:`IntervalLines`).
    """
    from rich.progress import Progress

    if not console.is_terminal:
        lines = IntervalLines(lambda text: console.print(text, highlight=False), description, None)
        yield lambda done, total: lines.update(done, total)
        return
    with Progress(*bar_columns(), console=console, transient=True) as bar:
        task = bar.add_task(f"{description}, batches", total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)
