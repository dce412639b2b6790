"""An experiment: a grid of models x attacks x eps values, each evaluated under several losses.

An experiment file (YAML) names the data, the models (trained here or loaded from checkpoints),
the attacks with their losses and eps values, and the evaluation protocol. :func:`run_experiment`
works through the grid one *cell* at a time (one model, one attack, one eps, every loss of that
attack) and writes each cell's records atomically, so that a run stopped at any point and started
again skips the finished cells and redoes only the unfinished one. The run directory holds::

    config.yaml              the resolved experiment (a different experiment is refused)
    checkpoints/<model>.*    trained models (not retrained on resume)
    records/<cell>.parquet   one file per finished cell
    examples/<cell>.npz      a few slices' images and predictions, for the report's panels
    summary.csv              Table II at the headline eps
    report/                  report.html, report.md, CSV and PNG files
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pandas as pd

from advseg.config import from_dict, load_yaml, save_yaml, to_dict
from advseg.errors import UserError
from advseg.losses import LOSSES
from advseg.records import write_records
from advseg.report.examples import save_examples

PAPER_LOSSES = ["bce", "focal", "dicefocal"]


@dataclass
class ModelSpec:
    """One model of the grid.

    Attributes:
        arch: a model zoo name (``advseg models`` lists them), e.g. ``unet`` or ``smp:Unet:vgg13``.
        name: the model's label in the run (records, tables, checkpoint file); defaults to ``arch``
            with every character outside ``[A-Za-z0-9._-]`` replaced by ``-``.
        checkpoint: load this checkpoint (path without suffix) instead of training.
    """

    arch: str = "unet"
    name: str = ""
    checkpoint: Path | None = None

    def __post_init__(self) -> None:
        self.name = self.name or slug(self.arch)


@dataclass
class AttackSpec:
    """One attack of the grid, evaluated at every eps under every loss.

    Attributes:
        name: an attack registry name (``fgsm``, ``pgd``, ...).
        losses: loss registry names the attack maximises, one records set each.
        eps: L-inf budgets in image units ([0, 1] range).
        kwargs: further attack arguments (steps, step size, ...), passed as they are.
    """

    name: str = "fgsm"
    losses: list[str] = field(default_factory=lambda: list(PAPER_LOSSES))
    eps: list[float] = field(default_factory=lambda: [0.009])
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvaluationSpec:
    """Which slices are attacked and how the results are summarised.

    Attributes:
        test_fraction: share of cases held out for testing (grouped by case, never split).
        slices: ``with_mask`` evaluates the test slices that have a mask (the paper's protocol);
            ``all`` evaluates every test slice.
        max_slices: evaluate at most this many test slices (the first ones in index order).
        batch_size: slices per attack batch.
        examples: slices per cell whose images and predictions are kept for the report's panels.
        protocol: the Dice protocol of the summary (``paper``, ``per-class``, ``global``).
    """

    test_fraction: float = 0.1
    slices: Literal["with_mask", "all"] = "with_mask"
    max_slices: int | None = None
    batch_size: int = 16
    examples: int = 2
    protocol: Literal["paper", "per-class", "global"] = "per-class"


@dataclass
class ExperimentConfig:
    """A whole experiment, as read from its YAML file (every key optional)."""

    name: str = "experiment"
    seed: int = 0
    data: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    models: list[ModelSpec] = field(default_factory=lambda: [ModelSpec()])
    attacks: list[AttackSpec] = field(default_factory=lambda: [AttackSpec()])
    evaluation: EvaluationSpec = field(default_factory=EvaluationSpec)
    report: bool = True


def slug(text: str) -> str:
    """A stable file-name-safe form of ``text``: characters outside ``[A-Za-z0-9._-]`` become -."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "x"


@dataclass(frozen=True)
class Cell:
    """One unit of work and of resumption: one model, one attack, one eps, several losses."""

    model: str
    attack: str
    eps: float
    losses: tuple[str, ...]
    kwargs: tuple[tuple[str, Any], ...] = ()

    @property
    def slug(self) -> str:
        """The cell's file name stem, e.g. ``unet__fgsm__eps0.009``."""
        return f"{slug(self.model)}__{slug(self.attack)}__eps{self.eps:g}"


def check_config(config: ExperimentConfig) -> ExperimentConfig:
    """Check what the dataclass types cannot: names, ranges and duplicates, naming the key."""
    if not config.models:
        raise UserError("models: at least one model is needed")
    if not config.attacks:
        raise UserError("attacks: at least one attack is needed")
    seen: dict[str, int] = {}
    for i, model in enumerate(config.models):
        if model.name in seen:
            raise UserError(
                f"models[{i}].name: {model.name!r} is also models[{seen[model.name]}]; "
                "give one of them another name"
            )
        seen[model.name] = i
    kwargs_of: dict[str, tuple[int, dict[str, Any]]] = {}
    for i, attack in enumerate(config.attacks):
        if not attack.losses:
            raise UserError(f"attacks[{i}].losses: at least one loss is needed")
        for j, loss in enumerate(attack.losses):
            if loss not in LOSSES:
                raise UserError(f"attacks[{i}].losses[{j}]: {LOSSES.unknown_message(loss)}")
        if not attack.eps:
            raise UserError(f"attacks[{i}].eps: at least one eps is needed")
        for j, eps in enumerate(attack.eps):
            if not (math.isfinite(eps) and eps >= 0):
                raise UserError(f"attacks[{i}].eps[{j}]: {eps} is not a number >= 0")
        first = kwargs_of.setdefault(attack.name, (i, attack.kwargs))
        if first[1] != attack.kwargs:
            raise UserError(
                f"attacks[{i}].kwargs: attack {attack.name!r} appears in attacks[{first[0]}] with "
                "other kwargs; the records could not tell them apart"
            )
    ev = config.evaluation
    if not 0 < ev.test_fraction < 1:
        raise UserError(f"evaluation.test_fraction: {ev.test_fraction} is not between 0 and 1")
    for key in ("batch_size", "max_slices"):
        value = getattr(ev, key)
        if value is not None and value < 1:
            raise UserError(f"evaluation.{key}: {value} must be at least 1")
    if ev.examples < 0:
        raise UserError(f"evaluation.examples: {ev.examples} must be 0 or more")
    return config


def load_experiment(path: str | Path) -> ExperimentConfig:
    """Read and check an experiment file; a bad key or value is a UserError naming key and file."""
    data = load_yaml(path)
    try:
        return check_config(from_dict(ExperimentConfig, data or {}))
    except UserError as err:
        raise UserError(f"{path}: {err}") from None


def plan_cells(config: ExperimentConfig) -> list[Cell]:
    """The grid in run order (model by model), with the losses of repeated (attack, eps) united."""
    cells: dict[tuple[str, str, float], list[str]] = {}
    kwargs: dict[str, tuple[tuple[str, Any], ...]] = {}
    for model in config.models:
        for attack in config.attacks:
            kwargs[attack.name] = tuple(sorted(attack.kwargs.items()))
            for eps in attack.eps:
                losses = cells.setdefault((model.name, attack.name, float(eps)), [])
                losses += [loss for loss in attack.losses if loss not in losses]
    return [
        Cell(model, attack, eps, tuple(losses), kwargs[attack])
        for (model, attack, eps), losses in cells.items()
    ]


@dataclass
class CellOutput:
    """What computing one cell gives: its records and (optionally) example arrays."""

    records: pd.DataFrame
    examples: dict[str, Any] | None = None


@dataclass
class GridResult:
    """Which cells were computed now and which were found finished on disk."""

    computed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def run_cells(
    cells: Sequence[Cell],
    run_dir: str | Path,
    compute: Callable[[Cell], CellOutput],
    on_cell: Callable[[Cell, bool], None] | None = None,
) -> GridResult:
    """Compute every cell whose records file is missing; a present file means the cell is done.

    The examples file is written before the records file, and each atomically, so a records file
    on disk always belongs to a finished cell and an interrupted cell leaves nothing behind.

    Args:
        cells: the grid, in run order.
        run_dir: the run directory (``records/`` and ``examples/`` are made inside it).
        compute: evaluates one cell.
        on_cell: called after each cell with the cell and whether it was skipped (for progress).
    """
    run_dir = Path(run_dir)
    result = GridResult()
    for cell in cells:
        records_path = run_dir / "records" / f"{cell.slug}.parquet"
        if records_path.exists():
            result.skipped.append(cell.slug)
        else:
            output = compute(cell)
            if output.examples:
                path = run_dir / "examples" / f"{cell.slug}.npz"
                save_examples(
                    output.examples, path, model=cell.model, attack=cell.attack, eps=cell.eps
                )
            write_records(output.records, records_path)
            result.computed.append(cell.slug)
        if on_cell is not None:
            on_cell(cell, cell.slug in result.skipped)
    return result


def prepare_run_dir(config: ExperimentConfig, run_dir: str | Path) -> Path:
    """Create ``run_dir`` with the resolved config, or check that it holds this same experiment.

    Raises:
        UserError: ``run_dir/config.yaml`` holds a different experiment (naming the first key that
            differs), since resuming it with this config would mix two experiments' records.
    """
    run_dir = Path(run_dir)
    saved_path = run_dir / "config.yaml"
    resolved = to_dict(config)
    if saved_path.exists():
        saved = load_yaml(saved_path)
        difference = _first_difference(saved, resolved)
        if difference is not None:
            raise UserError(
                f"{saved_path}: this run directory holds another experiment ({difference} "
                "differs); use a new run directory"
            )
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_yaml(resolved, saved_path)
    return run_dir


def _first_difference(old: Any, new: Any, where: str = "") -> str | None:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new), key=str):
            found = _first_difference(
                old.get(key), new.get(key), f"{where}.{key}" if where else key
            )
            if found:
                return found
        return None
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for i, (a, b) in enumerate(zip(old, new, strict=True)):
            found = _first_difference(a, b, f"{where}[{i}]")
            if found:
                return found
        return None
    return None if old == new else (where or "the whole config")
