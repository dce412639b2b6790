"""A robustness card: one checkpoint measured by one fixed, documented protocol.

RobustBench's idea (https://robustbench.github.io, Croce et al., NeurIPS 2021 Datasets and
Benchmarks): every model is run through the same protocol, the numbers are stored as data (one
JSON per model, with what the model is and how it was trained), and pages are rendered from the
stored JSON. :func:`make_card` runs :data:`PROTOCOL` on a checkpoint's held-out cases and writes
``card.json`` and ``card.html``; :mod:`advseg.card.pages` renders a card and a leaderboard of many.

The protocol (version :data:`PROTOCOL_VERSION`), all on the cases the checkpoint held out (its own
``test_fraction`` and ``split_seed``), Dice under the ``per-class`` protocol
(:mod:`advseg.stats.summary`):

1. **clean Dice** on every held-out slice;
2. **SEA** (:class:`advseg.attacks.sea.SEA`, Croce, Singh & Hein, ECCV 2024: per slice the worst
   case over its members' runs) in L-inf at eps 2/255, 4/255 and 8/255, with the attack's
   reference setting (its default preset's steps per member); the card's headline robust Dice
   is the one at 8/255;
3. **corruption mean Dice**: the mean over every corruption of :mod:`advseg.corruptions`
   (TorchIO: motion, ghosting, spike, bias field, noise, blur, gamma, anisotropy) at each of its
   five severities of the Dice on the corrupted held-out slices, each image with its own
   seeded parameters (``corruption_seed(0, name, severity, slice id)``), in the spirit of
   ImageNet-C's mean over corruptions and severities (Hendrycks & Dietterich, ICLR 2019);
4. **certified Dice** (randomized smoothing, SegCertify, Fischer et al. 2021,
   :mod:`advseg.evaluate.certify`) at L2 radius :data:`CERTIFY_RADIUS` under noise sigma
   :data:`CERTIFY_SIGMA` (n0 16, n 128, alpha 0.001), abstentions counted wrong, on the held-out
   slices with a mask. A model not trained with noise is certified all the same (its number is
   low, and its training is on the card).

Every number carries the slices and cases it was computed on and its 95% case-bootstrap
interval (:func:`advseg.stats.bootstrap.case_bootstrap`, 2000 draws, seed 0: the slices of one
case resampled together; the corruption mean resamples the same cases in all of its cells); with
fewer than :data:`advseg.stats.bootstrap.MIN_CASES` cases the bounds are left out (null) and the
card says the interval is not meaningful, as Table II does. ``max_slices`` (tests and quick
looks) and fewer SEA steps or noise samples than the protocol's are *deviations*: the card lists
them and the leaderboard marks such a card, so that a reduced card is never read as a full one.
"""

from __future__ import annotations

import inspect
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

import advseg
from advseg.errors import UserError

PROTOCOL_VERSION = "advseg-card/1"
SEA_EPS = (2 / 255, 4 / 255, 8 / 255)
"""The SEA budgets (L-inf, images in [0, 1])."""
HEADLINE_EPS = 8 / 255
CERTIFY_SIGMA = 0.25
CERTIFY_RADIUS = 0.1
"""L2 radius of the certified Dice (image range [0, 1])."""
CERTIFY_N0, CERTIFY_N, CERTIFY_ALPHA = 16, 128, 0.001
DICE = "per-class"


@dataclass
class CardConfig:
    """How to make one card.

    Attributes:
        checkpoint: the checkpoint (``PATH``, ``PATH.safetensors`` or ``PATH.json``).
        out: the directory for ``card.json`` and ``card.html``.
        data, cache_dir: where its data is, when not where it was trained
            (:func:`advseg.train.trained.trained_data_config`).
        max_slices: at most this many held-out slices (seeded by the split's seed, spread over
            the cases); a deviation from the protocol.
        sea_steps: SEA's steps (None: the attack's default); fewer is a deviation.
        certify_n: noisy samples per certified decision (default the protocol's 128); fewer is
            a deviation.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N``.
        batch_size: slices per batch.
        corruptions: only these corruptions (names, each at severities 1-5); None: every one
            (the protocol's); fewer is a deviation.
    """

    checkpoint: Path
    out: Path
    data: Path | None = None
    cache_dir: Path | None = None
    max_slices: int | None = None
    sea_steps: int | None = None
    certify_n: int = CERTIFY_N
    device: str = "auto"
    batch_size: int = 8
    corruptions: list[str] | None = None


