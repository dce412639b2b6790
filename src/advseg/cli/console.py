"""The console the CLI prints to."""

from __future__ import annotations

import os

from rich.console import Console

LOG_WIDTH = 120


def console(stderr: bool = False) -> Console:
    """A rich Console; ``LOG_WIDTH`` columns when the output is a file or a pipe.

    rich assumes 80 columns when it cannot ask a terminal, which cuts Table II's columns in logs;
    an explicit ``COLUMNS`` in the environment still wins.
    """
    out = Console(stderr=stderr)
    if not out.is_terminal and "COLUMNS" not in os.environ:
        out = Console(stderr=stderr, width=LOG_WIDTH)
    return out
