"""Corruption cells: every (corruption, severity) of a model on a split, in one pass over it.

Each batch is read once and its clean forward made (and scored, HD95 included) once; every
(corruption, severity) then costs its TorchIO transform, one forward of the corrupted images and
their scores.
The records are those of an attack cell (one row per slice and class, the clean columns the same
clean forward's), with ``attack`` ``corruption:<name>:<severity>``, ``loss`` ``none``, ``eps`` 0
and the ``corruption`` and ``severity`` columns filled; ``linf``/``l2``/``psnr``/``ssim`` measure
how far the corruption moved the image.

Each slice's corruption is drawn from its own generator, seeded by (seed, corruption, severity,
slice id) (:func:`advseg.corruptions.corruption_seed`): the images depend neither on the batch
size nor on the shard. Under torchrun the batches are dealt out over the ranks as in
:func:`advseg.evaluate.cells.evaluate_sweep`.

Volumes (``data`` an :class:`advseg.data.VolumeData`, ``model`` its
:class:`advseg.inference.SlidingWindow`, batch size 1): TorchIO's transforms are 3D, so each
whole volume is corrupted at once, with its voxel size in mm (blur, motion and anisotropy act in
mm) and in the source's intensity window (a CT volume's valid range, the clip of its HU window,
is what maps to [0, 1]; an MRI volume, which has none, uses its own minimum and maximum), then
scored through the same sliding-window inference as the attack cells: one row per (volume,
class, cell), ``through`` ``inference`` and the normalised surface Dice at ``nsd_mm``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from advseg import distributed
from advseg.attacks import frozen, model_logits
from advseg.corruptions import NO_LOSS, corrupt, corruption_label, corruption_seed
from advseg.data.split import spread_positions
from advseg.errors import UserError
from advseg.evaluate.cells import DEFAULT_BATCH_SIZE, CellResult, SliceSource
from advseg.evaluate.engine import BatchOutput
from advseg.evaluate.scoring import (
    batch_records,
    example_arrays,
    merge_examples,
    volume_slices,
)
from advseg.runs.record_rows import pixel_mm
from advseg.runs.records import check_records


def evaluate_corruptions(
    model: nn.Module,
    data: SliceSource,
    rows: Sequence[int],
    cells: Sequence[tuple[str, int]],
    *,
    model_name: str,
    arch: str,
    activation: str = "sigmoid",
    seed: int = 0,
    batch_size: int = DEFAULT_BATCH_SIZE,
    examples: int = 0,
    workers: int = 0,
    on_batch: Callable[[int, int], None] | None = None,
    volumes: bool = False,
    nsd_mm: float | None = None,
) -> list[CellResult]:
    """Evaluate ``model`` on corrupted slices: one :class:`CellResult` per (name, severity).

    Args:
        model: a segmentation model (logits ``(B, K, H, W)``), on the device to use; for
            volumes the :class:`~advseg.inference.SlidingWindow` that scores them.
        data: the slices (:class:`~advseg.evaluate.cells.SliceSource`), or volumes
            (:class:`~advseg.data.VolumeData`, with ``nsd_mm``).
        rows: positional rows of ``data.index`` (a split).
        cells: ``(corruption, severity)`` pairs (:func:`advseg.corruptions.parse_corruptions`).
        model_name, arch: the records' ``model`` and ``arch``.
        activation: ``sigmoid`` or ``softmax`` (how logits become hard predictions).
        seed: the corruptions' seed (with the slice id, each slice's draw).
        batch_size, examples, workers, on_batch: as for
            :func:`~advseg.evaluate.cells.evaluate_cell` (``examples``: slices per cell kept
            for the report's panels, spread over the cases).
        volumes: ``data`` holds whole volumes and ``model`` is their sliding-window inferer
            (batch size 1): each volume corrupted in 3D with its spacing and valid range.
        nsd_mm: volumes: the records' normalised surface Dice tolerance in mm.

    Returns:
        One :class:`CellResult` per cell, in the order of ``cells``; records ordered by slice
        (as in ``rows``), then class.
    """
    rows = [int(r) for r in rows]
    if not rows:
        raise UserError(f"{model_name}: the split has no slices to evaluate")
    if not cells:
        raise UserError(f"{model_name}: no corruption given")
    if batch_size < 1:
        raise UserError(f"batch_size must be >= 1, got {batch_size}")
    classes = list(data.classes)
    device = next(model.parameters()).device
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    batches = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    mine = list(distributed.shard(range(len(batches))))
    positions = [p for b in mine for p in range(b * batch_size, b * batch_size + len(batches[b]))]
    loader = DataLoader(
        Subset(data.dataset(rows), positions), batch_size=batch_size, num_workers=workers
    )
    index = data.index
    if volumes and batch_size != 1:
        raise ValueError("evaluate_corruptions: volumes go one at a time (batch_size 1)")
    chosen = set(spread_positions(index["case"].to_numpy()[rows], examples).tolist())
    frames: list[tuple[int, list[pd.DataFrame]]] = []
    shown: list[tuple[int, list[dict[str, np.ndarray]]]] = []
    for batch_number, batch in zip(mine, loader, strict=True):
        x = batch["image"].to(device)
        y = batch["mask"].to(device).float()
        meta = index.iloc[batch["row"].tolist()]
        ids = meta["id"].astype(str).tolist()
        spacing = pixel_mm(data, batch["row"].tolist())
        units = {"valid_range": data.valid_range} if volumes else {}  # slices: [0, 1]
        with frozen(model), amp, torch.inference_mode():
            clean_logits = model_logits(model, x).float()  # one clean forward for every cell
            outs = []
            for name, severity in cells:
                x_c = torch.cat([
                    corrupt(x[i : i + 1], name, severity,
                            seed=corruption_seed(seed, name, severity, ids[i]),
                            **units, **({"spacing": spacing[i]} if volumes else {}))
                    for i in range(len(x))
                ])  # fmt: skip
                outs.append(BatchOutput(clean_logits, [x_c], [model_logits(model, x_c).float()]))
        # one call for every cell: the clean prediction is scored (HD95 too) once per batch
        together = BatchOutput(clean_logits, [o.x_adv[0] for o in outs],
                               [o.adv_logits[0] for o in outs])  # fmt: skip
        scored = batch_records(
            together, [NO_LOSS] * len(outs), x, y, meta, classes, activation, spacing,
            getattr(data, "data_range", 1.0),  # as evaluate_sweep: volumes in source units
            nsd_mm,
        )  # fmt: skip
        size = len(x) * len(classes)  # rows per cell, in the order of the cells
        parts = [scored.iloc[i * size : (i + 1) * size].reset_index(drop=True)
                 for i in range(len(outs))]  # fmt: skip
        frames.append((batch_number, parts))
        start = batch_number * batch_size
        picks = [i for i in range(len(x)) if start + i in chosen]
        if picks:
            shown.append(
                (batch_number, [example_arrays(o, x, y, meta, activation, picks) for o in outs])
            )
        if on_batch is not None:
            on_batch(len(frames), len(mine))
    frames = sorted(
        (item for part in distributed.gather_objects(frames) for item in part), key=_first
    )
    shown = sorted(
        (item for part in distributed.gather_objects(shown) for item in part), key=_first
    )
    params = sum(p.numel() for p in model.parameters())
    results = []
    for i, (name, severity) in enumerate(cells):
        records = pd.concat([parts[i] for _, parts in frames], ignore_index=True)
        records = records.assign(
            model=model_name, source=model_name, arch=arch, params=params,
            attack=corruption_label(name, severity), eps=0.0, corruption=name,
            severity=int(severity), through="inference" if volumes else "",
        )  # fmt: skip
        examples_i = merge_examples([(b, parts[i]) for b, parts in shown], [NO_LOSS])
        if volumes:  # the report draws one axial slice of each example volume
            examples_i = volume_slices(examples_i)
        results.append(CellResult(check_records(records), examples_i))
    return results


def _first(item: tuple) -> int:
    return item[0]