def sea_default_steps() -> int:
    """The steps per member SEA takes by default (its default preset's, read from the attack,
    not copied: 300 in SEA's reference setting)."""
    from advseg.attacks.sea import PRESETS, SEA

    return int(PRESETS[inspect.signature(SEA.__init__).parameters["preset"].default])


def protocol(config: CardConfig) -> dict[str, Any]:
    """The protocol as run: its settings and the deviations from :data:`PROTOCOL_VERSION`."""
    steps = sea_default_steps() if config.sea_steps is None else config.sea_steps
    deviations = []
    if config.max_slices is not None:
        deviations.append(f"at most {config.max_slices} held-out slices (max_slices)")
    if steps < sea_default_steps():
        deviations.append(f"SEA with {steps} steps per member (protocol: {sea_default_steps()})")
    if config.certify_n < CERTIFY_N:
        deviations.append(f"certified with n {config.certify_n} (protocol: {CERTIFY_N})")
    names = corruption_names(config)
    if len(names) < len(corruption_names()):
        deviations.append(
            f"corruptions {', '.join(names)} only (protocol: all {len(corruption_names())})"
        )
    return {
        "version": PROTOCOL_VERSION,
        "split": "test (the cases the checkpoint held out)",
        "dice": DICE,
        "sea": {"eps": list(SEA_EPS), "norm": "linf", "steps_per_member": steps},
        "corruptions": {
            "names": corruption_names(config),
            "severities": [1, 2, 3, 4, 5],
            "seed": 0,  # with each slice id: advseg.corruptions.corruption_seed
        },
        "certify": {
            "sigma": CERTIFY_SIGMA,
            "radius": CERTIFY_RADIUS,
            "n0": CERTIFY_N0,
            "n": config.certify_n,
            "alpha": CERTIFY_ALPHA,
            "norm": "l2",
        },
        "max_slices": config.max_slices,
        "deviations": deviations,
    }


def corruption_names(config: CardConfig | None = None) -> list[str]:
    """The corruptions a card measures: ``config.corruptions`` (checked, each once), else
    every corruption advseg has (:data:`advseg.corruptions.CORRUPTIONS`), in its order."""
    from advseg.corruptions import CORRUPTIONS, parse_corruptions

    if config is None or config.corruptions is None:
        return list(CORRUPTIONS.names())
    if not config.corruptions or any(":" in n or n == "all" for n in config.corruptions):
        raise UserError("--corruption: name whole corruptions (each at severities 1-5)")
    cells = parse_corruptions(config.corruptions)  # unknown or repeated names: one line
    return list(dict.fromkeys(name for name, _ in cells))


