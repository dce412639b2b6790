"""The report's training table: how each model of a run was trained, and what it cost.

One row per model of the run's ``config.yaml`` and training seed (a grid with ``seeds:`` trains
each model once per seed): its adversarial training (the defence and its settings,
:func:`advseg.defences.describe`), what chose its "best" checkpoint, its best validation Dice, the
epochs, and the training time with its ratio to the undefended models' (the cost of the defence).
The training numbers come from each model's checkpoint metadata (JSON only: no weights are read),
written by :func:`advseg.train.train`; a model whose checkpoint is missing is left out and noted.
Beside them, from that seed's records at the headline eps: the clean DSC and the lowest DSC under
any white-box (attack, loss) of the grid, with the attack that reached it.

The models are those of the run's ``config.yaml`` or of an ``advseg evaluate`` output's
``evaluate.yaml`` (:func:`run_checkpoints`); :func:`training_facts` gives one checkpoint's
method, eps and seconds (the provenance and the defence table show them too). Models trained at
several seeds show the spread between seeds, seed by seed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from advseg.augment import corruption_text
from advseg.config import from_dict, load_yaml
from advseg.defences.adversarial_training import PLAUSIBLE_TRAINING, AdversarialConfig, describe
from advseg.errors import UserError
from advseg.models.checkpoint import read_metadata
from advseg.report.html import Section, eps_text
from advseg.runs.records import white_box
from advseg.stats.summary import summarize_cells

COLUMNS = ["model", "seed", "arch", "adversarial_training", "selected_by", "val_dice",
           "best_epoch", "epochs", "train_seconds", "time_ratio"]  # fmt: skip


def run_checkpoints(run_dir: str | Path) -> list[tuple[str, Path]]:
    """``(model name in the records, checkpoint path)`` of every model a run evaluated.

    An ``advseg run`` directory names them in ``config.yaml`` (a model's own ``checkpoint:``, or
    ``models/<name>[/seed<k>][/fold<k>]/checkpoints/best`` for each training seed and
    cross-validation fold); an ``advseg evaluate`` output in ``evaluate.yaml`` (its checkpoints,
    named as the records name them, :func:`advseg.train.trained.model_label`: the folds of one
    cross-validated run under its name). Empty when the run says neither.
    """

    run_dir = Path(run_dir)
    found: list[tuple[str, Path]] = []
    config_file = run_dir / "config.yaml"
    if config_file.exists():
        config = load_yaml(config_file) or {}
        seeds = config.get("seeds") or [None]  # a grid with seeds trains each model per seed
        folds = (config.get("split") or {}).get("folds")  # and with folds, once per fold
        for spec in config.get("models") or []:
            name = str(spec.get("name") or spec.get("arch"))
            if spec.get("checkpoint"):
                found.append((name, Path(spec["checkpoint"])))
                continue
            for seed in seeds:
                folder = run_dir / "models" / name / ("" if seed is None else f"seed{seed}")
                for fold in [None] if not folds else range(folds):
                    at = folder if fold is None else folder / f"fold{fold}"
                    found.append((name, at / "checkpoints" / "best"))
    settings = run_dir / "evaluate.yaml"  # advseg.evaluate.command.SETTINGS_FILE
    if settings.exists():
        for checkpoint in (load_yaml(settings) or {}).get("checkpoints") or []:
            found.append((_record_name(checkpoint), Path(checkpoint)))
    return found


def _record_name(checkpoint: str | Path) -> str:
    """The name the records of ``checkpoint`` carry (its file's, or its cross-validated run's)."""
    from advseg.models.checkpoint import newest_complete
    from advseg.train.trained import checkpoint_label, model_label

    try:
        return model_label(checkpoint, read_metadata(newest_complete(checkpoint)).data)[0]
    except UserError:
        return checkpoint_label(checkpoint)


def training_facts(path: str | Path) -> dict[str, Any]:
    """How the checkpoint at ``path`` was trained, from its metadata (JSON only, no weights).

    Returns:
        ``method`` (the adversarial training's method, ``noise`` for Gaussian-noise training, or
        ``none``), ``eps`` (its budget, None without one), ``noise_sigma``, ``seconds`` (the
        whole run's training time: ``last``'s where it exists, as ``best`` is written mid-run;
        None when not stored), ``corruptions`` (the corruption augmentation in words,
        :func:`advseg.augment.corruption_text`; ``""`` without), ``label``
        (:func:`advseg.defences.describe`'s words, noise and corruptions added), ``seed``,
        ``arch``, ``advseg`` (the version it was trained with).

    Raises:
        UserError: no readable checkpoint metadata at ``path``.
    """
    path = Path(path)
    meta = read_metadata(path)
    stem = path.name.removesuffix(".json").removesuffix(".safetensors")
    last = path.parent / "last.json"
    if stem == "best" and last.exists():
        meta.metrics = {**meta.metrics, **_totals(read_metadata(last).metrics)}
    adversarial = _adversarial(meta.train)
    sigma = float(meta.train.get("noise_sigma") or 0.0)
    label = _in_255(describe(adversarial).split("; ")[0], adversarial)
    method = adversarial.method if adversarial.enabled else "none"
    if sigma > 0:
        label = f"noise sigma {sigma:g}" if label == "none" else f"{label}, noise sigma {sigma:g}"
        method = "noise" if method == "none" else f"{method}+noise"
    corruptions = corruption_text(meta.train.get("augment") or {})
    if corruptions:
        label = corruptions if label == "none" else f"{label}, {corruptions}"
    seconds = meta.metrics.get("train_seconds")
    return {
        "method": method,
        "eps": adversarial.eps if adversarial.enabled else None,
        "noise_sigma": sigma,
        "corruptions": corruptions,
        "seconds": None if seconds is None else float(seconds),
        "label": label,
        "seed": int(meta.train.get("seed", 0)),
        "arch": meta.model,
        "advseg": (meta.versions or {}).get("advseg"),
    }


def facts_text(facts: dict[str, Any]) -> str:
    """One line: ``pgd eps 0.0314 (8/255), 10 steps of 0.00784; 293 s`` (eps also in /255)."""
    label = facts["label"]
    seconds = "time not stored" if facts["seconds"] is None else f"{facts['seconds']:.0f} s"
    version = f", advseg {facts['advseg']}" if facts.get("advseg") else ""
    return f"{label}; trained in {seconds}{version}"


def _in_255(label: str, adversarial: AdversarialConfig) -> str:
    """``describe``'s words with the eps also in /255: ``pgd eps 0.0314 (8/255), ...``."""
    if not adversarial.enabled or adversarial.method in PLAUSIBLE_TRAINING:  # not pixel units
        return label
    return label.replace(f"eps {adversarial.eps:g}", f"eps {eps_text(adversarial.eps)}", 1)


def _adversarial(train: dict[str, Any]) -> AdversarialConfig:
    try:
        return from_dict(AdversarialConfig, train.get("adversarial") or {})
    except UserError:
        return AdversarialConfig()


def training_table(run_dir: str | Path) -> tuple[pd.DataFrame, list[str]]:
    """The training table of ``run_dir`` and the notes on what it could not show.

    One row per model of :func:`run_checkpoints` (an ``advseg run`` or ``advseg evaluate``
    output). ``time_ratio`` is ``train_seconds`` over the mean of the undefended models'
    (``method: none``) in the same run; empty when the run has none.

    Returns:
        ``(table with COLUMNS, notes)``; the table is empty when the run names no checkpoint.
    """
    notes: list[str] = []
    rows = []
    for name, path in run_checkpoints(run_dir):
        try:
            meta = read_metadata(path)
            last = path.parent / "last"  # the whole run's time: "best" was written mid-run
            if path.name == "best" and last.with_suffix(".json").exists():
                meta.metrics = {**meta.metrics, **_totals(read_metadata(last).metrics)}
        except UserError as err:
            notes.append(f"model {name}: no training details ({err})")
            continue
        row = _row(name, meta.model, meta.train, meta.metrics, meta.epoch)
        folds = meta.data.get("folds")  # a cross-validation fold's model: which fold
        rows.append({**row, "fold": folds["fold"] if isinstance(folds, dict) else None})
    table = pd.DataFrame(rows, columns=[*COLUMNS[:2], "fold", *COLUMNS[2:]])
    if table["fold"].isna().all():
        table = table.drop(columns="fold")
    plain = table.loc[table["adversarial_training"] == "none", "train_seconds"].dropna()
    if len(plain) and plain.mean() > 0:
        table["time_ratio"] = table["train_seconds"] / plain.mean()
    return table, notes


def _totals(metrics: dict[str, Any]) -> dict[str, Any]:
    return {key: metrics[key] for key in ("last", "train_seconds") if key in metrics}


def _row(
    name: str, arch: str, train: dict[str, Any], metrics: dict[str, Any], epoch: int
) -> dict[str, Any]:
    adversarial = _adversarial(train)
    label = _in_255(describe(adversarial).split("; ")[0], adversarial)
    if train.get("noise_sigma"):
        sigma = float(train["noise_sigma"])
        label = f"noise sigma {sigma:g}" if label == "none" else f"{label}, noise sigma {sigma:g}"
    corruptions = corruption_text(train.get("augment") or {})
    if corruptions:
        label = corruptions if label == "none" else f"{label}, {corruptions}"
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
    """The "Training" section, when the run names its checkpoints: one row per (model, seed),
    that seed's clean and worst white-box DSC beside it."""
    table, notes = training_table(run_dir)
    defended = bool((table["adversarial_training"] != "none").any())
    seeded = bool(table.groupby("model")["seed"].nunique().gt(1).any()) if len(table) else False
    if table.empty:
        return [Section("Training", [writer.note(text) for text in notes])] if notes else []
    attacked = records[(records["eps"] == eps) & (records["corruption"] == "")]  # no corruption
    at_eps = white_box(attacked)
    per_seed = []
    if not at_eps.empty:
        for seed, frame in at_eps.groupby("seed", sort=True):
            cells = summarize_cells(frame, protocol).dropna(subset=["dsc_adv"])
            if cells.empty:  # no slice with a structure: no Dice
                continue
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
    if per_seed:
        table = table.merge(pd.concat(per_seed), on=["model", "seed"], how="left")
    title = "Training and adversarial training" if defended else "Training"
    title = "Training, per seed" if seeded and not defended else title
    section = Section(f"{title} (eps {eps:g})")
    section.blocks.append(
        writer.table(
            "training",
            table,
            "How each model was trained, one row per training seed (and cross-validation fold, "
            "whose clean and worst DSC are those of the folds pooled): its adversarial training "
            "(the attack inside each training step), what picked its best checkpoint and that "
            "checkpoint's validation Dice (global Dice: TP, FP, FN summed over every validation "
            "pixel per class; robust Dice where selected by it), its training time and the ratio "
            f"to the undefended models' time; then that seed's clean DSC ({protocol} Dice, as "
            "Table II) and its "
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
