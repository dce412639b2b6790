"""The one exception type for a user's mistake.

Anything raised as :class:`UserError` is bad input (a file, row, field or option), and its message
is one line that names it. The CLI prints that line without a traceback and exits non-zero; any
other exception is a bug in advseg and keeps its traceback.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input from the user: a one-line message naming the file, row, field or option."""


class AdvsegWarning(UserWarning):
    """Something the user should know that does not stop the work (one line, shown by the CLI)."""