def make_card(config: CardConfig) -> dict[str, Any]:
    """Run the protocol on ``config.checkpoint``; write ``card.json`` and ``card.html``.

    Returns:
        The card (what ``card.json`` holds).

    Raises:
        UserError: a bad option, an unreadable checkpoint, data that does not fit it, or an
            empty held-out split.
    """
    from advseg.atomic import check_output_dir, write_text_atomic
    from advseg.card.pages import card_page
    from advseg.runs.provenance import describe_device, now
    from advseg.train import resolve_device

    if config.max_slices is not None and config.max_slices < 1:
        raise UserError(f"--max-slices: {config.max_slices} must be at least 1")
    if config.sea_steps is not None and config.sea_steps < 1:
        raise UserError(f"--sea-steps: {config.sea_steps} must be at least 1")
    if config.certify_n < 1:
        raise UserError(f"--certify-n: {config.certify_n} must be at least 1")
    corruption_names(config)  # a bad --corruption before any work
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a directory")
    check_output_dir(out, "--out directory")
    started = time.monotonic()
    device = resolve_device(config.device)
    settings = protocol(config)
    model, meta, data, rows = _load(config, device)
    results = {"clean": None, "sea": _sea(config, model, meta, data, rows, settings)}
    results["clean"] = results["sea"].pop("clean")
    results["robust"] = next(r for r in results["sea"]["at"] if r["eps"] == HEADLINE_EPS)
    results["corruptions"] = _corruptions(config, model, meta, data, rows)
    results["certified"] = _certified(config, settings)
    model_info = _model_info(config, meta, data, rows)
    card = {
        "format": PROTOCOL_VERSION,
        "model": model_info,
        "protocol": settings,
        "results": results,
        "warnings": card_warnings(results, model_info),
        "provenance": {
            "created": now(),
            "advseg": advseg.__version__,
            "device": describe_device(device),
            "seconds": round(time.monotonic() - started, 1),
            "threads": torch_threads(),
        },
    }
    write_text_atomic(out / "card.json", json.dumps(card, indent=2) + "\n")
    write_text_atomic(out / "card.html", card_page(card))
    return card


def torch_threads() -> int:
    """torch's intra-op thread count (``--threads``): it moves results in the 4th decimal."""
    import torch

    return int(torch.get_num_threads())


def card_warnings(results: dict[str, Any], model: dict[str, Any]) -> list[str]:
    """What a reader must know before comparing the card's numbers: a model whose clean Dice is
    below :data:`advseg.report.provenance.BROKEN_DICE` (its robustness numbers measure noise),
    and a certified Dice of a model not trained with noise of the certified sigma."""
    from advseg.report.provenance import BROKEN_DICE

    found = []
    clean = results["clean"]["dice"]
    if clean < BROKEN_DICE:
        found.append(
            f"clean Dice {clean:.3f} is below {BROKEN_DICE:g}: the model segments next to "
            "nothing, so its Dice under attack, corruption or certification says nothing "
            "about robustness"
        )
    sigma = float((model.get("training") or {}).get("noise_sigma") or 0.0)
    if abs(sigma - CERTIFY_SIGMA) > 1e-12:
        found.append(
            f"trained with noise sigma {sigma:g}, certified under {CERTIFY_SIGMA:g}: its "
            "certified Dice is that of a smoothed model it was not trained to be"
        )
    return found


def _load(config: CardConfig, device: Any) -> tuple[Any, Any, Any, np.ndarray]:
    """The model, its metadata, its data and the held-out rows (``max_slices`` of them)."""
    from advseg.data import held_out_rows, load_data, saved_preprocess, spread_rows
    from advseg.models.checkpoint import check_compatible, load_checkpoint
    from advseg.train.trained import trained_data_config

    checkpoint = Path(config.checkpoint)
    model, meta = load_checkpoint(checkpoint, device)
    preprocess = saved_preprocess(meta.preprocessing, f"{checkpoint} preprocessing")
    data_config = trained_data_config(
        meta.data, checkpoint, preprocess, config.data, config.cache_dir
    )
    data = load_data(data_config)
    check_compatible(meta, checkpoint, in_channels=preprocess.channels, classes=list(data.classes))
    rows = held_out_rows(data.index, meta.data, str(checkpoint))
    if config.max_slices is not None:
        seed = int(meta.data.get("split_seed", 0))
        rows = spread_rows(data.index, rows, config.max_slices, seed)
    if len(rows) == 0:
        raise UserError(f"{checkpoint}: the held-out split has no slices")
    return model, meta, data, rows


def _counts(records: Any) -> dict[str, int]:
    return {"slices": int(records["slice_id"].nunique()), "cases": int(records["case"].nunique())}


