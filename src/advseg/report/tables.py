"""The report's tables, every one computed from records.

Table II and every DSC / Attack Success number come from :func:`advseg.stats.summary.summarize`
(the one implementation of the paper's Dice protocols); this module only selects the records it is
given (one eps, one class, one (attack, loss, eps) cell) and reshapes its answer. The per-slice
table for the luminosity question is the one computation done here, and it says what it leaves out.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from advseg.metrics import attack_success
from advseg.report.stats import correlate
from advseg.stats.summary import summarize, summarize_cells


def headline_eps(records: pd.DataFrame) -> float:
    """The eps the main table reports: the one with the most (model, attack, loss) results.

    A paper-style run evaluates every loss at one eps and sweeps eps for fewer losses; the eps
    shared by the most results is then the paper's. Ties go to the smallest eps.
    """
    counts = records.drop_duplicates(["model", "attack", "loss", "eps"]).groupby("eps").size()
    return float(counts[counts == counts.max()].index.min())


def table_ii(records: pd.DataFrame, protocol: str, eps: float) -> pd.DataFrame:
    """The paper's Table II at one eps, exactly as :func:`summarize` computes it."""
    return summarize(records[records["eps"] == eps], protocol)


def cells_table(records: pd.DataFrame, protocol: str) -> pd.DataFrame:
    """One row per (model, attack, loss, eps): ``dsc_clean``, ``dsc_adv``, ``attack_success``.

    The numbers are :func:`summarize_cells`', the same ones Table II shows.
    """
    return summarize_cells(records, protocol).rename(columns={"as": "attack_success"})


HD95_HEADERS = {
    "hd95_clean": "HD95 clean (px)",
    "hd95_adv": "HD95 adv (px)",
    "hd95_mm_clean": "HD95 clean (mm)",
    "hd95_mm_adv": "HD95 adv (mm)",
    "hd95_pairs": "HD95 pairs",
    "hd95_excluded": "HD95 excluded",
}
"""Display headers of the HD95 columns, with their units: model pixels, and millimetres."""


def with_units(cells: pd.DataFrame) -> pd.DataFrame:
    """``cells`` with HD95 headers naming their units (:data:`HD95_HEADERS`); the mm columns
    are dropped where no record has a millimetre value (records from before pixel spacings)."""
    mm = [c for c in ("hd95_mm_clean", "hd95_mm_adv") if c in cells.columns]
    if mm and cells[mm].isna().all().all():
        cells = cells.drop(columns=mm)
    return cells.rename(columns=HD95_HEADERS)


def per_class_table(records: pd.DataFrame, protocol: str, eps: float) -> pd.DataFrame:
    """Table II for each class on its own (large bowel, small bowel, stomach), at one eps."""
    frames = []
    for name, frame in records[records["eps"] == eps].groupby("class", sort=False):
        table = summarize(frame, protocol)
        table.insert(1, "class", name)
        frames.append(table)
    return pd.concat(frames, ignore_index=True)


@dataclass(frozen=True)
class SliceTable:
    """Per-slice DSC and Attack Success, with what was left out and why.

    Attributes:
        slices: one row per (model, attack, loss, eps, slice): ``luminosity``, ``dsc_clean``,
            ``dsc_adv``, ``attack_success``.
        no_ground_truth: slices left out because no class has a mask there.
        clean_zero: slices left out because their clean DSC is 0 (Attack Success undefined).
    """

    slices: pd.DataFrame
    no_ground_truth: int
    clean_zero: int


def slice_table(records: pd.DataFrame) -> SliceTable:
    """Per-slice DSC (mean over the classes present in the ground truth) and Attack Success.

    A slice's Attack Success is ``(DSC_clean - DSC_adv) / DSC_clean``, the paper's definition
    applied to one slice, so that it can be set against that slice's luminosity.
    """
    keys = ["model", "attack", "loss", "eps", "slice_id"]
    present = records[records["gt_pixels"] > 0]
    per_slice = (
        present.groupby(keys, sort=True)
        .agg(
            case=("case", "first"),
            luminosity=("luminosity", "first"),
            dsc_clean=("dice_clean", "mean"),
            dsc_adv=("dice_adv", "mean"),
        )
        .reset_index()
    )
    everything = records[keys].drop_duplicates()
    no_gt = len(everything) - len(per_slice)
    defined = per_slice[per_slice["dsc_clean"] > 0].copy()
    defined["attack_success"] = attack_success(defined["dsc_clean"], defined["dsc_adv"])
    return SliceTable(
        defined.reset_index(drop=True),
        no_ground_truth=no_gt,
        clean_zero=len(per_slice) - len(defined),
    )


def correlation_table(
    points: pd.DataFrame, by: list[str], x: str, y: str = "attack_success"
) -> pd.DataFrame:
    """Pearson and Spearman of ``y`` against ``x`` within each group of ``by``."""
    rows = []
    for key, frame in points.groupby(by, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        stat = correlate(frame[x], frame[y], names=(x, y))
        rows.append({**dict(zip(by, key, strict=True)), **stat.as_row()})
    return pd.DataFrame(rows)
