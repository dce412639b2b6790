"""The report's figures, drawn with matplotlib (Agg backend) from tables built out of records.

Every function takes plain DataFrames (or saved example arrays) and returns a
:class:`matplotlib.figure.Figure`; writing PNG files and embedding them is the caller's job. Each
figure has axis labels with units and a legend. The long "cells" table used here has one row per
(model, attack, loss, eps) with columns ``model, params, attack, loss, eps, dsc_clean, dsc_adv,
attack_success`` (see :func:`advseg.report.tables.cells_table`).
"""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from advseg.data.index import ID_PATTERN
from advseg.data.split import spread_positions
from advseg.report.stats import Correlation

CLASS_COLOURS = [
    (1.0, 0.55, 0.0), (0.0, 0.8, 0.9), (0.85, 0.2, 0.85), (1.0, 0.9, 0.0), (0.2, 0.85, 0.3),
    (0.95, 0.3, 0.35), (0.45, 0.5, 1.0), (0.6, 0.4, 0.2),
]  # fmt: skip
"""One colour per class (in channel order), the same in ground truth and prediction panels."""
ERROR_COLOUR = (1.0, 0.0, 0.0)
"""The outline of the pixels a prediction gets wrong (any class)."""
ALPHA = 0.55


def panel_rows(slice_ids: np.ndarray | list[str], count: int, seed: int = 0) -> np.ndarray:
    """Positions of ``count`` saved example slices for a panel: seeded, spread over the cases
    named in their ids (``case{N}_day{M}_slice_{XXXX}``; an id of another form is its own case)."""
    cases = []
    for slice_id in map(str, slice_ids):
        match = ID_PATTERN.match(slice_id)
        cases.append(f"case{match.group(1)}" if match else slice_id)
    return spread_positions(np.asarray(cases), count, seed)


def to_png(figure: Figure, dpi: int = 110) -> bytes:
    """Render ``figure`` to PNG bytes and close it."""
    return render(figure, ("png",), dpi)["png"]


def render(figure: Figure, formats: tuple[str, ...] = ("png", "svg"), dpi: int = 110) -> dict:
    """Render ``figure`` once per format (``png``, ``svg``, ``pdf``: matplotlib's writers) and
    close it; SVG and PDF keep lines and text as vectors (images inside stay raster).

    Returns:
        ``{format: bytes}``.
    """
    out = {}
    for name in formats:
        buffer = io.BytesIO()
        metadata = {"Date": None} if name == "svg" else None  # same figure, same bytes
        figure.savefig(buffer, format=name, dpi=dpi, bbox_inches="tight", metadata=metadata)
        out[name] = buffer.getvalue()
    plt.close(figure)
    return out


def _label(attack: str, loss: str) -> str:
    return f"{attack.upper()} / {loss}"


MAX_COLUMNS = 3
"""Panels per row in a grid of panels (a reviewer reads 3 across, not 8 in a strip)."""


