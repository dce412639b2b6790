"""The report's cross-model sections: transfer matrix, ensembles, universal perturbations.

Like the rest of the report these read records (and the saved perturbation PNGs) only. The
transfer matrix comes from :func:`advseg.crossmodel.transfer.transfer_matrix`, whose diagonal is the
white-box cells; the ensemble and universal statements come from the white-box cells of
:func:`advseg.stats.summary.summarize_cells`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from advseg.atomic import write_bytes_atomic
from advseg.crossmodel.transfer import transfer_matrix
from advseg.models.ensemble import ENSEMBLE_PREFIX, ensemble_members
from advseg.report.html import Block, Section
from advseg.runs.names import file_stem
from advseg.runs.records import white_box
from advseg.stats.summary import summarize_cells

UNIVERSAL, RANDOM_SIGN = "universal", "random-sign"


def transfer_heatmap(matrix: pd.DataFrame, title: str) -> Figure:
    """Sources x targets, coloured by Attack Success, each cell showing AS and the DSC under
    attack. ``matrix``: rows of one (attack, loss, eps) from ``transfer_matrix``."""
    sources = list(dict.fromkeys(matrix["source"]))
    targets = list(dict.fromkeys(matrix["target"]))
    values = np.full((len(sources), len(targets)), np.nan)
    dsc = np.full_like(values, np.nan)
    for row in matrix.itertuples():
        i, j = sources.index(row.source), targets.index(row.target)
        values[i, j], dsc[i, j] = row.attack_success, row.dsc_adv
    figure, ax = plt.subplots(
        figsize=(1.6 * len(targets) + 2.6, 0.9 * len(sources) + 1.8), squeeze=True
    )
    image = ax.imshow(values, cmap="Reds", vmin=0, vmax=max(0.05, float(np.nanmax(values))))
    for i in range(len(sources)):
        for j in range(len(targets)):
            text = "n/a" if np.isnan(values[i, j]) else f"AS {values[i, j]:.3f}"
            text += "" if np.isnan(dsc[i, j]) else f"\nDSC {dsc[i, j]:.3f}"
            ax.text(j, i, text, ha="center", va="center", fontsize="small")
    ax.set_xticks(range(len(targets)), targets, rotation=15 if len(targets) > 3 else 0)
    ax.set_yticks(range(len(sources)), sources)
    ax.set_xlabel("target (the model scored)")
    ax.set_ylabel("source (the model crafted on)")
    ax.set_title(title)
    figure.colorbar(image, ax=ax, label="Attack Success")
    figure.tight_layout()
    return figure


def sections(
    writer: Any, run_dir: Path, records: pd.DataFrame, protocol: str, eps: float
) -> list[Section]:
    """The cross-model sections present in ``records`` (every row, transfer included)."""
    at_eps = records[records["eps"] == eps]
    found = []
    if (at_eps["source"] != at_eps["model"]).any():
        found.append(_transfer_section(writer, at_eps, protocol, eps))
    cells = summarize_cells(white_box(at_eps), protocol)
    if cells["arch"].str.startswith(ENSEMBLE_PREFIX).any():
        found.append(_ensemble_section(writer, cells, eps))
    if (cells["attack"].str.partition(":")[0] == UNIVERSAL).any():  # volumes: universal:tiles
        found.append(_universal_section(writer, run_dir, cells, eps))
    return found


def _transfer_section(writer: Any, at_eps: pd.DataFrame, protocol: str, eps: float) -> Section:
    transferred = at_eps[at_eps["source"] != at_eps["model"]]
    sources = set(transferred["source"])
    shown = at_eps[at_eps["source"].isin(sources)]  # with the sources' own white-box cells
    shown = shown[shown["attack"].isin(set(transferred["attack"]))]
    matrix = transfer_matrix(shown, protocol)
    section = Section(f"Transfer matrix (eps {eps:g})")
    section.blocks.append(
        writer.table(
            "transfer_matrix",
            matrix,
            "Adversarial images crafted on a source, scored on a target: DSC under attack and "
            "Attack Success per (source, target). Rows with source = target are the white-box "
            "cells of Table II; a source 'a+b' is one attack on the mean loss of a and b.",
        )
    )
    for (attack, loss), rows in matrix.groupby(["attack", "loss"], sort=False):
        title = f"{attack.upper()} / {loss}, eps {eps:g}: Attack Success (source -> target)"
        name = f"transfer_{file_stem(attack)}_{file_stem(loss)}"
        section.blocks.append(writer.figure(name, transfer_heatmap(rows, title), title))
    return section


def ensemble_verdicts(cells: pd.DataFrame) -> pd.DataFrame:
    """Each ensemble model's white-box Attack Success beside its members', per (attack, loss).

    Returns:
        Columns ``ensemble, attack, loss, eps, ensemble_as, best_member, best_member_as,
        mean_member_as, ensemble_dsc_adv, best_member_dsc_adv, verdict``; ``verdict`` says
        whether averaging helped robustness (a lower AS than every member), partly (lower than
        the members' mean), or not.
    """
    rows = []
    cells = cells.rename(columns={"as": "success"})
    for ens in cells[cells["arch"].str.startswith(ENSEMBLE_PREFIX)].itertuples():
        members = cells[
            cells["model"].isin(ensemble_members(ens.arch))
            & (cells["attack"] == ens.attack)
            & (cells["loss"] == ens.loss)
        ]
        if members.empty:
            continue
        defined = members[members["success"].notna()]
        if pd.isna(ens.success) or defined.empty:
            # Attack Success is undefined where the clean Dice is 0 (the model predicts nothing)
            verdict = "undefined: Attack Success has no value (clean Dice 0) for the ensemble or"
            verdict += " every member"
            best = (defined if not defined.empty else members).iloc[0]
            rows.append([ens.model, ens.attack, ens.loss, ens.eps, ens.success, best["model"]])
            rows[-1] += [best["success"], float(defined["success"].mean()) if not defined.empty
                         else float("nan"), ens.dsc_adv, best["dsc_adv"], verdict]  # fmt: skip
            continue
        best = defined.loc[defined["success"].idxmin()]
        mean = float(defined["success"].mean())
        if ens.success < best["success"]:
            verdict = "helped: lower Attack Success than every member"
        elif ens.success < mean:
            verdict = "partly: lower than the members' mean, not than the best member"
        else:
            verdict = "did not help: Attack Success not below the members' mean"
        rows.append([ens.model, ens.attack, ens.loss, ens.eps, ens.success, best["model"]])
        rows[-1] += [best["success"], mean, ens.dsc_adv, best["dsc_adv"], verdict]
    columns = ["ensemble", "attack", "loss", "eps", "ensemble_as", "best_member"]
    columns += ["best_member_as", "mean_member_as", "ensemble_dsc_adv", "best_member_dsc_adv"]
    return pd.DataFrame(rows, columns=[*columns, "verdict"])


def _ensemble_section(writer: Any, cells: pd.DataFrame, eps: float) -> Section:
    verdicts = ensemble_verdicts(cells)
    section = Section(f"Ensembles (eps {eps:g}): did averaging help?")
    section.blocks.append(
        writer.table(
            "ensembles",
            verdicts,
            "Each ensemble (mean of its members' probabilities) attacked white-box, through "
            "every member, against its members attacked alone.",
        )
    )
    for row in verdicts.itertuples():
        section.blocks.append(
            Block(
                "text",
                f"{row.ensemble}, {row.attack} / {row.loss}: Attack Success {row.ensemble_as:.3f} "
                f"vs members' mean {row.mean_member_as:.3f} (best {row.best_member} "
                f"{row.best_member_as:.3f}): averaging {row.verdict}.",
            )
        )
    return section


def _universal_section(writer: Any, run_dir: Path, cells: pd.DataFrame, eps: float) -> Section:
    parts = cells["attack"].str.partition(":")  # volumes: the threat protocol after the colon
    pairs = cells.assign(kind=parts[0], through=parts[2])
    pairs = pairs[pairs["kind"].isin([UNIVERSAL, RANDOM_SIGN])]
    index = ["model", "through", "loss", "eps"]
    table = pairs.pivot_table(index=index, columns="kind", values="as").reset_index()
    table = table.rename(columns={UNIVERSAL: "as_universal", RANDOM_SIGN: "as_random_sign"})
    table.columns.name = None
    if (table["through"] == "").all():  # slices: no protocol
        table = table.drop(columns="through")
    section = Section(f"Universal perturbations (eps {eps:g})")
    section.blocks.append(
        writer.table(
            "universal",
            table,
            "One perturbation per (model, eps, loss), fitted on the training slices (Metzen et "
            "al., ICCV 2017) and added to every test slice, against a random-sign perturbation "
            "of the same norm: the gap is the damage due to universal structure, not noise.",
        )
    )
    middle = ", the window's middle axial slice"  # volumes: one window laid out on the tiles
    for row in table.itertuples():
        through = getattr(row, "through", "")
        stem = f"{row.model}__eps{row.eps:g}__{row.loss}" + (f"__{through}" if through else "")
        png = run_dir / "universal" / f"{stem}.png"
        if png.exists():
            data = png.read_bytes()
            name = f"universal_{file_stem(stem)}.png"
            write_bytes_atomic(writer.out / name, data)
            writer.files.append(writer.out / name)
            caption = (
                f"{row.model}, loss {row.loss}{f', through {through}' if through else ''}: the "
                f"universal perturbation (first channel{middle if through else ''}; "
                f"mid-grey 0, black/white -+max), AS {row.as_universal:.3f} vs random sign "
                f"{row.as_random_sign:.3f}"
            )
            section.blocks.append(Block("figure", caption, png=data, file=name))
    return section
