"""Where the data is, and where its cache goes: the data a user means, and nothing else.

- A data set is named explicitly: a directory, or the word ``synthetic`` (:data:`SYNTHETIC`) for
  the synthetic phantom. No data named is refused (:data:`NO_DATA`): nothing trains or evaluates
  on the phantom because a path was left out or not found.
- Locations are stored resolved (absolute, symlinks followed,
  :func:`advseg.data.record.resolved_config`), so that a checkpoint says where its data is from any
  working directory.
- The preprocessing cache lives outside the data directory (which may be read-only, such as a
  mounted Kaggle input): ``cache_dir`` when given, else ``$ADVSEG_CACHE``, else
  ``$XDG_CACHE_HOME/advseg``, else ``~/.cache/advseg`` (:func:`cache_root`). The phantom is written
  once into ``<cache root>/synthetic``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from advseg.catalogue import NO_DATA
from advseg.errors import UserError

#: The data "path" that names the phantom (``--data synthetic``, YAML ``data.path: synthetic``).
SYNTHETIC = "synthetic"

#: What the library answers when no data set is named.

#: How a run on the phantom is named in output lines, table titles and captions.
PHANTOM_LABEL = "synthetic phantom"

#: The environment variable naming the cache directory.
CACHE_ENV = "ADVSEG_CACHE"


def is_synthetic(path: str | Path | None) -> bool:
    """Whether a data path is the word ``synthetic`` (the phantom), not a directory."""
    return path is not None and str(path) == SYNTHETIC


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """The cache directory: ``cache_dir``, ``$ADVSEG_CACHE``, ``$XDG_CACHE_HOME/advseg`` or
    ``~/.cache/advseg``, the first one set (absolute)."""
    if cache_dir:
        return Path(cache_dir).expanduser().absolute()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser().absolute()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"
    return (base / "advseg").absolute()


def phantom_dir(cache_dir: str | Path | None = None) -> Path:
    """Where the synthetic phantom is (or will be) written: ``<cache root>/synthetic``."""
    return cache_root(cache_dir) / SYNTHETIC


def data_argument(text: str | None) -> Path | None:
    """A ``--data`` value: ``synthetic`` stays the word, anything else becomes an absolute path.

    A directory that happens to be called ``synthetic`` is reached as ``./synthetic``.
    """
    if text is None:
        return None
    if text == SYNTHETIC:
        return Path(SYNTHETIC)
    return Path(text).expanduser().resolve()


def location(path: str | Path | None) -> str:
    """How a data set is recorded: ``synthetic``, or its absolute path."""
    if path is None:
        raise UserError(NO_DATA)
    return SYNTHETIC if is_synthetic(path) else str(Path(path).expanduser().resolve())


def describe(where: str | Path) -> str:
    """A data location in words: ``synthetic phantom`` or the path."""
    return PHANTOM_LABEL if is_synthetic(where) else str(where)


def phantom_note(locations: list[str]) -> str | None:
    """``data: synthetic phantom`` for results computed (partly) on the phantom, else None: what
    Table II's title and caption add."""
    if not any(is_synthetic(x) for x in locations):
        return None
    others = sum(not is_synthetic(x) for x in locations)
    return f"data: {PHANTOM_LABEL}" + (f" and {others} other data set(s)" if others else "")


def run_locations(run_dir: str | Path) -> list[str]:
    """The data a run directory's results were computed on (``synthetic`` or paths).

    Read from ``data.json`` (``locations``, written by ``advseg evaluate`` and ``advseg run``),
    else from ``config.yaml``'s ``data.path`` (an ``advseg run``; an empty path there is from
    before the phantom had to be named, when it meant the phantom). Empty when neither says.
    """
    run_dir = Path(run_dir)
    try:
        saved = json.loads((run_dir / "data.json").read_text())
    except (OSError, ValueError):
        saved = {}
    found = saved.get("locations") if isinstance(saved, dict) else None
    if isinstance(found, list) and all(isinstance(x, str) for x in found) and found:
        return list(found)
    if (run_dir / "config.yaml").is_file():
        from advseg.config import load_yaml

        try:
            data = (load_yaml(run_dir / "config.yaml") or {}).get("data") or {}
        except (UserError, AttributeError):
            return []
        path = data.get("path") if isinstance(data, dict) else None
        return [SYNTHETIC if path is None or is_synthetic(path) else str(path)]
    return []
