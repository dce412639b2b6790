"""The report's training table: how each model of a run was trained, and what it cost.

One row per model of the run's ``config.yaml``: its adversarial training (the defence and its
settings, :func:`advseg.defences.describe`), what chose its "best" checkpoint, the epochs, and the
training time with its ratio to the undefended models' (the cost of the defence). The training
numbers come from each model's checkpoint metadata (JSON only: no weights are read), written by
:func:`advseg.train.train`; a model whose checkpoint is missing is left out and noted. Beside them,
from the records at the headline eps: the clean DSC and the lowest DSC under any white-box
(attack, loss) of the grid, with the attack that reached it.

The section appears only when some model of the run was adversarially trained.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from advseg.config import from_dict, load_yaml
from advseg.defences.adversarial_training import AdversarialConfig, describe
from advseg.errors import UserError
from advseg.models.checkpoint import read_metadata
from advseg.records import white_box
from advseg.report.html import Section
from advseg.summary import summarize_cells

COLUMNS = ["model", "arch", "adversarial_training", "selected_by", "best_epoch", "epochs",
           "train_seconds", "time_ratio"]  # fmt: skip


def training_table(run_dir: str | Path) -> tuple[pd.DataFrame, list[str]]:
    """The training table of ``run_dir`` and the notes on what it could not show.

    ``time_ratio`` is ``train_seconds`` over the mean of the undefended models' (``method:
    none``) in the same run; empty when the run has none.

    Returns:
        ``(table with COLUMNS, notes)``; the table is empty when the run has no config.yaml.
    """
    run_dir = Path(run_dir)
    config_file = run_dir / "config.yaml"
    notes: list[str] = []
    if not config_file.exists():
        return pd.DataFrame(columns=COLUMNS), notes
    config = load_yaml(config_file) or {}
    rows = []
    seeds = config.get("seeds") or [None]  # a grid with seeds trains each model once per seed
    runs = []
    for spec in config.get("models") or []:
        name = str(spec.get("name") or spec.get("arch"))
        given = spec.get("checkpoint")
        if given:
            runs.append((name, Path(given)))
            continue
        for seed in seeds:
            folder = run_dir / "models" / name / ("" if seed is None else f"seed{seed}")
            label = name if seed is None else f"{name} (seed {seed})"
            runs.append((label, folder / "checkpoints" / "best"))
    for name, path in runs:
        try:
            meta = read_metadata(path)
            last = path.parent / "last"  # the whole run's time: "best" was written mid-run
            if last.with_suffix(".json").exists():
                meta.metrics = {**meta.metrics, **_totals(read_metadata(last).metrics)}
        except UserError as err:
            notes.append(f"model {name}: no training details ({err})")
            continue
        rows.append(_row(name, meta.model, meta.train, meta.metrics, meta.epoch))
    table = pd.DataFrame(rows, columns=COLUMNS)
    plain = table.loc[table["adversarial_training"] == "none", "train_seconds"].dropna()
    if len(plain) and plain.mean() > 0:
        table["time_ratio"] = table["train_seconds"] / plain.mean()
    return table, notes


def _totals(metrics: dict[str, Any]) -> dict[str, Any]:
    return {key: metrics[key] for key in ("last", "train_seconds") if key in metrics}


def _row(
    name: str, arch: str, train: dict[str, Any], metrics: dict[str, Any], epoch: int
) -> dict[str, Any]:
    try:
        adversarial = from_dict(AdversarialConfig, train.get("adversarial") or {})
    except UserError:
        adversarial = AdversarialConfig()
    label = describe(adversarial).split("; ")[0]
    robust = adversarial.select_by == "robust"
    best = metrics.get("best") or {}
    history_seconds = metrics.get("train_seconds")
    return {
        "model": name,
        "arch": arch,
        "adversarial_training": label,
        "selected_by": (
            f"robust Dice ({adversarial.select_attack} eps {adversarial.eps:g})"
            if robust
            else "clean Dice"
        ),
        "best_epoch": best.get("epoch"),
        "epochs": (metrics.get("last") or {}).get("epoch", epoch),
        "train_seconds": history_seconds,
        "time_ratio": None,
    }


def sections(
    writer: Any, run_dir: Path, records: pd.DataFrame, protocol: str, eps: float
) -> list[Section]:
    """The "Training and adversarial training" section, when a model of the run was defended."""
    table, notes = training_table(run_dir)
    if not (table["adversarial_training"] != "none").any():
        return []
    at_eps = white_box(records[records["eps"] == eps])
    if not at_eps.empty:
        cells = summarize_cells(at_eps, protocol)
        worst = cells.loc[cells.groupby("model", sort=False)["dsc_adv"].idxmin()]
        robust = pd.DataFrame(
            {
                "model": worst["model"],
                "dsc_clean": worst["dsc_clean"],
                "dsc_worst": worst["dsc_adv"],
                "worst_attack": worst["attack"] + " / " + worst["loss"],
            }
        )
        table = table.merge(robust, on="model", how="left")
    section = Section(f"Training and adversarial training (eps {eps:g})")
    section.blocks.append(
        writer.table(
            "training",
            table,
            "How each model was trained: its adversarial training (the attack inside each "
            "training step), what picked its best checkpoint, its training time and the ratio "
            "to the undefended models' time; then its clean DSC and its lowest DSC under any "
            "white-box attack and loss of this grid at this eps. A defence is only as good as "
            "the strongest attack run against it: add PGD with many steps and restarts.",
        )
    )
    section.blocks += [writer.note(text) for text in notes]
    return [section]