def card_interval(records: Any, statistic: str, by: str | None = None) -> dict[str, Any]:
    """The 95% case-bootstrap interval of one card number (``dsc_clean`` or ``dsc_adv`` of
    ``records``, the mean over the ``by`` groups when given), as JSON: ``low``/``high`` (null
    below :data:`~advseg.stats.bootstrap.MIN_CASES` cases), ``level``, ``draws``, ``seed``,
    ``cases``, ``slices``, ``meaningful`` and ``text`` (what Table II's ``interval`` says)."""
    from advseg.stats.bootstrap import DRAWS, case_bootstrap, interval_note

    ci = case_bootstrap(records, DICE, draws=DRAWS, seed=0, by=by)[statistic]
    finite = ci.meaningful and np.isfinite(ci.low) and np.isfinite(ci.high)
    return {
        "low": float(ci.low) if finite else None,
        "high": float(ci.high) if finite else None,
        "level": ci.level,
        "draws": DRAWS,
        "seed": 0,
        "cases": ci.cases,
        "slices": ci.slices,
        "meaningful": bool(finite),
        "text": interval_note(ci.cases, ci.slices),
    }


def _sea(config: CardConfig, model: Any, meta: Any, data: Any, rows: np.ndarray,
         settings: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    """Clean Dice and SEA's Dice at each eps, from one sweep's records."""
    from advseg.attacks.sea import WORST_CASE_LOSS
    from advseg.evaluate import evaluate_sweep
    from advseg.stats.summary import summarize_cells
    from advseg.train.trained import checkpoint_label

    options: dict[str, Any] = {"activation": meta.activation}
    if config.sea_steps is not None:
        options["steps"] = config.sea_steps
    results = evaluate_sweep(
        model, data, rows, "sea", {eps: [WORST_CASE_LOSS] for eps in SEA_EPS},
        model_name=checkpoint_label(config.checkpoint), arch=meta.model, attack_kwargs=options,
        batch_size=config.batch_size,
    )  # fmt: skip
    at = []
    for eps, result in zip(SEA_EPS, results, strict=True):
        cell = summarize_cells(result.records, DICE).iloc[0]
        at.append({
            "eps": eps, "eps_255": round(eps * 255, 6), "dice": float(cell["dsc_adv"]),
            "attack_success": float(cell["as"]), "units": int(cell["units"]),
            **_counts(result.records), "interval": card_interval(result.records, "dsc_adv"),
        })  # fmt: skip
    first = summarize_cells(results[0].records, DICE).iloc[0]
    clean = {"dice": float(first["dsc_clean"]), "units": int(first["units"]),
             "interval": card_interval(results[0].records, "dsc_clean")}  # fmt: skip
    steps = settings["sea"]["steps_per_member"]
    return {"clean": {**clean, **_counts(results[0].records)}, "steps_per_member": steps, "at": at}


def _corruptions(
    config: CardConfig, model: Any, meta: Any, data: Any, rows: np.ndarray
) -> dict[str, Any]:
    """Mean Dice over every corruption at every severity (:mod:`advseg.corruptions`, TorchIO),
    by :func:`advseg.evaluate.corrupted.evaluate_corruptions` with seed 0: the numbers of
    ``advseg evaluate --corruption all`` on the same slices."""
    from advseg.corruptions import parse_corruptions
    from advseg.evaluate.corrupted import evaluate_corruptions
    from advseg.stats.summary import summarize_cells
    from advseg.train.trained import checkpoint_label

    pairs = parse_corruptions(corruption_names(config))
    results = evaluate_corruptions(
        model, data, rows, pairs, model_name=checkpoint_label(config.checkpoint),
        arch=meta.model, activation=meta.activation, seed=0, batch_size=config.batch_size,
    )  # fmt: skip
    cells = []
    for (name, severity), result in zip(pairs, results, strict=True):
        cell = summarize_cells(result.records, DICE).iloc[0]
        cells.append({"name": name, "severity": severity, "dice": float(cell["dsc_adv"])})
    names = list(dict.fromkeys(name for name, _ in pairs))
    per_corruption = {
        name: float(np.mean([c["dice"] for c in cells if c["name"] == name])) for name in names
    }
    first = summarize_cells(results[0].records, DICE).iloc[0]
    every = pd.concat(
        [r.records.assign(cell=f"{n}:{k}") for (n, k), r in zip(pairs, results, strict=True)],
        ignore_index=True,
    )  # the mean over cells, each draw resampling the same cases in every cell
    return {
        "dice": float(np.mean([c["dice"] for c in cells])),
        "interval": card_interval(every, "dsc_adv", by="cell"),
        "status": "measured",
        "per_corruption": per_corruption,
        "cells": cells,
        "units": int(first["units"]),
        **_counts(results[0].records),
    }


def _certified(config: CardConfig, settings: dict[str, Any]) -> dict[str, Any]:
    from advseg.defences.smoothing import SmoothingConfig
    from advseg.evaluate.certify import certified_summary, certify_checkpoint

    certify = settings["certify"]
    smoothing = SmoothingConfig(
        sigma=certify["sigma"], n0=certify["n0"], n=certify["n"], alpha=certify["alpha"],
        radii=[0.0, certify["radius"]],
    )  # fmt: skip
    records = certify_checkpoint(
        config.checkpoint, smoothing, data_path=config.data, cache_dir=config.cache_dir,
        max_slices=config.max_slices, batch_size=config.batch_size, device=config.device,
    )  # fmt: skip
    summary = certified_summary(records, DICE)
    row = summary[np.isclose(summary["radius"], certify["radius"])].iloc[0]
    at_radius = records[np.isclose(records["eps"], certify["radius"])]
    return {
        "radius": certify["radius"], "sigma": certify["sigma"],
        "dice": float(row["dsc_certified"]), "dice_plain": float(row["dsc_plain"]),
        "abstained": float(row["abstained"]), "units": int(row["units"]), **_counts(records),
        "interval": card_interval(at_radius, "dsc_adv"),
    }  # fmt: skip


def _model_info(config: CardConfig, meta: Any, data: Any, rows: np.ndarray) -> dict[str, Any]:
    """RobustBench-style model information: name, architecture, size, training, data."""
    from advseg.report.training import training_facts
    from advseg.train.trained import checkpoint_label

    facts = training_facts(config.checkpoint)
    return {
        "name": checkpoint_label(config.checkpoint),
        "checkpoint": str(Path(config.checkpoint).resolve()),
        "architecture": meta.model,
        "params": int(meta.params),
        "activation": meta.activation,
        "classes": list(meta.classes),
        "training": {k: facts[k] for k in ("method", "eps", "noise_sigma", "seconds", "label")},
        "trained_with": facts["advseg"],
        "data": {
            "location": str(data.location),
            "held_out_cases": int(data.index["case"].iloc[rows].nunique()),
            "held_out_slices": len(rows),
            "test_fraction": meta.data.get("test_fraction"),
            "split_seed": meta.data.get("split_seed"),
        },
    }


def read_card(path: str | Path) -> dict[str, Any]:
    """A card from ``card.json`` (or a directory holding one).

    Raises:
        UserError: not a readable card (naming the file).
    """
    path = Path(path)
    if path.is_dir():
        path = path / "card.json"
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path}: not a readable card ({err})") from None
    if not isinstance(card, dict) or not str(card.get("format", "")).startswith("advseg-card/"):
        raise UserError(f"{path}: not an advseg card (format {card.get('format')!r})"
                        if isinstance(card, dict) else f"{path}: not an advseg card")  # fmt: skip
    for key in ("model", "protocol", "results"):
        if key not in card:
            raise UserError(f"{path}: not an advseg card (no {key!r})")
    return card


__all__ = ["CardConfig", "make_card", "protocol", "read_card"]
