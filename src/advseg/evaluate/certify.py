"""Certification runs: a smoothed model (:mod:`advseg.defences.smoothing`) over data.

:func:`certify_cell` certifies a split's slices batch by batch (sharded under torchrun, as the
attack engine is); :func:`certify_checkpoint` does it for a checkpoint on the data and held-out
cases it was trained on (``advseg certify``). The run directory keeps the records in
``certified/`` (:func:`certified_path`, :func:`read_certified`), apart from the attack records,
and :func:`certified_summary` gives the report's certified Dice against radius.

Records use the one records format (:data:`advseg.runs.records.RECORD_COLUMNS`): ``attack`` is
``certify``, ``loss`` is ``sigma=<sigma>``, ``eps`` is the L2 radius ``R``; the ``clean`` counts are
the base model's plain prediction, the ``adv`` counts the certified prediction at ``R``, and
``abstained`` is the share of the slice's pixels that abstained for that class. Their columns
are built by :func:`advseg.runs.record_rows.slice_records`, as an attack's are.
"""

from __future__ import annotations

import warnings
import zlib
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

from advseg import distributed
from advseg.attacks import frozen, model_logits
from advseg.defences.smoothing import Certificate, SmoothingConfig, certify_batch
from advseg.errors import AdvsegWarning, UserError
from advseg.labels import class_prediction
from advseg.metrics import hd95, luminosity
from advseg.runs.record_rows import Scores, hd95_mm, pixel_mm, score, slice_records
from advseg.runs.records import check_records

CERTIFY = "certify"
"""The ``attack`` column of certification records."""


def certify_cell(
    model: nn.Module,
    data: Any,
    rows: Sequence[int],
    config: SmoothingConfig,
    *,
    model_name: str,
    arch: str,
    batch_size: int = 8,
    on_batch: Callable[[int, int], None] | None = None,
) -> pd.DataFrame:
    """Certify the slices ``rows`` of ``data``; records one row per (radius, slice, class).

    Args:
        model: the base model (logits ``(B, K, H, W)``), on its device.
        data: the slices (:class:`advseg.evaluate.SliceSource`: ``index``, ``classes``,
            ``dataset(rows)``).
        rows: positional rows of ``data.index``.
        config: the smoothing settings.
        model_name, arch: the records' ``model`` and ``arch`` columns.
        batch_size: slices per batch (each drawn ``n0 + n`` times).
        on_batch: called with (batches done, batches in all) on this rank.

    Returns:
        Records (:data:`advseg.runs.records.RECORD_COLUMNS`), ordered by radius, slice, class;
        under torch.distributed every rank gets all of them.
    """
    rows = [int(r) for r in rows]
    if not rows:
        raise UserError(f"{model_name}: the split has no slices to certify")
    classes = list(data.classes)
    device = next(model.parameters()).device
    batches = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    mine = list(distributed.shard(range(len(batches))))
    positions = [p for b in mine for p in range(b * batch_size, b * batch_size + len(batches[b]))]
    loader = DataLoader(Subset(data.dataset(rows), positions), batch_size=batch_size)
    frames = []
    for done, (batch_number, batch) in enumerate(zip(mine, loader, strict=True), start=1):
        x = batch["image"].to(device)
        y = batch["mask"].to(device).float() > 0.5  # (B, K, H, W)
        seed = zlib.crc32(f"{config.seed}/{batch_number}".encode())
        generator = torch.Generator(device=device).manual_seed(seed)
        with frozen(model), torch.inference_mode():
            plain = class_prediction(model_logits(model, x).float(), config.activation)
        certificate = certify_batch(model, x, config, generator)
        meta = data.index.iloc[batch["row"].tolist()]
        spacing = pixel_mm(data, batch["row"].tolist())
        frames.append(
            (batch_number, _records(x, y, plain, certificate, config, meta, classes, spacing))
        )
        if on_batch is not None:
            on_batch(done, len(mine))
    frames = [item for part in distributed.gather_objects(frames) for item in part]
    records = pd.concat([f for _, f in sorted(frames, key=lambda t: t[0])], ignore_index=True)
    records = records.sort_values("eps", kind="stable").reset_index(drop=True)
    records.insert(0, "attack", CERTIFY)
    records.insert(0, "params", sum(p.numel() for p in model.parameters()))
    records.insert(0, "arch", arch)
    records.insert(0, "model", model_name)
    return check_records(records)


