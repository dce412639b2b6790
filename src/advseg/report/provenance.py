"""The report's first section: where its numbers came from, and whether a model is usable.

What advseg wrote (version, command line, device, dates: :mod:`advseg.runs.provenance`), the data
(the synthetic phantom said plainly, else the path; slices in the data set and evaluated; cases),
the run's ``config.yaml`` verbatim, the models advseg did not train (``external.json``: folder or
bundle, folds, configuration, checkpoint hashes, units), the report's own version and date, and a
warning for each model whose clean DSC is below :data:`BROKEN_DICE` (its Attack Success measures
noise).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

import advseg
from advseg.config import load_yaml
from advseg.data.location import describe, is_synthetic
from advseg.errors import UserError
from advseg.report.html import Block, Section
from advseg.runs.provenance import now, read_sessions

BROKEN_DICE = 0.1
"""A clean DSC below this (on the report's protocol) marks a model as broken: it segments next to
nothing, so the Dice an attack removes is noise, not robustness."""


def broken_models(table: pd.DataFrame) -> list[tuple[str, float]]:
    """``(model, clean DSC)`` of Table II's rows whose clean DSC is below :data:`BROKEN_DICE`."""
    found = []
    for model, dsc in zip(table["model"], table["DSC clean"], strict=True):
        if pd.notna(dsc) and float(dsc) < BROKEN_DICE:
            found.append((str(model), float(dsc)))
    return found


def warnings_for(table: pd.DataFrame, protocol: str) -> list[str]:
    """One line per broken model, naming the threshold."""
    return [
        f"model {model} has a clean DSC of {dsc:.3f} ('{protocol}'), below {BROKEN_DICE:g}, the "
        "least a usable model reaches: it segments next to nothing, so its Attack Success and "
        "DSC under attack say nothing about robustness (train it longer or check its data)."
        for model, dsc in broken_models(table)
    ]


def _json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _data_rows(run_dir: Path, records: pd.DataFrame, locations: list[str]) -> list[tuple]:
    if not locations:
        source = "not recorded (no data.json or config.yaml data.path in the run)"
    elif all(is_synthetic(x) for x in locations):
        source = "SYNTHETIC: the generated phantom, not patient data"
    else:
        source = ", ".join(
            describe(x) + (" (synthetic phantom)" if is_synthetic(x) else "") for x in locations
        )
    saved = _json(run_dir / "data.json")
    rows = [("data", source)]
    if "slices" in saved:
        rows.append(("data set size", f"{saved['slices']} slices"))
    if saved.get("classes"):  # advseg run records these (data.record.run_data_record)
        rows.append(("classes", ", ".join(map(str, saved["classes"]))))
    if saved.get("labels"):
        rows.append(("label mapping", str(saved["labels"])))
    if saved.get("cache"):
        rows.append(("cache", str(saved["cache"])))
    slices = records["slice_id"].nunique()
    evaluated = f"{slices} slices of {records['case'].nunique()} cases"
    most = _max_slices(run_dir)
    if most is not None:
        evaluated += (
            f" (evaluation.max_slices {most}: at most {most} of the test slices, a seeded draw "
            "spread over the test cases)"
        )
    rows.append(("evaluated", evaluated))
    return rows


def _max_slices(run_dir: Path) -> int | None:
    """``evaluation.max_slices`` of the run's ``config.yaml``, when it set one."""
    try:
        value = (load_yaml(run_dir / "config.yaml") or {})["evaluation"]["max_slices"]
    except (OSError, UserError, KeyError, TypeError):
        return None
    return value if isinstance(value, int) else None


def _session_rows(run_dir: Path) -> list[tuple]:
    sessions = read_sessions(run_dir)
    if not sessions:
        return [("computed", "not recorded (run from before provenance.json was written)")]
    rows = []
    for i, s in enumerate(sessions, 1):
        label = "computed" if len(sessions) == 1 else f"session {i}"
        what = (
            f"{s.get('started', '?')} by advseg {s.get('advseg', '?')} on "
            f"{s.get('device', '?')} (torch {s.get('torch', '?')}, python {s.get('python', '?')})"
        )
        rows += [(label, what), (f"{label} command", str(s.get("argv", s.get("command", "?"))))]
    return rows


def _checkpoint_rows(run_dir: Path) -> list[tuple]:
    """How each model of the run was trained (method, eps also in /255, seconds, the advseg
    version), from the checkpoints the run names (:func:`advseg.report.training.run_checkpoints`:
    ``config.yaml`` or an ``advseg evaluate`` output's ``evaluate.yaml``)."""
    from advseg.errors import UserError
    from advseg.report.training import facts_text, run_checkpoints, training_facts

    rows = []
    checkpoints = run_checkpoints(run_dir)
    names = [name for name, _ in checkpoints]
    for name, path in checkpoints:
        try:
            facts = training_facts(path)
        except UserError as err:
            rows.append((f"trained: {name}", f"not known ({err})"))
            continue
        several = names.count(name) > 1  # a grid with seeds: one checkpoint per seed
        label = f"trained: {name} (seed {facts['seed']})" if several else f"trained: {name}"
        rows.append((label, facts_text(facts)))
    return rows


def external_text(facts: dict[str, Any]) -> str:
    """One model advseg did not train, in a line: what it is (folder or bundle, configuration,
    folds, checkpoint and its hashes), and the units its eps are in."""
    kind = facts.get("kind", "?")
    parts = []
    if kind == "nnunet":
        parts.append(f"nnU-Net v2 results folder {facts.get('folder', '?')}")
        parts.append(f"configuration {facts.get('configuration', '?')}")
        parts.append(f"folds {', '.join(map(str, facts.get('folds', []))) or '?'}")
        parts.append(f"checkpoint {facts.get('checkpoint', '?')}")
        parts.append(f"trainer {facts.get('trainer', '?')}")
        parts.append("mirroring " + ("on" if facts.get("mirroring", True) else "off"))
        hashes = facts.get("checkpoint_sha256", {})
    elif kind == "bundle":
        parts.append(f"MONAI bundle {facts.get('bundle', '?')} ({facts.get('config', '?')})")
        parts.append(f"weights {facts.get('weights', '?')}")
        parts.append(f"inferer {facts.get('inferer', '?')}")
        parts.append(f"preprocessing {' > '.join(facts.get('preprocessing', [])) or 'none'}")
        hashes = facts.get("sha256", {})
    else:
        parts.append(f"{kind} {facts.get('path', '?')}")
        hashes = facts.get("sha256", {})
    if facts.get("activation"):
        parts.append(f"{facts['activation']} outputs")
    parts += [f"SHA-256 of {name}: {digest}" for name, digest in hashes.items()]
    if facts.get("units"):
        parts.append(f"eps in {facts['units']}")
    return "; ".join(parts)


def _external_rows(run_dir: Path) -> list[tuple]:
    """The models advseg did not train (``external.json`` of an ``advseg evaluate`` output, or
    of each run of a grid, one folder down)."""
    rows = []
    for path in [run_dir / "external.json", *sorted(run_dir.glob("*/external.json"))]:
        for name, facts in _json(path).items():
            if isinstance(facts, dict):
                rows.append((f"model: {name}", external_text(facts)))
    return list(dict.fromkeys(rows))


def section(
    writer: Any,
    run_dir: Path,
    records: pd.DataFrame,
    table: pd.DataFrame,
    protocol: str,
    locations: list[str],
) -> Section:
    """The provenance section (``writer`` is the report's file writer)."""
    blocks = [Block("warning", line) for line in warnings_for(table, protocol)]
    rows = [
        ("run", str(run_dir.resolve())),
        *_data_rows(run_dir, records, locations),
        *_session_rows(run_dir),
        *_checkpoint_rows(run_dir),
        *_external_rows(run_dir),
        ("report", f"{now()} by advseg {advseg.__version__}"),
        ("Dice protocol", protocol),
        ("broken-model threshold", f"clean DSC < {BROKEN_DICE:g}"),
    ]
    frame = pd.DataFrame(rows, columns=["what", "value"])
    caption = "Where these numbers came from (dates in UTC)."
    blocks.append(writer.table("provenance", frame, caption))
    config = run_dir / "config.yaml"
    if config.is_file():
        code = config.read_text()
        blocks.append(Block("code", f"The run's configuration ({config.resolve()})", code=code))
    else:
        blocks.append(Block("text", "No config.yaml: the command line above is the settings."))
    return Section("Provenance", blocks)
