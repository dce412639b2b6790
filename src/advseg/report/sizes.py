"""Robustness by structure size: the Dice drop against the size of the structure, per class and
size bin, from the per-slice records.

Small structures break first under attack (Halmosi et al., ECCV 2024): a slice where a class
covers a few pixels loses them to a few flipped pixels, a large one does not. Here the
size of a structure is its truth pixel count on the slice (the records' ``gt_pixels``, in the
evaluated image's pixels), and only slices where the class is present (``gt_pixels > 0``) count:
there a slice's Dice is defined.

Size bins are the quantiles of the present structures' sizes over all classes and cells together
(:func:`size_edges`), so every class and model is binned on the same pixel ranges and each bin
holds about as many structures. Each row is the mean over slices of the per-slice Dice (clean,
under the attack or corruption) and of their difference (the drop): the per-slice view, not the
report's pooled Dice protocols, because size is a property of a slice.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from advseg.report.html import Section

ALL_CLASSES = "all"
"""The ``class`` of the rows pooling every class."""

COLUMNS = ["model", "class", "bin", "pixels", "slices", "dsc_clean", "dsc_adv", "drop"]


def size_edges(gt_pixels: pd.Series | np.ndarray, bins: int = 4) -> np.ndarray:
    """Bin edges (pixels) splitting the present structures' sizes into ``bins`` quantile bins.

    Edges are rounded to whole pixels and repeated ones dropped (fewer bins when many
    structures share a size). The first edge is 0, the last the largest size: bin ``i`` holds
    sizes in ``(edges[i], edges[i + 1]]``.
    """
    sizes = np.asarray(gt_pixels, dtype=float)
    sizes = sizes[sizes > 0]
    if sizes.size == 0:
        return np.array([0.0])
    inner = np.round(np.quantile(sizes, np.linspace(0, 1, bins + 1)[1:-1]))
    return np.unique(np.concatenate([[0.0], inner, [sizes.max()]]))


def size_table(
    records: pd.DataFrame, bins: int = 4, edges: np.ndarray | None = None
) -> pd.DataFrame:
    """Mean per-slice Dice clean / adversarial and the drop, per (model, class, size bin).

    Args:
        records: records (one or many cells of each model; their slices pooled per model).
        bins: quantile bins when ``edges`` is None (:func:`size_edges` of these records).
        edges: bin edges in pixels (bin ``i`` = ``(edges[i], edges[i + 1]]``).

    Returns:
        :data:`COLUMNS`: ``bin`` (0 the smallest), ``pixels`` (the bin's range, e.g.
        ``"(12, 40]"``), ``slices`` (records in the bin: slice x class x cell), ``dsc_clean``,
        ``dsc_adv``, ``drop`` (``dsc_clean - dsc_adv``); a class ``all`` row per model and bin
        pools the classes. Empty when no structure is present.
    """
    present = records[records["gt_pixels"] > 0]
    if edges is None:
        edges = size_edges(present["gt_pixels"], bins)
    if present.empty or len(edges) < 2:
        return pd.DataFrame(columns=COLUMNS)
    index = np.searchsorted(edges, present["gt_pixels"].to_numpy(float), side="left") - 1
    frame = present.assign(bin=np.clip(index, 0, len(edges) - 2))
    frame = frame.assign(drop=frame["dice_clean"] - frame["dice_adv"])
    labels = [f"({edges[i]:.0f}, {edges[i + 1]:.0f}]" for i in range(len(edges) - 1)]
    rows = []
    for pooled in (False, True):
        keys = ["model", "bin"] if pooled else ["model", "class", "bin"]
        for key, group in frame.groupby(keys, sort=False):
            model, *rest = key
            name, level = (ALL_CLASSES, rest[0]) if pooled else rest
            rows.append({
                "model": model, "class": name, "bin": int(level), "pixels": labels[int(level)],
                "slices": len(group), "dsc_clean": float(group["dice_clean"].mean()),
                "dsc_adv": float(group["dice_adv"].mean()), "drop": float(group["drop"].mean()),
            })  # fmt: skip
    table = pd.DataFrame(rows, columns=COLUMNS)
    order = {name: i for i, name in enumerate(dict.fromkeys(records["class"]))}
    order[ALL_CLASSES] = len(order)
    table = table.assign(_c=table["class"].map(order))
    table = table.sort_values(["model", "_c", "bin"], kind="stable").drop(columns="_c")
    return table.reset_index(drop=True)


def drop_by_size(table: pd.DataFrame, title: str) -> Any:
    """A figure: the mean Dice drop per size bin, one line per class, one panel per model."""
    from advseg.report.figures import legend_beside, panel_grid

    models = list(dict.fromkeys(table["model"]))
    figure, axes = panel_grid(len(models))
    labels = table.drop_duplicates("bin").sort_values("bin")["pixels"].tolist()
    for ax, model in zip(axes, models, strict=False):
        part = table[table["model"] == model]
        for name, line in part.groupby("class", sort=False):
            style = {"color": "black", "linewidth": 2.5} if name == ALL_CLASSES else {}
            ax.plot(line["bin"], line["drop"], marker="o", label=name, **style)
        ax.set_title(f"{model}: {title}")
        ax.set_xticks(range(len(labels)), labels, rotation=30, fontsize=8)
        ax.set_xlabel("structure size (truth pixels on the slice)")
        ax.set_ylabel("Dice drop (clean - attacked)")
        ax.axhline(0, color="grey", linewidth=0.5)
    legend_beside(axes[0])
    return figure


def sections(
    writer: Any, attacked: pd.DataFrame, corrupted: pd.DataFrame, eps: float, bins: int = 4
) -> list[Section]:
    """The report's "Robustness by structure size" section: for the attack cells at the
    headline ``eps`` and for the corruption cells (each pooled per model), a table and a figure;
    none when neither has a present structure. ``attacked``: the white-box attack records."""
    parts = [
        ("attacks", f"the attack cells at eps {eps:g}", attacked[attacked["eps"] == eps]),
        ("corruptions", "the corruption cells (every corruption and severity)", corrupted),
    ]
    present = pd.concat([frame for _, _, frame in parts])
    edges = size_edges(present.loc[present["gt_pixels"] > 0, "gt_pixels"], bins)
    section = Section("Robustness by structure size")
    for name, what, frame in parts:
        table = size_table(frame, edges=edges)
        if table.empty:
            continue
        section.blocks.append(writer.table(
            f"size_{name}", table,
            f"Dice drop by structure size, {what}, pooled per model: the structure's truth "
            f"pixels on the slice, in {len(edges) - 1} quantile bins of the present structures "
            "(slices where the class is absent left out); mean per-slice Dice clean and "
            "attacked, and their difference. Small structures break first (Halmosi et al., "
            "ECCV 2024).",
        ))  # fmt: skip
        section.blocks.append(writer.figure(
            f"size_{name}", drop_by_size(table, name),
            f"Mean Dice drop against structure size, {what}: one line per class, 'all' pooled.",
        ))  # fmt: skip
    return [section] if section.blocks else []