def _records(
    x: Tensor,
    y: Tensor,
    plain: Tensor,
    certificate: Certificate,
    config: SmoothingConfig,
    meta: pd.DataFrame,
    classes: list[str],
    spacing: np.ndarray | None = None,
) -> pd.DataFrame:
    """One row per (radius, slice, class) of one batch (``spacing``: HD95 in mm, ``(B, 2)``).

    The columns are :func:`advseg.runs.record_rows.slice_records`', as for an attack: ``clean`` is
    the plain prediction, ``adv`` the certified one, with every abstained pixel counted wrong.
    """
    b, k = y.shape[:2]
    pixels = int(np.prod(y.shape[2:]))
    clean = score(plain, y, spacing)
    decision = certificate.decision.cpu().numpy()
    target = y.cpu().numpy()
    lum = luminosity(x).cpu().numpy()  # (B,)
    frames = []
    for radius in config.radii:
        certified = certificate.certified(radius)  # (B, K, H, W)
        right = certified & (decision == target)  # certified and correct; the rest is wrong
        found = torch.from_numpy(certified & decision)  # the certified organ pixels
        adv = Scores(
            tp=(right & target).reshape(b * k, -1).sum(1),
            fp=(~target & ~right).reshape(b * k, -1).sum(1),
            fn=(target & ~right).reshape(b * k, -1).sum(1),
            hd95=hd95(found, y.cpu()).numpy().ravel(),
            hd95_mm=hd95_mm(found, y.cpu(), spacing),
        )
        columns = {
            "loss": config.label,
            "eps": float(radius),
            "linf": np.nan,  # an L2 certificate says nothing of the L-inf norm
            "l2": float(radius),
            "psnr": np.nan,
            "ssim": np.nan,
            "abstained": (~certified).reshape(b * k, -1).sum(1) / pixels,
        }
        frames.append(slice_records(meta, classes, clean, adv, {"luminosity": lum}, **columns))
    return pd.concat(frames, ignore_index=True)


def certify_checkpoint(
    checkpoint: str | Path,
    config: SmoothingConfig,
    *,
    data_path: Path | None = None,
    cache_dir: Path | None = None,
    split: str = "test",
    max_slices: int | None = None,
    batch_size: int = 8,
    device: str = "auto",
    on_batch: Callable[[int, int], None] | None = None,
    on_data: Callable[[Any], None] | None = None,
) -> pd.DataFrame:
    """Certify a checkpoint on its held-out cases (or ``split="all"``); the records.

    The data and split are rebuilt from the checkpoint's metadata as ``advseg evaluate`` does.
    Slices with a mask only (the paper's protocol); with ``max_slices``, that many of them drawn
    (seeded by the checkpoint's split seed) spread over the cases (:func:`advseg.data.spread_rows`).

    Args:
        data_path, cache_dir: ``--data`` and ``--cache-dir``
            (:func:`advseg.train.trained.trained_data_config`).
        on_data: called with the :class:`~advseg.data.DataConfig` before it is loaded (the CLI
            prints :func:`advseg.data.record.first_line`).
    """
    from advseg.data import held_out_rows, load_data, saved_preprocess, spread_rows
    from advseg.models.checkpoint import check_compatible, load_checkpoint
    from advseg.train import resolve_device
    from advseg.train.trained import checkpoint_label, trained_data_config

    if split not in ("test", "all"):
        raise UserError(f"split: {split!r} is not 'test' or 'all'")
    model, meta = load_checkpoint(checkpoint, resolve_device(device))
    config = replace(config, activation=meta.activation)  # the checkpoint's outputs decide
    warn_untrained_noise(meta.train, config.sigma, str(checkpoint))
    preprocess = saved_preprocess(meta.preprocessing, f"{checkpoint} preprocessing")
    if not distributed.is_main():
        distributed.barrier()  # rank 0 fills the preprocessing cache before the others read it
    data_config = trained_data_config(meta.data, Path(checkpoint), preprocess, data_path, cache_dir)
    if on_data is not None:
        on_data(data_config)
    data = load_data(data_config)
    if distributed.is_main():
        distributed.barrier()
    check_compatible(meta, checkpoint, in_channels=preprocess.channels, classes=list(data.classes))
    rows = np.arange(len(data.index))
    if split == "test":
        rows = held_out_rows(data.index, meta.data, str(checkpoint))
    rows = rows[data.masks[rows].reshape(len(rows), -1).any(axis=1)]
    if max_slices is not None:  # seeded by the split's seed, spread over the cases
        rows = spread_rows(data.index, rows, max_slices, int(meta.data.get("split_seed", 0)))
    if len(rows) == 0:
        raise UserError(f"{checkpoint}: the {split} split has no slice with a mask to certify")
    return certify_cell(
        model, data, rows, config, model_name=checkpoint_label(checkpoint), arch=meta.model,
        batch_size=batch_size, on_batch=on_batch,
    )  # fmt: skip


