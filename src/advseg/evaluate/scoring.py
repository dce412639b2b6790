"""What a cell keeps of each attacked batch: its records and the arrays of its example slices.

:func:`batch_records` turns a :class:`~advseg.evaluate.engine.BatchOutput` into records
(through :func:`advseg.runs.record_rows.slice_records`, the builder certification uses too);
:func:`example_arrays` and :func:`merge_examples` keep the few slices the report draws
(``CellResult.examples``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from advseg.evaluate.engine import BatchOutput
from advseg.labels import class_prediction
from advseg.metrics import luminosity, perturbation_norms, psnr, ssim
from advseg.runs.record_rows import Scores, score, slice_records


def batch_records(
    out: BatchOutput,
    losses: Sequence[str],
    x: Tensor,
    y: Tensor,
    meta: pd.DataFrame,
    classes: list[str],
    activation: str,
    spacing: np.ndarray | None = None,
    data_range: float | None = 1.0,
    nsd_mm: float | None = None,
    truths: Sequence[Tensor] | None = None,
    clean: Scores | None = None,
) -> pd.DataFrame:
    """Records of one batch: one row per (loss, slice, class); model/attack columns added later.

    ``truths``: per loss, the masks its adversarial prediction is scored against
    (:meth:`advseg.attacks.Attack.adversarial_truth`: ``y`` moved with the anatomy by a spatial
    attack); default ``y`` for every loss. The clean prediction is scored against ``y``.

    ``spacing``: ``(B, 2)`` mm per model pixel (``(B, 3)`` per voxel of a volume), for HD95 in mm
    (:func:`advseg.runs.record_rows.pixel_mm`). ``data_range``: the images' range for PSNR and SSIM
    (None: the batch's own max - min, for images in the source's units). ``nsd_mm``: volumes
    also get the normalised surface Dice at this tolerance (``nsd_clean``, ``nsd_adv``,
    ``nsd_mm``). ``clean``: the :func:`clean_scores` of ``out`` (with the same ``spacing`` and
    ``nsd_mm``) when the caller has them already (a sweep's eps share one clean prediction, so
    its HD95 is computed once, not once per eps).
    """
    if data_range is None:
        data_range = max(float(x.max() - x.min()), 1e-12)
    target = y > 0.5
    if clean is None:
        clean = clean_scores(out, y, activation, spacing, nsd_mm)
    lum = luminosity(x).cpu().numpy()  # (B,)
    frames = []
    members = out.members or [None] * len(losses)
    minimal = out.min_eps or [None] * len(losses)
    uppers = out.min_eps_upper or [None] * len(losses)
    criteria = out.criteria or [""] * len(losses)
    truths = truths or [y] * len(losses)
    for attack_loss, x_adv, adv_logits, winners, min_eps, upper, criterion, truth in zip(
        losses, out.x_adv, out.adv_logits, members, minimal, uppers, criteria, truths, strict=True
    ):
        moved = target if truth is y else truth > 0.5
        adv = score(class_prediction(adv_logits, activation), moved, spacing, nsd_mm)
        linf, l2 = (v.cpu().numpy() for v in perturbation_norms(x, x_adv))
        member = np.repeat(np.asarray(winners, dtype=str), len(classes)) if winners else ""
        per_slice = {
            "linf": linf,
            "l2": l2,
            "psnr": psnr(x, x_adv, data_range).cpu().numpy(),
            "ssim": ssim(x, x_adv, data_range).cpu().numpy(),
            "luminosity": lum,
            "min_eps": np.full(len(x), np.nan) if min_eps is None else min_eps.cpu().numpy(),
            "min_eps_upper": np.full(len(x), np.nan) if upper is None else upper.cpu().numpy(),
        }
        columns = {"loss": attack_loss, "member": member, "min_eps_criterion": criterion}
        if nsd_mm is not None:
            columns["nsd_mm"] = float(nsd_mm)
        frames.append(slice_records(meta, classes, clean, adv, per_slice, **columns))
    return pd.concat(frames, ignore_index=True)


def clean_scores(
    out: BatchOutput,
    y: Tensor,
    activation: str,
    spacing: np.ndarray | None = None,
    nsd_mm: float | None = None,
) -> Scores:
    """The scores (counts, HD95, NSD) of the clean prediction of ``out`` against the masks ``y``
    (``spacing``, ``nsd_mm``: as for :func:`batch_records`)."""
    return score(class_prediction(out.clean_logits, activation), y > 0.5, spacing, nsd_mm)


def example_arrays(
    out: BatchOutput, x: Tensor, y: Tensor, meta: pd.DataFrame, activation: str, picks: list[int]
) -> dict[str, np.ndarray]:
    """The arrays of the batch positions ``picks`` (see :attr:`CellResult.examples`), one entry
    per loss in ``x_adv`` and ``pred_adv``; ``ras`` (N,) marks the slices of volumes read in
    canonical RAS+ orientation (NIfTI: ``image_z`` >= 0; whole volumes: the index's ``ras``),
    whose rows run posterior to anterior and columns left to right, so that a figure can show
    them (or a volume's axial slice) in the radiological convention."""
    at = torch.as_tensor(picks, device=x.device)
    if "ras" in meta:  # whole volumes (advseg.data.VolumeData.index)
        ras = meta["ras"].to_numpy()
    else:
        ras = meta["image_z"].to_numpy() >= 0 if "image_z" in meta else np.zeros(len(meta))
    return {
        "ras": np.asarray(ras)[picks].astype(np.uint8),
        "slice_ids": meta["id"].to_numpy()[picks].astype(str),
        "image": x[at].float().cpu().numpy(),
        "mask": (y[at] > 0.5).to(torch.uint8).cpu().numpy(),
        "pred_clean": class_prediction(out.clean_logits[at], activation)
        .to(torch.uint8)
        .cpu()
        .numpy(),
        "x_adv": torch.stack([a[at] for a in out.x_adv]).float().cpu().numpy(),
        "pred_adv": torch.stack([class_prediction(a[at], activation) for a in out.adv_logits])
        .to(torch.uint8)
        .cpu()
        .numpy(),
    }


def merge_examples(
    shown: list[tuple[int, dict[str, np.ndarray]]], losses: Sequence[str]
) -> dict[str, np.ndarray]:
    """One cell's examples from its batches' (batch number, :func:`example_arrays`), in batch
    order, with ``losses`` (:attr:`CellResult.examples`); empty when no slice was picked."""
    if not shown:
        return {}
    parts = [part for _, part in sorted(shown, key=lambda t: t[0])]
    merged = {key: np.concatenate([p[key] for p in parts]) for key in ("slice_ids", "image")}
    for key in ("mask", "pred_clean", "ras"):
        merged[key] = np.concatenate([p[key] for p in parts])
    for key in ("x_adv", "pred_adv"):
        merged[key] = np.concatenate([p[key] for p in parts], axis=1)
    merged["losses"] = np.array(list(losses), dtype=str)
    return merged


def volume_slices(examples: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Example volumes (:func:`merge_examples` of ``(N, C, D, H, W)`` arrays) cut to one axial
    slice each, the one holding the most true foreground (the middle one when there is none),
    so that the report draws clean and adversarial predictions as it does for slices; the slice
    id becomes ``<scan>_slice_<z + 1>``."""
    if not examples or examples["image"].ndim != 5:
        return examples
    mask = examples["mask"]  # (N, K, D, H, W)
    counts = mask.reshape(*mask.shape[:3], -1).sum(axis=(1, 3))  # (N, D)
    depth = mask.shape[2]
    z = np.where(counts.max(axis=1) > 0, counts.argmax(axis=1), depth // 2)
    out = dict(examples)
    for key in ("image", "mask", "pred_clean"):  # (N, C or K, H, W)
        out[key] = np.stack([examples[key][i, :, k] for i, k in enumerate(z)])
    for key in ("x_adv", "pred_adv"):  # (L, N, C or K, H, W)
        out[key] = np.stack([examples[key][:, i, :, k] for i, k in enumerate(z)], axis=1)
    out["slice_ids"] = np.array(
        [f"{sid}_slice_{k + 1:04d}" for sid, k in zip(examples["slice_ids"], z, strict=True)]
    )
    return out
