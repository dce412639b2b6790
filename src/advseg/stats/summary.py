"""The paper's Table II, computed from records: the one implementation of it.

Records hold pixel counts (``tp``, ``fp``, ``fn`` per slice and class, clean and adversarial), so
every Dice protocol is recomputed here without a model. Empty masks are the disputed part of
segmentation Dice; the protocol names how they are treated:

``paper``
    As the paper's code: per slice, the mean over the classes of
    ``(2 tp + 1e-5) / (2 tp + fp + fn + 1e-5)`` (1 - MONAI ``DiceLoss`` with its smoothing, hard
    predictions), averaged over the slices with any ground-truth mask. A class empty in both the
    mask and the prediction counts as 1, a class with only false positives as about 0.
``per-class``
    The mean of ``2 tp / (2 tp + fp + fn)`` over the (slice, class) pairs whose ground truth is
    not empty. Pairs with an empty ground truth are excluded (and counted).
``global``
    Micro Dice per class (``tp``, ``fp``, ``fn`` summed over every slice), then the mean over the
    classes. A class with no ground truth anywhere is excluded (and counted).

Units are chosen by the ground truth only, so the clean and the adversarial DSC of a cell always
average the same units.

Attack Success is ``(DSC_clean - DSC_adv) / DSC_clean`` on the same units (the paper's AS).

Example:
    >>> table = summarize(read_records("runs/demo"), protocol="paper")
    >>> table.columns[:6].tolist()
    ['model', 'arch', 'params', 'units', 'excluded', 'DSC clean']
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pandas as pd

from advseg.catalogue import DEFAULT_PROTOCOL, PROTOCOLS  # noqa: F401 (named here too)
from advseg.errors import UserError
from advseg.metrics import PAPER_SMOOTH, attack_success, dice_from_counts

Protocol = Literal["paper", "per-class", "global"]
UNITS: dict[str, tuple[str, str]] = {
    "paper": ("slices with a mask", "slices without"),
    "per-class": ("(slice, class) pairs with a mask", "pairs without"),
    "global": ("classes with a mask", "classes without"),
}
"""What each protocol averages (``units``) and what it leaves out (``excluded``)."""

MODEL_KEYS = ["model", "arch", "params"]
CELL_KEYS = ["attack", "loss", "eps"]
CELL_COLUMNS = [*MODEL_KEYS, *CELL_KEYS, "units", "excluded", "dsc_clean", "dsc_adv", "as"]
HD95_COLUMNS = [
    "hd95_clean",
    "hd95_adv",
    "hd95_pairs",
    "hd95_excluded",
    "hd95_mm_clean",
    "hd95_mm_adv",
]


def _check_protocol(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise UserError(f"unknown Dice protocol {protocol!r}; valid: {', '.join(PROTOCOLS)}")


def protocol_dice(group: pd.DataFrame, protocol: str, which: str) -> tuple[float, int, int]:
    """Dice of one group of records (one model and cell) under a protocol.

    Args:
        group: records of one (model, attack, loss, eps) cell.
        protocol: ``paper``, ``per-class`` or ``global``.
        which: ``clean`` or ``adv``, the prediction to score.

    Returns:
        ``(dice, units, excluded)``: the Dice (NaN when no unit is left), the number of units
        averaged (slices, (slice, class) pairs or classes) and the number excluded.
    """
    _check_protocol(protocol)
    tp = group[f"tp_{which}"].to_numpy(np.float64)
    fp = group[f"fp_{which}"].to_numpy(np.float64)
    fn = group[f"fn_{which}"].to_numpy(np.float64)
    if protocol == "per-class":
        keep = group["gt_pixels"].to_numpy() > 0
        values = dice_from_counts(tp[keep], fp[keep], fn[keep])
        return _mean(values), int(keep.sum()), int((~keep).sum())
    if protocol == "paper":
        per_pair = group.assign(_dice=dice_from_counts(tp, fp, fn, smooth=PAPER_SMOOTH))
        per_slice = per_pair.groupby("slice_id", sort=False).agg(
            dice=("_dice", "mean"), gt=("gt_pixels", "sum")
        )
        keep = per_slice["gt"].to_numpy() > 0
        return _mean(per_slice["dice"].to_numpy()[keep]), int(keep.sum()), int((~keep).sum())
    sums = (
        pd.DataFrame({"class": group["class"].to_numpy(), "tp": tp, "fp": fp, "fn": fn})
        .assign(gt=group["gt_pixels"].to_numpy())
        .groupby("class", sort=False)
        .sum()
    )
    keep = sums["gt"].to_numpy() > 0
    values = dice_from_counts(*(sums[c].to_numpy()[keep] for c in ("tp", "fp", "fn")))
    return _mean(values), int(keep.sum()), int((~keep).sum())


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if values.size else float("nan")


def summarize_cells(records: pd.DataFrame, protocol: Protocol = "per-class") -> pd.DataFrame:
    """One row per (model, attack, loss, eps): clean and adversarial DSC and Attack Success.

    Args:
        records: rows in the :data:`advseg.runs.records.RECORD_COLUMNS` format.
        protocol: the Dice protocol (see the module docstring).

    Returns:
        Columns ``model, arch, params, attack, loss, eps, units, excluded, dsc_clean, dsc_adv,
        as``; ``units`` / ``excluded`` count what the protocol averaged and left out. Then
        ``hd95_clean, hd95_adv, hd95_pairs, hd95_excluded, hd95_mm_clean, hd95_mm_adv`` from
        :func:`hd95_means`. When the records hold several training seeds (a grid's ``seeds:``),
        every number is the mean over the seeds of that seed's number, and :data:`SEED_COLUMNS`
        follow: ``seeds`` and the standard deviations over seeds ``dsc_clean_sd``,
        ``dsc_adv_sd``, ``as_sd``.

    Raises:
        UserError: unknown protocol or no records.
    """
    _check_protocol(protocol)
    if records.empty:
        raise UserError("records: nothing to summarize (no rows)")
    if training_seeds(records) > 1:
        return _over_seeds(records, protocol)
    rows = []
    for keys, group in records.groupby([*MODEL_KEYS, *CELL_KEYS], sort=False):
        clean, units, excluded = protocol_dice(group, protocol, "clean")
        adv, _, _ = protocol_dice(group, protocol, "adv")
        success = float(attack_success(clean, adv))
        rows.append([*keys, units, excluded, clean, adv, success, *hd95_means(group)])
    return pd.DataFrame(rows, columns=CELL_COLUMNS + HD95_COLUMNS)


def training_seeds(records: pd.DataFrame) -> int:
    """How many training seeds the records hold (their ``seed`` column; 1 without one)."""
    return int(records["seed"].nunique()) if "seed" in records.columns else 1


SEED_COLUMNS = ["seeds", "dsc_clean_sd", "dsc_adv_sd", "as_sd"]
"""Columns :func:`summarize_cells` adds when the records hold several training seeds."""


def _over_seeds(records: pd.DataFrame, protocol: Protocol) -> pd.DataFrame:
    """Each cell's numbers as the mean over training seeds of the per-seed numbers, with the
    standard deviation over seeds (``*_sd``, NaN for a model of one seed) and ``seeds``."""
    per_seed = pd.concat(
        [summarize_cells(g, protocol).assign(seed=k) for k, g in records.groupby("seed")],
        ignore_index=True,
    )
    keys = [*MODEL_KEYS, *CELL_KEYS]
    order = records[keys].drop_duplicates().set_index(keys).index
    grouped = per_seed.groupby(keys, sort=False)
    numbers = ["dsc_clean", "dsc_adv", "as", "hd95_clean", "hd95_adv"]
    numbers += ["hd95_mm_clean", "hd95_mm_adv"]
    table = grouped[numbers].mean()
    counts = grouped[["units", "excluded", "hd95_pairs", "hd95_excluded"]].first()
    sds = grouped[["dsc_clean", "dsc_adv", "as"]].std().add_suffix("_sd")
    table = pd.concat([table, counts, sds, grouped["seed"].nunique().rename("seeds")], axis=1)
    table = table.reindex(order).reset_index()
    return table[CELL_COLUMNS + HD95_COLUMNS + SEED_COLUMNS]


def hd95_means(group: pd.DataFrame) -> tuple[float, float, int, int, float, float]:
    """Mean clean and adversarial HD95 over the organs present, where both are defined: in
    pixels (at the model's resolution) and in millimetres.

    Only (slice, class) pairs with a ground-truth mask enter: a pair empty in the ground truth
    has no boundary to miss (a hallucinated organ there shows in Dice instead), and its 0 for an
    empty prediction would dilute the mean. Among them, a pair whose clean or adversarial
    prediction vanished has no HD95 (NaN in the records, :func:`advseg.metrics.hd95`): it is
    excluded and counted, so ``excluded`` is how often the organ disappeared. The mm means take
    the same pairs (NaN for records written before HD95 in mm existed).

    Returns:
        ``(hd95_clean, hd95_adv, pairs, excluded, hd95_mm_clean, hd95_mm_adv)``; the means are
        NaN when no pair is left.
    """
    present = group[group["gt_pixels"] > 0]
    clean, adv = present["hd95_clean"].to_numpy(), present["hd95_adv"].to_numpy()
    keep = np.isfinite(clean) & np.isfinite(adv)
    mm = [
        _mean(present[c].to_numpy()[keep]) if c in present.columns else float("nan")
        for c in ("hd95_mm_clean", "hd95_mm_adv")
    ]
    return _mean(clean[keep]), _mean(adv[keep]), int(keep.sum()), int((~keep).sum()), *mm


def cell_label(attack: str, loss: str, eps: float) -> str:
    """The column label of one attack cell in Table II, e.g. ``fgsm bce eps=0.009``."""
    return f"{attack} {loss} eps={eps:g}"


def summarize(records: pd.DataFrame, protocol: Protocol = "per-class") -> pd.DataFrame:
    """The paper's Table II: one row per model, clean DSC, DSC and AS under each attack cell.

    Clean DSC is computed once per model over its distinct (slice, class) records (every cell of
    one model sees the same clean prediction); the AS of a cell uses that cell's own clean DSC.

    Args:
        records: rows in the :data:`advseg.runs.records.RECORD_COLUMNS` format.
        protocol: ``paper``, ``per-class`` or ``global`` (see the module docstring).

    Returns:
        Columns ``model, arch, params, units, excluded, DSC clean``, then for each
        (attack, loss, eps) in the order first seen ``DSC <cell>`` and ``AS <cell>`` with
        ``<cell>`` from :func:`cell_label`. ``units`` / ``excluded`` count what the clean DSC
        averaged and left out under the protocol. ``attrs["protocol"]`` names the protocol.
    """
    cells = summarize_cells(records, protocol)
    models = []
    seeded = training_seeds(records) > 1
    for keys, group in records.groupby(MODEL_KEYS, sort=False):
        parts = [g for _, g in group.groupby("seed")] if seeded else [group]
        per_seed = [
            protocol_dice(g.drop_duplicates(["slice_id", "class"]), protocol, "clean")
            for g in parts
        ]  # with seeds: the mean over seeds of each seed's clean DSC
        clean = float(np.mean([value for value, _, _ in per_seed]))
        _, units, excluded = per_seed[0]
        models.append([*keys, units, excluded, clean])
    table = pd.DataFrame(models, columns=[*MODEL_KEYS, "units", "excluded", "DSC clean"])
    for (attack, loss, eps), cell in cells.groupby(CELL_KEYS, sort=False):
        label = cell_label(attack, loss, eps)
        values = cell.set_index(MODEL_KEYS)[["dsc_adv", "as"]]
        values.columns = [f"DSC {label}", f"AS {label}"]
        table = table.merge(values, left_on=MODEL_KEYS, right_index=True, how="left")
    table.attrs["protocol"] = protocol
    return table.reset_index(drop=True)