def warn_untrained_noise(train: dict[str, Any], sigma: float, where: str) -> None:
    """Warn (:class:`~advseg.errors.AdvsegWarning`) when a model was not trained with Gaussian
    noise (``train.noise_sigma``) or with another sigma than it is certified under.

    Randomized smoothing certifies the smoothed classifier; a base model never trained on noisy
    images mostly abstains or is wrong under noise, so its certified Dice is near zero and says
    little about the approach (Cohen et al. 2019, Section 4; Fischer et al. 2021).
    """
    trained = float(train.get("noise_sigma") or 0.0)
    if trained == 0:
        warnings.warn(
            AdvsegWarning(
                f"{where}: not trained with Gaussian noise (train.noise_sigma 0); certifying it "
                f"under sigma {sigma:g} measures an untrained smoothed model (expect low "
                f"certified Dice): train with --noise-sigma {sigma:g} to certify a defence"
            ),
            stacklevel=2,
        )
    elif abs(trained - sigma) > 1e-12:
        warnings.warn(
            AdvsegWarning(
                f"{where}: trained with noise sigma {trained:g}, certified under sigma {sigma:g}"
                " (the certificate holds, but a mismatched sigma usually costs Dice)"
            ),
            stacklevel=2,
        )


CERTIFIED_DIR = "certified"
"""The run directory's folder of certification records, beside ``records/`` (attacks)."""


def certified_path(run_dir: str | Path, model_name: str, config: SmoothingConfig) -> Path:
    """Where one (model, sigma)'s certification records go: ``certified/<model>__sigma<s>``."""
    from advseg.runs.names import file_stem

    return Path(run_dir) / CERTIFIED_DIR / f"{file_stem(model_name)}__sigma{config.sigma:g}.parquet"


def read_certified(run_dir: str | Path) -> pd.DataFrame | None:
    """Every certification record of a run (``certified/*.parquet``), or None when it has none."""
    from advseg.runs.records import read_records

    folder = Path(run_dir) / CERTIFIED_DIR
    if not folder.is_dir() or not any(folder.glob("*.parquet")):
        return None
    return read_records(folder)


def certified_summary(records: pd.DataFrame, protocol: str = "per-class") -> pd.DataFrame:
    """Per (model, sigma, radius): the base model's plain DSC, the certified DSC and the mean
    abstention rate over the (slice, class) records, from certification records.

    Columns: ``model, sigma, radius, slices, units, dsc_plain, dsc_certified, abstained``
    (``slices``: the slices certified; ``units``: the protocol's averaging units over them).
    """
    from advseg.stats.summary import summarize_cells

    cells = summarize_cells(records, protocol)
    groups = records.groupby(["model", "loss", "eps"], sort=False)
    abstained, slices = groups["abstained"].mean(), groups["slice_id"].nunique()
    return pd.DataFrame(
        {
            "model": cells["model"],
            "sigma": cells["loss"].str.removeprefix("sigma=").astype(float),
            "radius": cells["eps"],
            "slices": [
                slices[key] for key in zip(cells["model"], cells["loss"], cells["eps"], strict=True)
            ],
            "units": cells["units"],
            "dsc_plain": cells["dsc_clean"],
            "dsc_certified": cells["dsc_adv"],
            "abstained": [
                abstained[key]
                for key in zip(cells["model"], cells["loss"], cells["eps"], strict=True)
            ],
        }
    ).sort_values(["model", "sigma", "radius"], ignore_index=True)