def panel_grid(count: int, width: float = 4.6, height: float = 3.5) -> tuple[Figure, list]:
    """A figure with ``count`` panels in rows of at most :data:`MAX_COLUMNS`, the unused ones
    hidden; constrained layout, so a legend placed ``outside`` gets its own room.

    Returns:
        ``(figure, axes)``, ``axes`` the ``count`` panels in reading order.
    """
    columns = min(MAX_COLUMNS, max(count, 1))
    rows = -(-count // columns)
    figure, grid = plt.subplots(
        rows, columns, figsize=(width * columns, height * rows + 0.9), squeeze=False,
        layout="constrained",
    )  # fmt: skip
    axes = list(grid.flat)
    for ax in axes[count:]:
        ax.set_axis_off()
    return figure, axes[:count]


def legend_beside(ax: plt.Axes, **kwargs: object) -> None:
    """The axes' legend to its right, outside the plotted area, so it covers no value."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, **kwargs)


def dsc_vs_eps(cells: pd.DataFrame) -> Figure:
    """DSC against eps, one line per model, one panel per (attack, loss) in a grid of at most
    :data:`MAX_COLUMNS` columns; eps 0 is the clean DSC. One legend below the grid.

    The paper's Figure 5 shows images at a few eps values; this is the same question as a curve.
    Only (attack, loss) pairs evaluated at two or more eps values are drawn.
    """
    groups = [
        (key, frame)
        for key, frame in cells.groupby(["attack", "loss"], sort=True)
        if frame["eps"].nunique() >= 2
    ]
    if not groups:
        raise ValueError("no (attack, loss) pair was evaluated at two or more eps values")
    models = sorted(cells["model"].astype(str).unique())
    colours = {m: f"C{i % 10}" for i, m in enumerate(models)}
    markers = {m: "osD^vP*Xh<>"[i // 10 % 11] for i, m in enumerate(models)}
    figure, axes = panel_grid(len(groups))
    columns = min(MAX_COLUMNS, len(groups))
    for i, (ax, ((attack, loss), frame)) in enumerate(zip(axes, groups, strict=True)):
        for model, rows in frame.groupby("model", sort=True):
            rows = rows.sort_values("eps")
            eps = np.concatenate([[0.0], rows["eps"].to_numpy()])
            dsc = np.concatenate([[rows["dsc_clean"].iloc[0]], rows["dsc_adv"].to_numpy()])
            name = str(model)
            ax.plot(eps, dsc, marker=markers[name], color=colours[name], label=name)
        ax.set_title(_label(attack, loss))
        if i >= len(groups) - columns:  # the bottom panel of each column
            ax.set_xlabel("eps (L-inf budget, image range [0, 1])")
        if i % columns == 0:
            ax.set_ylabel("DSC under attack\n(eps 0 = clean)")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], color=colours[m], marker=markers[m], label=m) for m in models]
    figure.legend(
        handles=handles, title="model", loc="outside lower center",
        ncol=min(len(models), 5), fontsize="small",
    )  # fmt: skip
    return figure


def loss_comparison(cells: pd.DataFrame) -> Figure:
    """Attack Success per model, one bar per attack loss (the paper's Figure 8), at one eps."""
    table = cells.assign(
        series=[_label(a, b) for a, b in zip(cells.attack, cells.loss, strict=True)]
    )
    pivot = table.pivot_table(index="model", columns="series", values="attack_success")
    models, series = list(pivot.index), list(pivot.columns)
    width = 0.8 / max(len(series), 1)
    figure, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(models) + 2.5), 4.0))
    x = np.arange(len(models))
    for i, name in enumerate(series):
        values = pivot[name].to_numpy()
        bars = ax.bar(x + (i - (len(series) - 1) / 2) * width, values, width, label=name)
        ax.bar_label(bars, fmt="%.3f", fontsize="x-small", padding=2)
    ax.set_xticks(x, models, rotation=15 if len(models) > 3 else 0)
    ax.set_xlabel("model")
    ax.set_ylabel("Attack Success\n(DSC_clean - DSC_adv) / DSC_clean")
    eps = ", ".join(f"{e:g}" for e in sorted(cells["eps"].unique()))
    ax.set_title(f"Attack loss comparison (eps {eps})")
    values = pivot.to_numpy()
    top = float(np.nanmax(values)) if np.isfinite(values).any() else 1.0
    bottom = float(np.nanmin(values)) if np.isfinite(values).any() else 0.0
    ax.set_ylim(min(0.0, bottom * 1.3), max(0.05, top * 1.3))
    legend_beside(ax, title="attack / loss", fontsize="small")
    ax.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    return figure


def scatter_with_stats(
    points: pd.DataFrame,
    x: str,
    y: str,
    series: str,
    correlations: dict[str, Correlation],
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    logx: bool = False,
) -> Figure:
    """A scatter of ``y`` against ``x`` with one colour per ``series``; its legend carries each
    series' Pearson / Spearman result."""
    figure, ax = plt.subplots(figsize=(7.0, 4.4))
    for name, rows in points.groupby(series, sort=True):
        stat = correlations.get(str(name))
        label = f"{name}: {stat.describe()}" if stat else str(name)
        ax.scatter(rows[x], rows[y], s=18 if len(rows) > 30 else 40, alpha=0.7, label=label)
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="x-small", loc="upper center", bbox_to_anchor=(0.5, -0.18))
    figure.tight_layout()
    return figure


def radiological(array: np.ndarray) -> np.ndarray:
    """A canonical (RAS+) slice ``(..., H, W)`` in the radiological convention.

    In RAS+ voxel order a slice's rows run from posterior to anterior and its columns from the
    patient's left to right, so drawn as stored the brain is posterior-up with the patient's left
    on the viewer's left. Radiologists look from the feet: anterior up and the patient's right on
    the viewer's left, which is the stored slice turned by 180 degrees.
    """
    return array[..., ::-1, ::-1]


def _orientation_letters(ax: plt.Axes) -> None:
    """The radiological convention's letters: anterior up, the patient's right on the left."""
    for x, y, letter in ((0.5, 0.98, "A"), (0.5, 0.02, "P"), (0.02, 0.5, "R"), (0.98, 0.5, "L")):
        ax.text(
            x, y, letter, transform=ax.transAxes, color="yellow", fontsize="small",
            fontweight="bold", ha="center", va="center",
        )  # fmt: skip


