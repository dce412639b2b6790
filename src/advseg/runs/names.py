"""How names (models, attacks, losses, slices) become file names inside a run directory.

Every writer of a run (cells, crafted images, certified records, exports, report figures) names
its files with :func:`file_stem`, so one model or attack has one spelling on disk.
"""

from __future__ import annotations

import re


def file_stem(text: str) -> str:
    """``text`` as a file-name-safe stem (characters outside ``[A-Za-z0-9._-]`` become ``-``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "x"
