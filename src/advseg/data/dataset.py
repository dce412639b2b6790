"""The torch Dataset over cached arrays, with the augmentation hook.

Items are dicts ``{"image": (C, S, S) float32, "mask": (K, S, S) float32, "row": int}``, where
``row`` is the position in :attr:`SliceData.index <advseg.data.load.SliceData.index>`. The
optional ``transform`` takes and returns the item dict (tensors) and is applied to image and mask
together, so geometric augmentations stay aligned; the training code supplies it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

Item = dict[str, Any]


class SliceDataset(Dataset):
    """Rows of memory-mapped arrays as model inputs.

    Args:
        images: ``(N, S, S)`` float32 grey slices in [0, 1].
        masks: ``(N, K, S, S)`` uint8 masks.
        channels: ``(N, C)`` rows whose images form each row's channels (see
            :func:`advseg.data.preprocess.neighbour_rows`).
        rows: the positions this dataset serves, in order.
        transform: ``item -> item``, applied to image and mask together.
    """

    def __init__(
        self,
        images: np.ndarray,
        masks: np.ndarray,
        channels: np.ndarray,
        rows: Sequence[int] | np.ndarray,
        transform: Callable[[Item], Item] | None = None,
    ) -> None:
        self.images = images
        self.masks = masks
        self.channels = channels
        self.rows = np.asarray(rows, dtype=np.int64)
        self.transform = transform
        if self.rows.size and (self.rows.min() < 0 or self.rows.max() >= len(images)):
            raise IndexError(f"rows must lie in [0, {len(images)}), got {self.rows.min()} ..")

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> Item:
        row = int(self.rows[i])
        image = torch.from_numpy(np.ascontiguousarray(self.images[self.channels[row]]))  # (C, S, S)
        mask = torch.from_numpy(self.masks[row].astype(np.float32))  # (K, S, S)
        item: Item = {"image": image, "mask": mask, "row": row}
        return self.transform(item) if self.transform is not None else item