def _class_overlay(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """An RGB image with each class's pixels in its own colour (:data:`CLASS_COLOURS`) on the
    grey image; image (H, W) in [0, 1], mask (K, H, W) boolean."""
    rgb = np.repeat(image[..., None], 3, axis=2)  # (H, W, 3)
    for k in range(mask.shape[0]):
        colour = np.asarray(CLASS_COLOURS[k % len(CLASS_COLOURS)])
        rgb[mask[k]] = (1 - ALPHA) * rgb[mask[k]] + ALPHA * colour
    return rgb


def example_panel(
    examples: dict[str, np.ndarray],
    loss: str,
    classes: list[str],
    title: str,
    max_rows: int = 2,
) -> Figure:
    """Two rows of three large panels per example slice: image, ground truth, clean
    prediction; adversarial image, perturbation (magnified, with its scale) and adversarial
    prediction (pixels drawn as pixels, no smoothing); one legend below.

    Every class has its own colour, the same in truth and predictions (so that a confusion of
    two classes shows), and a prediction's wrong pixels are outlined in red. Slices marked
    ``ras`` (from volumes in canonical RAS+ orientation) are shown in the radiological
    convention (anterior up, the patient's right on the viewer's left) with the letters A, P,
    R, L; other slices (PNG files, whose orientation is not known) as stored, without letters.

    Args:
        examples: arrays saved by the experiment runner (:mod:`advseg.runs.examples`):
            ``slice_ids`` (N,), ``losses`` (L,), ``image`` (N, C, H, W) and ``x_adv``
            (L, N, C, H, W) in [0, 1] (z-scored volumes' slices: drawn over the clean image's
            own range), ``mask``, ``pred_clean`` (N, K, H, W) and ``pred_adv``
            (L, N, K, H, W) binary; optionally ``ras`` (N,).
        loss: which attack loss's adversarial image to show (one of ``losses``).
        classes: class names, in channel order, for the ground-truth legend.
        title: the figure title (model, attack, eps).
    """
    ids = examples["slice_ids"]
    which = list(examples["losses"]).index(loss)
    picked = panel_rows(ids, max_rows)  # seeded, spread over the cases
    rows = 2 * len(picked)  # per slice: clean row, adversarial row; 3 panels each, large
    figure, axes = plt.subplots(
        rows, 3, figsize=(11.0, 3.7 * rows + 1.0), squeeze=False, layout="constrained"
    )
    for line, r in enumerate(picked):
        image = examples["image"][r]  # (C, H, W)
        x_adv = examples["x_adv"][which, r]  # (C, H, W)
        centre = image.shape[0] // 2
        grey, grey_adv = image[centre], x_adv[centre]  # (H, W)
        mask = examples["mask"][r] > 0  # (K, H, W)
        pred = examples["pred_clean"][r] > 0
        pred_adv = examples["pred_adv"][which, r] > 0
        ras = bool(examples["ras"][r]) if "ras" in examples else False
        if ras:
            grey, grey_adv, mask, pred, pred_adv = map(
                radiological, (grey, grey_adv, mask, pred, pred_adv)
            )
        delta = grey_adv - grey
        scale = float(np.abs(delta).max()) or 1.0
        low, high = float(grey.min()), float(grey.max())
        if low < 0 or high > 1:  # z-scored volumes: shown over the clean image's own range
            grey, grey_adv = ((v - low) / max(high - low, 1e-12) for v in (grey, grey_adv))
        wrong = (mask != pred).any(axis=0)  # (H, W): some class wrong
        wrong_adv = (mask != pred_adv).any(axis=0)
        cells = [
            (grey, f"{ids[r]}: image", "gray", None),
            (_class_overlay(grey, mask), "ground truth", None, None),
            (_class_overlay(grey, pred), "clean prediction", None, wrong),
            (grey_adv, f"adversarial image ({loss})", "gray", None),
            (delta, f"perturbation x_adv - x (±{scale:.3g})", "coolwarm", None),
            (_class_overlay(grey_adv, pred_adv), "adversarial prediction", None, wrong_adv),
        ]
        for ax, (picture, name, cmap, errors) in zip(
            axes[2 * line : 2 * line + 2].flat, cells, strict=True
        ):
            if cmap == "coolwarm":
                shown = ax.imshow(
                    picture, cmap=cmap, vmin=-scale, vmax=scale, interpolation="nearest"
                )
                figure.colorbar(shown, ax=ax, fraction=0.046, pad=0.02, label="intensity change")
            elif cmap:
                ax.imshow(picture, cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
            else:
                ax.imshow(np.clip(picture, 0, 1), interpolation="nearest")
            if errors is not None and errors.any():
                ax.contour(errors, levels=[0.5], colors=[ERROR_COLOUR], linewidths=0.9)
            if ras:
                _orientation_letters(ax)
            ax.set_title(name, fontsize="medium")
            ax.set_axis_off()
    handles = [
        Patch(color=CLASS_COLOURS[k % len(CLASS_COLOURS)], label=name)
        for k, name in enumerate(classes)
    ]
    handles.append(
        Patch(facecolor="none", edgecolor=ERROR_COLOUR, label="wrong pixels (any class)")
    )
    figure.legend(handles=handles, loc="outside lower center", ncol=3, fontsize="medium")
    figure.suptitle(title)
    return figure
