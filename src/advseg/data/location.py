"""Where the data is, and where its cache goes: the data a user means, and nothing else.

- A data set is named explicitly: a directory, or the word ``synthetic`` (:data:`SYNTHETIC`) for
  the synthetic phantom. No data named is refused (:data:`NO_DATA`): nothing trains or evaluates
  on the phantom because a path was left out or not found.
- Locations are stored resolved (absolute, symlinks followed, :func:`resolved_config`), so that a
  checkpoint says where its data is from any working directory.
- The preprocessing cache lives outside the data directory (which may be read-only, such as a
  mounted Kaggle input): ``cache_dir`` when given, else ``$ADVSEG_CACHE``, else
  ``$XDG_CACHE_HOME/advseg``, else ``~/.cache/advseg`` (:func:`cache_root`). The phantom is written
  once into ``<cache root>/synthetic``.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from advseg.catalogue import NO_DATA
from advseg.errors import UserError

if TYPE_CHECKING:
    from advseg.data.load import DataConfig, SliceData

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


def resolved_config(config: DataConfig) -> DataConfig:
    """``config`` with its paths absolute: what a checkpoint stores, valid from any directory.

    The data path (unless ``synthetic``), the label-mapping file and the cache directory are
    resolved against the current directory.
    """
    changes: dict[str, Any] = {}
    if config.path is not None and not is_synthetic(config.path):
        changes["path"] = Path(config.path).expanduser().resolve()
    if config.nifti_labels_file is not None:
        changes["nifti_labels_file"] = Path(config.nifti_labels_file).expanduser().resolve()
    if config.cache_dir is not None:
        changes["cache_dir"] = Path(config.cache_dir).expanduser().absolute()
    return replace(config, **changes)


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


def first_line(config: DataConfig) -> str:
    """The line a command prints before it uses ``config``'s data (the phantom said plainly)."""
    if is_synthetic(config.path):
        return (
            f"data: the {PHANTOM_LABEL} (generated images, not patient data), in "
            f"{phantom_dir(config.cache_dir)}"
        )
    return f"data: {location(config.path)}"


def data_note(loaded: list[SliceData]) -> dict[str, Any]:
    """What a run directory's ``data.json`` holds: ``locations`` (``synthetic`` or absolute
    paths); with one data set also its ``fingerprint`` (the cache key) and ``slices``."""
    note: dict[str, Any] = {"locations": list(dict.fromkeys(d.location for d in loaded))}
    if len(loaded) == 1:
        first = loaded[0]  # a volume source (an nnU-Net raw set) names its own fingerprint
        fingerprint = getattr(first, "fingerprint", None) or first.cache_path.name
        note.update(fingerprint=fingerprint, slices=len(first))
    return note


def run_data_record(data: SliceData, config: DataConfig) -> dict[str, Any]:
    """What ``advseg run`` writes to its ``data.json``: the data it computed on, resolved, so
    that a report or a later reader needs no ``config.yaml`` (nor the working directory).

    Keys: ``locations`` (``[synthetic]`` or ``[absolute path]``), ``fingerprint`` (the cache key,
    :func:`advseg.preflight.data_fingerprint`), ``slices``, ``classes``, ``labels`` (where the
    label mapping came from: the mapping file, ``data.nifti_labels``, the data set's
    ``dataset.json``, or None for the Kaggle layout), ``cache`` (the cache entry's directory)
    and ``config`` (the whole :class:`DataConfig` with its paths absolute,
    :func:`resolved_config`, as checkpoints store it).
    """
    from advseg.config import to_dict

    resolved = resolved_config(config)
    labels: str | None = None
    if resolved.nifti_labels_file is not None:
        labels = str(resolved.nifti_labels_file)
    elif resolved.nifti_labels:
        labels = "data.nifti_labels"
    elif not is_synthetic(resolved.path) and (Path(resolved.path) / "dataset.json").is_file():
        labels = str(Path(resolved.path) / "dataset.json")
    return {
        "locations": [location(resolved.path)],
        "fingerprint": data.cache_path.name,
        "slices": len(data),
        "classes": list(data.classes),
        "labels": labels,
        "cache": str(Path(data.cache_path).absolute()),
        "config": to_dict(resolved),
    }


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
