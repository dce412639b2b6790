"""The report's training table: how each model of a run was trained, and what it cost.

One row per model of the run's ``config.yaml`` and training seed (a grid with ``seeds:`` trains
each model once per seed): its adversarial training (the defence and its settings,
:func:`advseg.defences.describe`), what chose its "best" checkpoint, its best validation Dice, the
epochs, and the training time with its ratio to the undefended models' (the cost of the defence).
The training numbers come from each model's checkpoint metadata (JSON only: no weights are read),
written by :func:`advseg.train.train`; a model whose checkpoint is missing is left out and noted.
Beside them, from that seed's records at the headline eps: the clean DSC and the lowest DSC under
any white-box (attack, loss) of the grid, with the attack that reached it.

The section appears when some model of the run was adversarially trained, or was trained at
several seeds (the spread between seeds is then in the table, seed by seed).
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

COLUMNS = ["model", "seed", "arch", "adversarial_training", "selected_by", "val_dice",
           "best_epoch", "epochs", "train_seconds", "time_ratio"]  # fmt: skip


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
            runs.append((name, folder / "checkpoints" / "best"))
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
        "seed": int(train.get("seed", 0)),  # the training seed (a grid's seeds: k of seed<k>/)
        "arch": arch,
        "adversarial_training": label,
        "selected_by": (
            f"robust Dice ({adversarial.select_attack} eps {adversarial.eps:g})"
            if robust
            else "clean Dice"
        ),
        "val_dice": best.get("val_robust_dice" if robust else "val_dice"),
        "best_epoch": best.get("epoch"),
        "epochs": (metrics.get("last") or {}).get("epoch", epoch),
        "train_seconds": history_seconds,
        "time_ratio": None,
    }


def sections(
    writer: Any, run_dir: Path, records: pd.DataFrame, protocol: str, eps: float
) -> list[Section]:
    """The "Training" section, when a model of the run was defended or trained at several
    seeds: one row per (model, seed), that seed's clean and worst white-box DSC beside it."""
    table, notes = training_table(run_dir)
    defended = bool((table["adversarial_training"] != "none").any())
    seeded = bool(table.groupby("model")["seed"].nunique().gt(1).any()) if len(table) else False
    if not (defended or seeded):
        return []
    at_eps = white_box(records[records["eps"] == eps])
    if not at_eps.empty:
        per_seed = []
        for seed, frame in at_eps.groupby("seed", sort=True):
            cells = summarize_cells(frame, protocol)
            worst = cells.loc[cells.groupby("model", sort=False)["dsc_adv"].idxmin()]
            per_seed.append(
                pd.DataFrame(
                    {
                        "model": worst["model"],
                        "seed": int(seed),
                        "dsc_clean": worst["dsc_clean"],
                        "dsc_worst": worst["dsc_adv"],
                        "worst_attack": worst["attack"] + " / " + worst["loss"],
                    }
                )
            )
        table = table.merge(pd.concat(per_seed), on=["model", "seed"], how="left")
    title = "Training and adversarial training" if defended else "Training, per seed"
    section = Section(f"{title} (eps {eps:g})")
    section.blocks.append(
        writer.table(
            "training",
            table,
            "How each model was trained, one row per training seed: its adversarial training "
            "(the attack inside each training step), what picked its best checkpoint and that "
            "checkpoint's validation Dice (robust Dice where selected by it), its training time "
            "and the ratio to the undefended models' time; then that seed's clean DSC and its "
            "lowest DSC under any white-box attack and loss of this grid at this eps. A defence "
            "is only as good as the strongest attack run against it: add PGD with many steps and "
            "restarts.",
        )
    )
    if seeded:
        section.blocks.append(writer.note(_seed_spread(table)))
    section.blocks += [writer.note(text) for text in notes]
    return [section]


def _seed_spread(table: pd.DataFrame) -> str:
    """One sentence per model trained at several seeds: mean and sd of its validation and clean
    DSC over the seeds."""
    parts = []
    for model, frame in table.groupby("model", sort=False):
        if frame["seed"].nunique() < 2:
            continue
        spread = [
            f"{label} {frame[column].mean():.3f} ± {frame[column].std(ddof=1):.3f}"
            for column, label in (("val_dice", "validation Dice"), ("dsc_clean", "clean DSC"))
            if column in frame and frame[column].notna().sum() > 1
        ]
        parts.append(
            f"{model} over seeds {', '.join(map(str, frame['seed']))}: " + ", ".join(spread)
        )
    return "Spread over training seeds (mean ± sd): " + "; ".join(parts) + "."
