"""The report's defence comparison: one row per model, and certified Dice against the radius.

Built from records only: the attack records (``records/``), the certification records
(``certified/``, :mod:`advseg.evaluate.certify`) and, for the training time and the training
defence, the run's own ``models/<model>/log.csv`` and ``checkpoints/best.json`` when they exist.
Every DSC is :func:`advseg.stats.summary.summarize_cells`' under the report's protocol.

Per model (a defended variant ``unet+median:3`` is its own row):

- ``dsc_clean``: its DSC without attack (from the cell of the strongest attack: a random defence
  gives each cell its own draw);
- ``dsc_strongest`` and ``strongest``: the lowest DSC under the attacks as given, over every
  attack and loss at the headline eps, and which one it was (``sea`` when the run has it);
- ``dsc_adaptive`` and ``adaptive``: the same over the adaptive attacks (``+bpda``, ``+eot``);
  for an input defence the honest number, for other models equal in law to the naive one;
- ``certified@R``: the certified DSC at the two smallest positive radii in the certification
  records (abstentions counted wrong), with the noise ``sigma`` it was certified under;
- ``slices`` and ``certified_slices``: the slices each kind of number was computed on (the
  certification is often run on fewer slices than the attacks: the two are then not from the
  same sample, and the table says so);
- ``train_s``: the training time in seconds (the sum of ``log.csv``'s epoch times), and
  ``training``: the defence trained in (Gaussian noise, adversarial training), from the metadata.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from advseg.augment import corruption_text
from advseg.evaluate.certify import certified_summary, read_certified
from advseg.report.html import Section
from advseg.stats.summary import summarize_cells


def _is_adaptive(attack: str) -> bool:
    return "+" in str(attack)


def _base_model(model: str) -> str:
    """The trained model behind a defended variant: ``unet+median:3`` -> ``unet``."""
    return str(model).split("+", 1)[0]


def defence_table(
    records: pd.DataFrame,
    certified: pd.DataFrame | None,
    run_dir: Path,
    protocol: str,
    eps: float,
) -> pd.DataFrame:
    """One row per model (see the module doc); NaN where a number does not exist."""
    cells = summarize_cells(records[np.isclose(records["eps"], eps)], protocol)
    radii: list[float] = []
    if certified is not None:
        radii = sorted(r for r in certified["eps"].unique() if r > 0)[:2]
        certified_cells = summarize_cells(certified, protocol)
    at_eps = records[np.isclose(records["eps"], eps)]
    rows = []
    for model, frame in cells.groupby("model", sort=False):
        row: dict[str, object] = {"model": model}
        row["slices"] = at_eps.loc[at_eps["model"] == model, "slice_id"].nunique()
        naive = frame[~frame["attack"].map(_is_adaptive)]
        adaptive = frame[frame["attack"].map(_is_adaptive)]
        worst = naive.loc[naive["dsc_adv"].idxmin()] if len(naive) else None
        row["dsc_clean"] = worst["dsc_clean"] if worst is not None else frame["dsc_clean"].mean()
        row["dsc_strongest"] = np.nan if worst is None else worst["dsc_adv"]
        row["strongest"] = "" if worst is None else f"{worst['attack']} / {worst['loss']}"
        best = adaptive.loc[adaptive["dsc_adv"].idxmin()] if len(adaptive) else None
        row["dsc_adaptive"] = np.nan if best is None else best["dsc_adv"]
        row["adaptive"] = "" if best is None else f"{best['attack']} / {best['loss']}"
        for radius in radii:
            mine = certified_cells[
                (certified_cells["model"] == model) & np.isclose(certified_cells["eps"], radius)
            ]
            row[f"certified@{radius:g}"] = mine["dsc_adv"].min() if len(mine) else np.nan
        if certified is not None:
            mine = certified[certified["model"] == model]
            row["certified_slices"] = mine["slice_id"].nunique()
            row["sigma"] = ", ".join(s.removeprefix("sigma=") for s in mine["loss"].unique())
        row["training"], row["train_s"] = _training(run_dir, _base_model(model))
        rows.append(row)
    rows.sort(key=lambda r: (_base_model(r["model"]), r["model"]))  # variants after their model
    return pd.DataFrame(rows)


def _training(run_dir: Path, model: str) -> tuple[str, float]:
    """The defence trained in and the training seconds, from the run's files: its
    ``models/<model>/`` folder, else the checkpoint the run names for it (an ``advseg
    evaluate`` output's, :func:`advseg.report.training.run_checkpoints`); ('', NaN) when none
    says."""
    from advseg.errors import UserError
    from advseg.report.training import run_checkpoints, training_facts

    folder = run_dir / "models" / model
    if not (folder / "checkpoints" / "best.json").exists():
        for name, path in run_checkpoints(run_dir):
            if name != model:
                continue
            try:
                facts = training_facts(path)
            except UserError:
                continue
            trained = [f"noise {facts['noise_sigma']:g}"] if facts["noise_sigma"] else []
            if facts["eps"] is not None:
                trained.append(f"{facts['method'].removesuffix('+noise')} eps {facts['eps']:g}")
            if facts["corruptions"]:
                trained.append("corruptions")
            seconds = np.nan if facts["seconds"] is None else facts["seconds"]
            return ", ".join(trained) or "none", seconds
    seconds = np.nan
    log = folder / "log.csv"
    if log.exists():
        frame = pd.read_csv(log)
        if "seconds" in frame.columns and len(frame):
            seconds = float(frame["seconds"].sum())
    trained = []
    meta = folder / "checkpoints" / "best.json"
    if meta.exists():
        document = json.loads(meta.read_text())
        train = (document.get("meta") or {}).get("train") or {}
        if train.get("noise_sigma"):
            trained.append(f"noise {train['noise_sigma']:g}")
        adversarial = train.get("adversarial")
        if isinstance(adversarial, dict) and adversarial.get("method") not in (None, "", "none"):
            trained.append(f"{adversarial['method']} eps {adversarial.get('eps', '?')}")
        if corruption_text(train.get("augment") or {}):
            trained.append("corruptions")
    return (", ".join(trained) or "none") if meta.exists() else "", seconds


def certified_curve(summary: pd.DataFrame) -> Figure:
    """Certified DSC against the L2 radius, one line per (model, sigma), with the abstention.

    Args:
        summary: :func:`advseg.evaluate.certify.certified_summary`'s table.
    """
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.0))
    for (model, sigma), rows in summary.groupby(["model", "sigma"], sort=True):
        rows = rows.sort_values("radius")
        label = f"{model} (sigma {sigma:g})"
        left.plot(rows["radius"], rows["dsc_certified"], marker="o", label=label)
        right.plot(rows["radius"], 100 * rows["abstained"], marker="o", label=label)
    left.set_xlabel("L2 radius R (image range [0, 1])")
    left.set_ylabel("certified DSC (abstentions count as wrong)")
    left.set_ylim(0, 1)
    right.set_xlabel("L2 radius R (image range [0, 1])")
    right.set_ylabel("pixels abstained (%)")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    right.legend(
        *left.get_legend_handles_labels(), title="model", fontsize="small",
        loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0,
    )  # fmt: skip
    figure.tight_layout()
    return figure


def sections(
    writer: Any, run_dir: Path, records: pd.DataFrame, protocol: str, eps: float
) -> list[Section]:
    """The defence table and the certified-Dice curve, when the run has defences to show."""
    certified = read_certified(run_dir)
    defended = records["model"].str.contains("+", regex=False).any()
    adaptive = records["attack"].str.contains("+", regex=False).any()
    if certified is None and not defended and not adaptive:
        return []
    table = defence_table(records, certified, run_dir, protocol, eps)
    caption = (
        f"Defences at eps {eps:g} ('{protocol}' DSC): clean; the strongest attack as given and "
        "the strongest adaptive one (+bpda: gradient straight through a non-differentiable "
        "input defence, +eot: logits averaged over its random draws); certified DSC at L2 "
        "radii (randomized smoothing, abstentions count as wrong); the defence trained in and "
        "the training time (s). 'slices': the slices behind the attack numbers; "
        "'certified_slices': those behind the certified ones."
    )
    if certified is not None and "certified_slices" in table:
        differ = table[table["certified_slices"].fillna(0).gt(0)]
        differ = differ[differ["certified_slices"] != differ["slices"]]
        if len(differ):
            caption += (
                " Not the same sample: "
                + "; ".join(
                    f"{r.model}: attacks on {r.slices} slices, certified on {r.certified_slices}"
                    for r in differ.itertuples()
                )
                + "."
            )
    sections = [Section("Defences", [writer.table("defences", table, caption)])]
    if certified is not None:
        summary = certified_summary(certified, protocol)
        figure = certified_curve(summary)
        caption = "Certified DSC and abstained pixels against the L2 radius (certified/)."
        sections.append(
            Section(
                "Certified Dice against radius",
                [
                    writer.figure("certified_dice", figure, caption),
                    writer.table("certified", summary, "Per (model, sigma, radius)."),
                ],
            )
        )
    return sections
