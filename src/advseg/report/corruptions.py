"""Robustness to corruptions, from the records: Dice per corruption and severity, the mean over
severities, and the corruption error relative to a baseline model (CE and mCE, Hendrycks &
Dietterich, "Benchmarking Neural Network Robustness to Common Corruptions and Perturbations",
ICLR 2019, https://arxiv.org/abs/1903.12261), with segmentation error ``E = 1 - DSC``:

- ``CE_c = sum_s E_{s,c} / sum_s E^base_{s,c}`` and ``mCE = mean_c CE_c``;
- relative ``rCE_c = sum_s (E_{s,c} - E_clean) / sum_s (E^base_{s,c} - E^base_clean)``, the
  drop from the model's own clean error (``mrCE`` its mean).

Below 1: more robust than the baseline. Every DSC is :func:`advseg.stats.summary.summarize_cells`'s,
on the records of the corruption cells (``corruption`` set), under the report's protocol.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from advseg.corruptions.base import SEVERITIES
from advseg.errors import UserError
from advseg.report.html import Section
from advseg.stats.summary import summarize_cells


def corruption_dice(records: pd.DataFrame, protocol: str) -> pd.DataFrame:
    """One row per (model, corruption, severity): ``dsc`` under the corruption, ``dsc_clean``.

    Args:
        records: records; only the corruption cells (``corruption`` not empty) are used.
    """
    corrupted = records[records["corruption"] != ""]
    if corrupted.empty:
        return pd.DataFrame(columns=["model", "corruption", "severity", "dsc", "dsc_clean"])
    cells = summarize_cells(corrupted, protocol)
    labels = corrupted.drop_duplicates("attack").set_index("attack")[["corruption", "severity"]]
    cells = cells.join(labels, on="attack")
    frame = cells[["model", "corruption", "severity", "dsc_adv", "dsc_clean"]]
    frame = frame.rename(columns={"dsc_adv": "dsc"})
    return frame.sort_values(["model", "corruption", "severity"], kind="stable").reset_index(
        drop=True
    )


def corruption_table(
    records: pd.DataFrame, protocol: str, baseline: str | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The corruption table and its per-model summary.

    Args:
        records: records with corruption cells.
        protocol: the Dice protocol.
        baseline: the model CE is relative to; default the first model of the records (the
            report's choice: records files are read in name order).

    Returns:
        ``(table, summary)``: ``table`` one row per (model, corruption): ``dsc_s1`` ...
        ``dsc_s5`` (NaN where a severity was not run), ``dsc_mean`` (over the severities run),
        ``ce`` and ``rce``; ``summary`` one row per model: ``dsc_clean``, ``dsc_corrupted``
        (mean over corruptions of ``dsc_mean``), ``mce``, ``mrce``, ``baseline``. CE needs the
        baseline to have the same (corruption, severity) cells; others are NaN.

    Raises:
        UserError: a baseline that is not a model of the records.
    """
    dice = corruption_dice(records, protocol)
    models = list(dict.fromkeys(dice["model"]))
    if baseline is None:
        baseline = models[0] if models else ""
    elif baseline not in models:
        raise UserError(f"baseline {baseline!r}: not a model of the corruption records "
                        f"({', '.join(models)})")  # fmt: skip
    dice = dice.assign(error=1.0 - dice["dsc"], clean_error=1.0 - dice["dsc_clean"])
    base = dice[dice["model"] == baseline].set_index(["corruption", "severity"])
    rows = []
    for (model, corruption), group in dice.groupby(["model", "corruption"], sort=False):
        row: dict[str, Any] = {"model": model, "corruption": corruption}
        by_severity = group.set_index("severity")
        for s in SEVERITIES:
            row[f"dsc_s{s}"] = float(by_severity["dsc"].get(s, np.nan))
        row["dsc_mean"] = float(group["dsc"].mean())
        keys = [(corruption, int(s)) for s in group["severity"]]
        if all(k in base.index for k in keys):
            ref = base.loc[keys]
            own_drop = (group["error"] - group["clean_error"]).sum()
            ref_drop = (ref["error"] - ref["clean_error"]).sum()
            row["ce"] = _ratio(group["error"].sum(), ref["error"].sum())
            row["rce"] = _ratio(own_drop, ref_drop)
        else:
            row["ce"] = row["rce"] = np.nan
        rows.append(row)
    table = pd.DataFrame(rows)
    summary = []
    for model, group in table.groupby("model", sort=False):
        clean = dice.loc[dice["model"] == model, "dsc_clean"].iloc[0]
        summary.append({
            "model": model, "dsc_clean": float(clean),
            "dsc_corrupted": float(group["dsc_mean"].mean()),
            "mce": float(group["ce"].mean()), "mrce": float(group["rce"].mean()),
            "baseline": baseline,
        })  # fmt: skip
    return table, pd.DataFrame(summary)


def _ratio(numerator: float, denominator: float) -> float:
    return float(numerator / denominator) if denominator > 0 else float("nan")


