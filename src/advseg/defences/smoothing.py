"""Randomized-smoothing certification of a segmentation model (SegCertify).

Fischer, Baader & Vechev, ICML 2021, "Scalable Certified Segmentation via Randomized Smoothing",
https://arxiv.org/abs/2107.00228; the single-decision bound is Cohen, Rosenfeld & Kolter, ICML
2019, https://arxiv.org/abs/1902.02918.

The smoothed model decides each (pixel, class) by majority under Gaussian noise of standard
deviation ``sigma`` added to the whole image. Here the outputs are multi-label sigmoids, so each
(pixel, class) is one binary decision (organ / no organ; a softmax model's argmax gives the same
binary decisions). For one image ``x`` ``(C, H, W)``:

1. selection: ``n0`` noisy forwards; each (pixel, class) takes the majority decision ``c``;
2. estimation: ``n`` fresh noisy forwards; ``k`` = how often each (pixel, class) decided ``c``;
3. for an L2 radius ``R`` the threshold is ``tau = Phi(R / sigma)``: a decision whose true
   probability ``p`` exceeds ``tau`` cannot change under any perturbation of L2 norm below ``R``
   (Cohen et al., Theorem 1). The one-sided binomial test of ``p <= tau`` gives a p-value per
   (pixel, class); the Holm-Bonferroni procedure over all of the image's (pixel, class) tests
   keeps the family-wise error at ``alpha``: the rejected ones are *certified*, the others
   *abstain*. ``R = 0`` (``tau = 1/2``) certifies the majority decision itself.

Per slice and class, the certified Dice at ``R`` counts every abstained pixel as wrong (a
foreground pixel that abstains is a false negative, a background one a false positive). The
per-pixel radius ``sigma * Phi^-1(p_lower)`` with the Clopper-Pearson lower bound is given too
(:func:`certified_radius`, Bonferroni-corrected in :attr:`Certificate.radius`).

Records use the one records format (:data:`advseg.records.RECORD_COLUMNS`): ``attack`` is
``certify``, ``loss`` is ``sigma=<sigma>``, ``eps`` is the L2 radius ``R``; the ``clean`` counts are
the base model's plain prediction, the ``adv`` counts the certified prediction at ``R``, and
``abstained`` is the share of the slice's pixels that abstained for that class.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy import stats
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

from advseg import distributed
from advseg.attacks import frozen, model_logits
from advseg.errors import UserError
from advseg.labels import class_prediction
from advseg.metrics import hd95, luminosity
from advseg.record_rows import Scores, hd95_mm, pixel_mm, score, slice_records
from advseg.records import check_records

CERTIFY = "certify"
"""The ``attack`` column of certification records."""


@dataclass
class SmoothingConfig:
    """Settings of the certification.

    Attributes:
        sigma: standard deviation of the Gaussian noise (image units, range [0, 1]).
        n0: noisy forwards that select each decision.
        n: noisy forwards that estimate its probability.
        alpha: family-wise error rate per image (Holm-Bonferroni over its pixel decisions).
        radii: the L2 radii at which certified Dice is recorded.
        samples_per_forward: noisy copies per forward pass (memory vs speed).
        seed: seeds the noise (per batch of slices, so shards draw what one process draws).
        activation: ``sigmoid`` (multi-label) or ``softmax``: how logits become decisions
            (:func:`advseg.labels.class_prediction`: per class, a softmax model's background
            dropped, so each (pixel, class) decision is the binary event "the base model
            predicts this class here", certified as for sigmoid). :func:`certify_checkpoint`
            takes the checkpoint's own.
    """

    sigma: float = 0.25
    n0: int = 16
    n: int = 128
    alpha: float = 0.001
    radii: list[float] = field(default_factory=lambda: [0.0, 0.1, 0.2])
    samples_per_forward: int = 32
    seed: int = 0
    activation: str = "sigmoid"

    def __post_init__(self) -> None:
        if not math.isfinite(self.sigma) or self.sigma <= 0:
            raise UserError(f"sigma: must be a number > 0, got {self.sigma}")
        for name in ("n0", "n", "samples_per_forward"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"{name}: must be an integer >= 1, got {value!r}")
        if not 0 < self.alpha < 1:
            raise UserError(f"alpha: must be in (0, 1), got {self.alpha}")
        if not self.radii:
            raise UserError("radii: at least one radius is needed")
        for radius in self.radii:
            if not math.isfinite(radius) or radius < 0:
                raise UserError(f"radii: {radius} is not a radius >= 0")
        if self.activation not in ("sigmoid", "softmax"):
            raise UserError(f"activation: {self.activation!r} is not sigmoid or softmax")

    @property
    def label(self) -> str:
        """The records' ``loss`` column, e.g. ``sigma=0.25``."""
        return f"sigma={self.sigma:g}"


def binomial_pvalue(counts: np.ndarray, n: int, tau: float) -> np.ndarray:
    """One-sided p-values of ``p <= tau`` having produced ``counts`` successes in ``n`` trials:
    ``P(X >= counts)`` for ``X ~ Binomial(n, tau)``."""
    return stats.binom.sf(np.asarray(counts) - 1, n, tau)


def holm_bonferroni(pvalues: np.ndarray, alpha: float) -> np.ndarray:
    """Holm's step-down procedure (Holm 1979): which null hypotheses are rejected, same shape.

    The p-values are sorted ascending; the ``i``-th (0-based) of ``m`` is rejected while
    ``p_(i) <= alpha / (m - i)``, and the first one that is not stops the procedure.
    The family-wise error rate stays at most ``alpha``.
    """
    flat = np.asarray(pvalues, dtype=np.float64).ravel()
    m = flat.size
    order = np.argsort(flat, kind="stable")
    passes = flat[order] <= alpha / (m - np.arange(m))
    stop = m if passes.all() else int(np.argmin(passes))  # first failure
    rejected = np.zeros(m, dtype=bool)
    rejected[order[:stop]] = True
    return rejected.reshape(np.shape(pvalues))


def clopper_pearson_lower(counts: np.ndarray, n: int, alpha: float) -> np.ndarray:
    """The one-sided ``1 - alpha`` Clopper-Pearson lower bound of a binomial proportion."""
    counts = np.asarray(counts)
    bound = stats.beta.ppf(alpha, np.maximum(counts, 1), n - counts + 1)
    return np.where(counts > 0, bound, 0.0)


def certified_radius(p_lower: np.ndarray, sigma: float) -> np.ndarray:
    """``sigma * Phi^-1(p_lower)`` (Cohen et al., Theorem 1); 0 where ``p_lower <= 1/2``
    (no certificate: the smoothed decision abstains)."""
    radius = sigma * stats.norm.ppf(np.asarray(p_lower, dtype=np.float64))
    return np.where(np.asarray(p_lower) > 0.5, radius, 0.0)


def noisy_votes(
    model: nn.Module,
    x: Tensor,
    sigma: float,
    samples: int,
    generator: torch.Generator,
    *,
    per_forward: int = 32,
    activation: str = "sigmoid",
) -> Tensor:
    """How often each (pixel, class) is predicted under ``samples`` draws of noise.

    Args:
        x: images ``(B, C, H, W)``.

    Returns:
        ``(B, K, H, W)`` int64 counts in ``0..samples``.
    """
    b = x.shape[0]
    votes = None
    done = 0
    with frozen(model), torch.inference_mode():
        while done < samples:
            s = min(per_forward, samples - done)
            copies = x.repeat(s, 1, 1, 1)  # (s * B, C, H, W), sample-major
            noise = torch.randn(copies.shape, generator=generator, device=x.device)
            logits = model_logits(model, copies + sigma * noise.to(x.dtype)).float()
            decided = class_prediction(logits, activation)  # (s * B, K, H, W)
            decided = decided.view(s, b, *decided.shape[1:])
            counts = decided.sum(0, dtype=torch.int64)  # (B, K, H, W)
            votes = counts if votes is None else votes + counts
            done += s
    return votes


@dataclass
class Certificate:
    """The smoothed decisions of a batch and their estimation counts.

    Attributes:
        decision: ``(B, K, H, W)`` bool, the majority decision chosen on the ``n0`` draws.
        counts: ``(B, K, H, W)`` int, how often the ``n`` estimation draws agreed with it.
        n, sigma, alpha: the estimation draws, the noise and the error rate.
    """

    decision: Tensor
    counts: Tensor
    n: int
    sigma: float
    alpha: float

    def certified(self, radius: float) -> np.ndarray:
        """``(B, K, H, W)`` bool: the decisions certified at L2 ``radius`` (Holm per image)."""
        tau = float(stats.norm.cdf(radius / self.sigma))
        pvalues = binomial_pvalue(self.counts.cpu().numpy(), self.n, tau)
        return np.stack([holm_bonferroni(p, self.alpha) for p in pvalues])

    @property
    def radius(self) -> np.ndarray:
        """``(B, K, H, W)``: each decision's certified radius, with Clopper-Pearson bounds at
        ``alpha / (K H W)`` (Bonferroni), so that all of an image's radii hold together; 0 means
        no certificate."""
        counts = self.counts.cpu().numpy()
        m = int(np.prod(counts.shape[1:]))
        return certified_radius(clopper_pearson_lower(counts, self.n, self.alpha / m), self.sigma)


def certify_batch(
    model: nn.Module, x: Tensor, config: SmoothingConfig, generator: torch.Generator
) -> Certificate:
    """SegCertify on a batch of images ``(B, C, H, W)``: selection, then estimation draws."""
    draw = dict(per_forward=config.samples_per_forward, activation=config.activation)
    selection = noisy_votes(model, x, config.sigma, config.n0, generator, **draw)
    decision = 2 * selection > config.n0  # (B, K, H, W); a tie decides "no organ"
    on = noisy_votes(model, x, config.sigma, config.n, generator, **draw)
    counts = torch.where(decision, on, config.n - on)
    return Certificate(decision, counts, config.n, config.sigma, config.alpha)


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
        Records (:data:`advseg.records.RECORD_COLUMNS`), ordered by radius, slice, class;
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

    The columns are :func:`advseg.record_rows.slice_records`', as for an attack: ``clean`` is
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
            (:func:`advseg.trained.trained_data_config`).
        on_data: called with the :class:`~advseg.data.DataConfig` before it is loaded (the CLI
            prints :func:`advseg.data.location.first_line`).
    """
    from advseg.data import load_data, saved_preprocess, split_cases, spread_rows
    from advseg.models.checkpoint import check_compatible, load_checkpoint
    from advseg.train import resolve_device
    from advseg.trained import checkpoint_label, trained_data_config

    if split not in ("test", "all"):
        raise UserError(f"split: {split!r} is not 'test' or 'all'")
    model, meta = load_checkpoint(checkpoint, resolve_device(device))
    config = replace(config, activation=meta.activation)  # the checkpoint's outputs decide
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
        if "test_fraction" not in meta.data or "split_seed" not in meta.data:
            raise UserError(
                f"{checkpoint}: its metadata does not say which cases it held out; use --split all"
            )
        _, rows = split_cases(data.index, meta.data["test_fraction"], meta.data["split_seed"])
    rows = rows[data.masks[rows].reshape(len(rows), -1).any(axis=1)]
    if max_slices is not None:  # seeded by the split's seed, spread over the cases
        rows = spread_rows(data.index, rows, max_slices, int(meta.data.get("split_seed", 0)))
    if len(rows) == 0:
        raise UserError(f"{checkpoint}: the {split} split has no slice with a mask to certify")
    return certify_cell(
        model, data, rows, config, model_name=checkpoint_label(checkpoint), arch=meta.model,
        batch_size=batch_size, on_batch=on_batch,
    )  # fmt: skip


CERTIFIED_DIR = "certified"
"""The run directory's folder of certification records, beside ``records/`` (attacks)."""


def certified_path(run_dir: str | Path, model_name: str, config: SmoothingConfig) -> Path:
    """Where one (model, sigma)'s certification records go: ``certified/<model>__sigma<s>``."""
    from advseg.report.tables import file_stem

    return Path(run_dir) / CERTIFIED_DIR / f"{file_stem(model_name)}__sigma{config.sigma:g}.parquet"


def read_certified(run_dir: str | Path) -> pd.DataFrame | None:
    """Every certification record of a run (``certified/*.parquet``), or None when it has none."""
    from advseg.records import read_records

    folder = Path(run_dir) / CERTIFIED_DIR
    if not folder.is_dir() or not any(folder.glob("*.parquet")):
        return None
    return read_records(folder)


def certified_summary(records: pd.DataFrame, protocol: str = "per-class") -> pd.DataFrame:
    """Per (model, sigma, radius): the base model's plain DSC, the certified DSC and the mean
    abstention rate over the (slice, class) records, from certification records.

    Columns: ``model, sigma, radius, units, dsc_plain, dsc_certified, abstained``.
    """
    from advseg.summary import summarize_cells

    cells = summarize_cells(records, protocol)
    abstained = records.groupby(["model", "loss", "eps"], sort=False)["abstained"].mean()
    return pd.DataFrame(
        {
            "model": cells["model"],
            "sigma": cells["loss"].str.removeprefix("sigma=").astype(float),
            "radius": cells["eps"],
            "units": cells["units"],
            "dsc_plain": cells["dsc_clean"],
            "dsc_certified": cells["dsc_adv"],
            "abstained": [
                abstained[key]
                for key in zip(cells["model"], cells["loss"], cells["eps"], strict=True)
            ],
        }
    ).sort_values(["model", "sigma", "radius"], ignore_index=True)
