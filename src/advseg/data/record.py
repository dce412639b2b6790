"""What a run and a checkpoint record about their data, and the line a command prints about it.

Beside :mod:`advseg.data.location` (where data is), this module takes the loaded data and its
:class:`~advseg.data.load.DataConfig`: paths stored resolved (:func:`resolved_config`), a run
directory's ``data.json`` (:func:`data_note`, :func:`run_data_record`), :func:`first_line`, and
the data's fingerprint (:func:`data_fingerprint`, :func:`same_data`).
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from advseg.data.cache import cache_key
from advseg.data.load import DataConfig, SliceData
from advseg.data.location import PHANTOM_LABEL, is_synthetic, location, phantom_dir


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
    :func:`data_fingerprint`), ``slices``, ``classes``, ``labels`` (where the
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


def data_fingerprint(data: SliceData) -> str:
    """A name for the data a run computes on: the cache key of its index.

    The key hashes the index (ids, image paths, masks, classes), the image files' contents
    (:mod:`advseg.data.content`) and the preprocessing: replaced or edited data gives another
    fingerprint, even with its sizes and modification times kept.
    """
    return data.cache_path.name


def same_data(saved: str, data: SliceData) -> bool:
    """Whether a saved fingerprint names ``data``: its fingerprint now, the one it had before
    content digests (sizes and mtimes), or the one it had before
    data locations were resolved (image paths as spelt relative to the working directory, what a
    run begun with a relative data path, ``advseg demo``'s included, saved)."""
    if saved == data_fingerprint(data):
        return True
    if not hasattr(data, "preprocess"):  # volumes (VolumeData): no older key to match
        return False
    if saved == cache_key(data.index, data.preprocess, content=False):
        return True  # saved before content digests: the files' sizes and mtimes then
    index = data.index.copy()
    index["image_path"] = [os.path.relpath(p) for p in index["image_path"]]
    return saved == cache_key(index, data.preprocess, content=False)