def dice_by_severity(dice: pd.DataFrame) -> Any:
    """A figure: DSC against severity (0 = clean), one line per corruption, a panel per model."""
    from advseg.report.figures import legend_beside, panel_grid

    models = list(dict.fromkeys(dice["model"]))
    figure, axes = panel_grid(len(models))
    for ax, model in zip(axes, models, strict=False):
        part = dice[dice["model"] == model]
        clean = float(part["dsc_clean"].iloc[0])
        for corruption, line in part.groupby("corruption", sort=True):
            ax.plot([0, *line["severity"]], [clean, *line["dsc"]], marker="o", label=corruption)
        ax.set_title(model)
        ax.set_xlabel("severity (0: clean)")
        ax.set_ylabel("DSC")
        ax.set_xticks(range(0, 6))
        ax.set_ylim(0, 1)
    legend_beside(axes[0])
    return figure


def choose_baseline(run_dir: Path, models: list[str], given: str | None = None) -> tuple[str, str]:
    """The model mCE is relative to, and why: ``given`` (``advseg report --baseline``, an
    experiment's ``corruption_baseline``) when set; else the first of ``models`` whose
    checkpoint says it was trained without a defence (no adversarial training, Gaussian noise or
    corruption augmentation: the usual reference, as ImageNet-C's AlexNet); else the first model.

    Raises:
        UserError: ``given`` is not one of ``models``.
    """
    from advseg.report.training import run_checkpoints, training_facts

    if given is not None:
        if given not in models:
            raise UserError(f"--baseline: {given!r} is not a model of the corruption records "
                            f"({', '.join(models)})")  # fmt: skip
        return given, "chosen"
    undefended = set()
    for name, path in run_checkpoints(run_dir):
        try:
            facts = training_facts(path)
        except UserError:
            continue
        if facts["method"] == "none" and not facts["corruptions"]:
            undefended.add(name)
    for name in models:
        if name in undefended:
            return name, "the first model trained without a defence"
    return models[0], "the first model (no undefended model's training found in the run)"


def sections(
    writer: Any,
    run_dir: Path,
    records: pd.DataFrame,
    protocol: str,
    classes: list[str],
    baseline: str | None = None,
) -> list[Section]:
    """The report's "Corruptions" section (tables, figure, one example panel per corruption);
    none when the run has no corruption cells. ``records``: the white-box records;
    ``baseline``: the mCE baseline (default: :func:`choose_baseline`'s)."""
    corrupted = records[records["corruption"] != ""]
    if corrupted.empty:
        return []
    models = list(dict.fromkeys(corruption_dice(corrupted, protocol)["model"]))
    baseline, why = choose_baseline(run_dir, models, baseline)
    table, summary = corruption_table(corrupted, protocol, baseline)
    section = Section("Corruptions (TorchIO)")
    section.blocks.append(writer.table(
        "corruption_summary", summary,
        f"Per model: clean DSC, the mean DSC over corruptions and severities, and the mean "
        f"corruption error relative to {baseline} ({why}; `advseg report --baseline` chooses "
        f"another) (mCE, Hendrycks & Dietterich 2019: the summed "
        f"error 1 - DSC over severities divided by {baseline}'s; mrCE: the same for the drop "
        f"from each model's clean error). Below 1: more robust than {baseline}. "
        f"{protocol} Dice.",
    ))  # fmt: skip
    section.blocks.append(writer.table(
        "corruption_table", table,
        "DSC per corruption at severities 1 to 5 (`advseg corruptions` lists each one's "
        "strength), their mean, and CE / rCE relative to the baseline.",
    ))  # fmt: skip
    dice = corruption_dice(corrupted, protocol)
    section.blocks.append(writer.figure(
        "corruption_dice", dice_by_severity(dice),
        "DSC against corruption severity (0 is clean), one line per corruption.",
    ))  # fmt: skip
    section.blocks += _panels(writer, run_dir, classes)
    return [section]


def _panels(writer: Any, run_dir: Path, classes: list[str]) -> list:
    """One example panel per (model, corruption): its middle severity saved (3, else the
    highest)."""
    from advseg.report import figures
    from advseg.runs.examples import load_examples
    from advseg.runs.names import file_stem

    chosen: dict[tuple[str, str], tuple[int, dict]] = {}
    for file in sorted((run_dir / "examples").glob("*.npz")):
        examples = load_examples(file)
        cell = examples["cell"]
        parts = str(cell["attack"]).split(":")
        if parts[0] != "corruption" or len(parts) != 3 or not len(examples["slice_ids"]):
            continue
        key, severity = (cell["model"], parts[1]), int(parts[2])
        held = chosen.get(key)
        if held is None or severity == 3 or (held[0] != 3 and severity > held[0]):
            chosen[key] = (severity, examples)
    blocks = []
    for (model, corruption), (severity, examples) in sorted(chosen.items()):
        title = f"{model}: {corruption}, severity {severity}"
        figure = figures.example_panel(examples, "none", classes, title, max_rows=1)
        name = f"panel_{file_stem(model)}_corruption-{corruption}"
        blocks.append(writer.figure(name, figure, title))
    return blocks
