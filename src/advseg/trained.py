"""A checkpoint with the data it was trained on and its held-out cases: where the Python API starts.

:func:`load_trained` does what ``advseg evaluate`` and ``advseg certify`` do before they attack:
load the checkpoint (no unpickling), rebuild the data set it was trained on with its own
preprocessing (:func:`advseg.evaluate.trained_data_config`: ``data`` overrides the stored
location), check that the model fits it, and recompute the held-out (test) cases from the split
seed in its metadata. See ``docs/api.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from advseg.data import SliceData, load_data, saved_preprocess, split_cases
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
    from advseg.data.location import data_argument
    from advseg.evaluate import trained_data_config

    path = Path(checkpoint)
    path = path.with_suffix("") if path.suffix == ".safetensors" else path
    model, meta = load_checkpoint(path, torch.device(device))
    preprocess = saved_preprocess(meta.preprocessing, f"{path} preprocessing")
    where = data_argument(str(data)) if data is not None else None
    cache = Path(cache_dir) if cache_dir is not None else None
    loaded = load_data(trained_data_config(meta.data, path, preprocess, where, cache))
    check_compatible(meta, path, in_channels=preprocess.channels, classes=list(loaded.classes))
    if "test_fraction" not in meta.data or "split_seed" not in meta.data:
        raise UserError(f"{path}: its metadata does not say which cases it held out")
    _, test_rows = split_cases(loaded.index, meta.data["test_fraction"], meta.data["split_seed"])
    return Trained(model, meta, loaded, np.asarray(test_rows))
