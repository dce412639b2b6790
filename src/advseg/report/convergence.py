"""The report's "Did the attacks converge?" section, from the traces an evaluation kept.

An evaluation run with traces (``advseg evaluate --trace``, or ``evaluation.trace: true`` in an
experiment) writes ``traces/<cell>.csv`` beside the records (:mod:`advseg.runs.traces`): per (loss,
step) of an iterative attack, the mean loss and mean Dice over the cell's slices after that step.
This section draws Dice against the iteration, one line per (attack, loss), one figure per model,
and tabulates how much the last fifth of the steps still changed: a curve still falling at its
end says that more steps would have found a lower Dice.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.figure import Figure

from advseg.report.figures import legend_beside
from advseg.report.html import Section
from advseg.runs.names import file_stem
from advseg.runs.traces import read_traces


def convergence_table(traces: pd.DataFrame) -> pd.DataFrame:
    """Per (model, training seed where the traces name it, attack, loss, eps): steps, Dice after
    the first and the last step, and how much Dice still fell over the last fifth of the steps
    (``last_fifth_drop``)."""
    rows = []
    keys = ["model", *(["seed"] if "seed" in traces.columns else []), "attack", "loss", "eps"]
    for key, frame in traces.groupby(keys, sort=False, dropna=False):
        frame = frame.sort_values("step")
        dice = frame["mean_dice"].to_numpy()
        fifth = max(1, len(dice) // 5)
        before = dice[-fifth - 1] if len(dice) > fifth else dice[0]
        rows.append(
            dict(zip(keys, key, strict=True))
            | {
                "steps": int(frame["step"].max()),
                "dice_first_step": float(dice[0]),
                "dice_last_step": float(dice[-1]),
                "last_fifth_drop": float(before - dice[-1]),
            }
        )
    return pd.DataFrame(rows)


def dice_vs_step(traces: pd.DataFrame, title: str) -> Figure:
    """Mean Dice against the iteration, one line per (attack, loss) (one model, one eps)."""
    figure, axis = plt.subplots(figsize=(6.4, 4.0))
    for (attack, loss), frame in traces.groupby(["attack", "loss"], sort=True):
        frame = frame.sort_values("step")
        axis.plot(frame["step"], frame["mean_dice"], marker=".", label=f"{attack.upper()} / {loss}")
    axis.set_xlabel("iteration (attack step)")
    axis.set_ylabel("mean Dice after the step (to y)")
    axis.set_ylim(0, 1.02)
    axis.set_title(title)
    axis.grid(alpha=0.3)
    legend_beside(axis, fontsize="small")
    figure.tight_layout()
    return figure


def sections(writer, run_dir: Path, eps: float) -> list[Section]:
    """The convergence section at ``eps`` (every eps when none was traced there); none without
    traces. ``writer`` is the report's writer (``figure``, ``table``, ``note``)."""
    traces = read_traces(run_dir)
    if traces is None:
        return []
    section = Section("Did the attacks converge?")
    at_eps = traces[(traces["eps"] - eps).abs() < 1e-12]
    if at_eps.empty:
        section.blocks.append(
            writer.note(f"No trace at eps {eps:g}; the traces of every eps are drawn.")
        )
        at_eps = traces
    several = False  # some model traced at several training seeds
    for (model, e), frame in at_eps.groupby(["model", "eps"], sort=False):
        seeds = sorted(frame["seed"].dropna().unique()) if "seed" in frame.columns else []
        who = str(model)
        if seeds:  # one seed's lines: the lowest; the table below has every seed
            frame = frame[frame["seed"] == seeds[0]]
            who = f"{model}, training seed {int(seeds[0])}"
            several = several or len(seeds) > 1
        title = f"{who}: Dice against iteration, eps {e:g}"
        name = f"convergence_{file_stem(str(model))}_eps{e:g}"
        caption = (
            f"{title}, one line per attack / loss (mean over the cell's slices; the last point "
            "is the attack's result). A line still falling at its end: more steps would matter."
        )
        section.blocks.append(writer.figure(name, dice_vs_step(frame, title), caption))
    if several:
        section.blocks.append(
            writer.note(
                "Models trained at several seeds: each figure shows the lowest training seed "
                "(named in its title); the table has a row per seed."
            )
        )
    section.blocks.append(
        writer.table(
            "convergence",
            convergence_table(traces),
            "Every traced cell: Dice after the first and the last step, and the drop over the "
            "last fifth of the steps (traces/*.csv hold every step).",
        )
    )
    return [section]
