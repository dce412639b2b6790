"""A checkpoint with the data it was trained on and its held-out cases: where the Python API starts.

:func:`load_trained` does what ``advseg evaluate`` and ``advseg certify`` do before they attack:
load the checkpoint (no unpickling), rebuild the data set it was trained on with its own
preprocessing (:func:`trained_data_config`: ``data`` overrides the stored location), check that
the model fits it, and take the held-out (test) cases it stored (:func:`advseg.data.held_out_rows`).
See ``docs/api.md``. :func:`checkpoint_label` is a checkpoint's name in records.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from advseg.config import from_dict
from advseg.data import SYNTHETIC, DataConfig, SliceData, held_out_rows, load_data, saved_preprocess
from advseg.data.location import data_argument, is_synthetic
from advseg.errors import UserError
from advseg.models.checkpoint import CheckpointMeta, check_compatible, load_checkpoint


@dataclass
class Trained:
    """A loaded checkpoint and its data.

    Attributes:
        model: the network in eval mode, on the device asked for.
        meta: its :class:`~advseg.models.checkpoint.CheckpointMeta` (``model``, ``classes``,
            ``preprocessing``, ``data``, ``train``, ``metrics``...).
        data: the :class:`~advseg.data.SliceData` it was trained on (index, arrays, classes).
        test_rows: positions in ``data.index`` of the held-out cases' slices (what
            ``advseg evaluate`` attacks by default).
    """

    model: torch.nn.Module
    meta: CheckpointMeta
    data: SliceData
    test_rows: np.ndarray

    @property
    def activation(self) -> str:
        """How its logits are read: ``sigmoid`` (K outputs) or ``softmax`` (K + 1, background
        first), as trained (:mod:`advseg.labels`); pass it to attacks as ``activation=``."""
        return self.meta.activation

    @property
    def valid_range(self) -> tuple[float, float]:
        """The range of the inputs its preprocessing makes (``(0.0, 1.0)``); pass it to attacks
        as ``valid_range=`` (the default), so that they clip to what the model was fed."""
        return self.data.preprocess.value_range

    @property
    def device(self) -> torch.device:
        """Where the model's parameters are."""
        return next(self.model.parameters()).device

    def batch(self, rows: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Images ``(B, C, H, W)`` float32 in [0, 1] and masks ``(B, K, H, W)`` float32 in
        {0, 1} of ``rows`` (positions in ``data.index``), on the model's device."""
        dataset = self.data.dataset(np.asarray(rows, dtype=np.int64).reshape(-1))
        items = [dataset[i] for i in range(len(dataset))]
        if not items:
            raise UserError("batch: no rows given")
        x = torch.stack([item["image"] for item in items]).to(self.device)
        y = torch.stack([item["mask"] for item in items]).to(self.device)
        return x, y


def load_trained(
    checkpoint: str | Path,
    *,
    device: str | torch.device = "cpu",
    data: str | Path | None = None,
    cache_dir: str | Path | None = None,
) -> Trained:
    """Load ``checkpoint`` with the data set it was trained on and its held-out rows.

    Args:
        checkpoint: the checkpoint path (``PATH`` or ``PATH.safetensors``).
        device: where to put the model (``cpu``, ``cuda``, ``cuda:1``).
        data: the data set's location when it moved (``synthetic`` for the phantom); default:
            the one stored in the checkpoint.
        cache_dir: the preprocessing cache (default: the stored one, else ``~/.cache/advseg``).

    Raises:
        UserError: an unreadable checkpoint, a data set no longer there, a model that does not
            fit the data, metadata without its split.
    """
    path = Path(checkpoint)
    path = path.with_suffix("") if path.suffix == ".safetensors" else path
    model, meta = load_checkpoint(path, torch.device(device))
    preprocess = saved_preprocess(meta.preprocessing, f"{path} preprocessing")
    where = data_argument(str(data)) if data is not None else None
    cache = Path(cache_dir) if cache_dir is not None else None
    loaded = load_data(trained_data_config(meta.data, path, preprocess, where, cache))
    check_compatible(meta, path, in_channels=preprocess.channels, classes=list(loaded.classes))
    test_rows = held_out_rows(loaded.index, meta.data, str(path))
    return Trained(model, meta, loaded, np.asarray(test_rows))


def checkpoint_label(checkpoint: str | Path) -> str:
    """The model's name in records: the file stem, or the training run's folder for the
    ``<run>/checkpoints/best`` and ``last`` files that ``advseg train`` writes."""
    path = Path(checkpoint)
    stem = path.name.removesuffix(".safetensors").removesuffix(".json")
    if stem in ("best", "last") and path.parent.name == "checkpoints" and path.parent.parent.name:
        return path.parent.parent.name if stem == "best" else f"{path.parent.parent.name}-last"
    return stem


def model_label(checkpoint: str | Path, data_meta: dict[str, Any]) -> tuple[str, int | None]:
    """The model's name in records and its cross-validation fold (None: not a fold).

    A fold's checkpoint (``<run>/fold<k>/checkpoints/best``, written by ``advseg train --folds``,
    its metadata's ``data.folds``) is named by its run, so that the folds' records pool as one
    model's; any other checkpoint is named by :func:`checkpoint_label`.
    """
    label = checkpoint_label(checkpoint)
    folds = data_meta.get("folds")
    if not isinstance(folds, dict):
        return label, None
    fold = int(folds["fold"])
    run = Path(checkpoint).parent.parent.parent.name
    if run and label in (f"fold{fold}", f"fold{fold}-last"):
        return run + label.removeprefix(f"fold{fold}"), fold
    return label, fold


def trained_data_config(
    metadata: dict[str, Any],
    checkpoint: Path,
    preprocess: Any,
    path: Path | None = None,
    cache_dir: Path | None = None,
) -> Any:
    """The :class:`~advseg.data.DataConfig` a checkpoint was trained on (``path`` replaced).

    Its source, exclusions and label mapping decide which cases exist, and so which cases the
    checkpoint's split holds out: an evaluation must rebuild all of them, not only the path.

    The data: ``path`` (``--data``) when given, else the location the checkpoint stored
    (resolved when it was trained; ``synthetic`` for the phantom, and an empty one, from before
    the phantom had to be named, meant the phantom too). A stored data set that is not there is
    refused in one line: the phantom is never built in place of data that was not found. The
    cache: ``cache_dir`` (``--cache-dir``) when given, else the stored one where it exists, else
    the default (:func:`advseg.data.cache_root`).

    Raises:
        UserError: the stored data set is missing, or the metadata names no data and no ``path``
            is given.
    """
    if "config" not in metadata:
        if path is None:
            raise UserError(
                f"{checkpoint}: its metadata does not say which data it was trained on "
                "(no data.config); give the data with --data"
            )
        return DataConfig(path=Path(path), preprocess=preprocess, cache_dir=cache_dir)
    data_config = from_dict(DataConfig, metadata["config"], where=f"{checkpoint} data.config")
    stored_cache = data_config.cache_dir
    if cache_dir is None and stored_cache is not None and Path(stored_cache).is_dir():
        cache_dir = stored_cache
    data_config = replace(data_config, preprocess=preprocess, cache_dir=cache_dir)
    if path is not None:
        return replace(data_config, path=Path(path))
    stored = data_config.path
    if stored is None:  # trained before the phantom had to be named: the phantom
        return replace(data_config, path=Path(SYNTHETIC))
    if not is_synthetic(stored) and not Path(stored).exists():
        raise UserError(
            f"{checkpoint}: the data set it was trained on, {stored}, is not there (moved, or "
            "another machine); pass --data PATH with its location"
        )
    return data_config
