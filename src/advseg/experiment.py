"""An experiment: a grid of models x attacks x eps values, each evaluated under several losses.

An experiment file (YAML) names the data, the models (trained here or loaded from checkpoints),
the attacks with their losses and eps values, and the evaluation protocol. :func:`run_experiment`
works through the grid one *cell* at a time (one model, one attack, one eps, every loss of that
attack) and writes each cell's records atomically, so that a run stopped at any point and started
again skips the finished cells and redoes only the unfinished one. The run directory holds::

    config.yaml              the resolved experiment (a different experiment is refused)
    models/<model>/          each training run: checkpoints/best and last, log.csv (a finished
                             training is not redone; an interrupted one is resumed)
    records/<cell>.parquet   one file per finished cell
    examples/<cell>.npz      a few slices' images and predictions, for the report's panels
    summary.csv              Table II at the headline eps
    report/                  report.html, report.md, CSV and PNG files
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from rich.console import Console
from rich.progress import (
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)

from advseg import distributed
from advseg.atomic import remove_debris, write_text_atomic
from advseg.attacks import ATTACKS, attack_options, check_eps
from advseg.bootstrap import with_intervals
from advseg.compat import NOTEBOOK_ATTACKS, check_compat, compat_label
from advseg.config import from_dict, load_yaml, save_yaml, to_dict
from advseg.cross_model import (
    ENSEMBLE_PREFIX,
    CrossModel,
    check_cross_model,
    model_seeds,
    transfer_cells,
)
from advseg.data import DataConfig, SliceData, load_data, split_train_val_test, spread_rows
from advseg.data.location import run_data_record
from advseg.defences import defend, defended_name
from advseg.defences.adversarial_training import AdversarialConfig
from advseg.errors import UserError
from advseg.evaluate.cells import evaluate_sweep
from advseg.labels import DEFAULT_LOSS, checkpoint_activation
from advseg.losses import LOSSES, loss_activation
from advseg.models import load_checkpoint, read_checkpoint
from advseg.models.checkpoint import checkpoint_exists
from advseg.models.ensemble import ensemble_members
from advseg.models.zoo import resolve as resolve_model
from advseg.preflight import check_experiment, same_data
from advseg.progress import cell_progress
from advseg.provenance import record_session
from advseg.records import read_records, white_box, write_records
from advseg.report import Report, write_report
from advseg.report.examples import save_examples
from advseg.report.tables import file_stem, headline_eps
from advseg.summary import DEFAULT_PROTOCOL, summarize_cells
from advseg.traces import write_trace
from advseg.train import TrainConfig, resolve_device, train_on_data
from advseg.transfer import source_stem

PAPER_LOSSES = ["bce", "focal", "dicefocal"]


@dataclass
class ModelSpec:
    """One model of the grid.

    Attributes:
        arch: a model zoo name (``advseg models`` lists them), e.g. ``unet`` or ``smp:Unet:vgg13``.
        name: the model's label in the run (records, tables, checkpoint file); defaults to ``arch``
            with every character outside ``[A-Za-z0-9._-]`` replaced by ``-``.
        checkpoint: load this checkpoint (path without suffix) instead of training.
        train: this model's changes to the experiment's ``train`` settings, e.g.
            ``{noise_sigma: 0.25}`` (Gaussian-noise training) or ``{epochs: 5}``.
        defences: input defences (``median:3``, ``jpeg:75``, ``noise:0.1``, ...;
            :mod:`advseg.defences.transforms`): the grid also evaluates the model behind each
            one, as the model ``<name>+<defence>`` (trained once, attacked naively and, with
            ``pgd+bpda`` / ``pgd+eot`` attacks, adaptively).
        adversarial: this model's adversarial training, in place of ``train.adversarial``
            (:class:`advseg.defences.AdversarialConfig`), so that one grid holds defended and
            undefended models side by side.
    """

    arch: str = "unet"
    name: str = ""
    checkpoint: Path | None = None
    train: dict[str, Any] = field(default_factory=dict)
    defences: list[str] = field(default_factory=list)
    adversarial: AdversarialConfig | None = None

    def __post_init__(self) -> None:
        self.name = self.name or file_stem(self.arch)


@dataclass
class AttackSpec:
    """One attack of the grid, evaluated at every eps under every loss.

    Attributes:
        name: an attack registry name (``fgsm``, ``pgd``, ...).
        losses: loss registry names the attack maximises, one records set each.
        eps: L-inf budgets in image units ([0, 1] range).
        kwargs: further attack arguments (steps, step size, ...), passed as they are.
        transfer: also score every model's adversarial images on every other model of the grid
            (transfer cells, :mod:`advseg.transfer`).
        sources: models whose adversarial images are scored on every model of the grid; an
            entry ``a+b`` is one attack on the mean loss of models ``a`` and ``b`` (an ensemble
            attack).
        compat: ``notebook`` reproduces the paper's notebook code for this attack (FGSM only;
            :mod:`advseg.compat`: blended update, swapped loss arguments, soft masks; a
            reproduction, not a recommended attack), ``none`` the attack as named; absent: the
            experiment's ``compat``. Its records and cells are labelled ``fgsm:notebook``, so one
            grid holds both modes side by side.
    """

    name: str = "fgsm"
    losses: list[str] = field(default_factory=lambda: list(PAPER_LOSSES))
    eps: list[float] = field(default_factory=lambda: [0.009])
    kwargs: dict[str, Any] = field(default_factory=dict)
    transfer: bool = False
    sources: list[str] = field(default_factory=list)
    compat: str | None = None


@dataclass
class SplitSpec:
    """How cases are divided; no case has slices on two sides.

    Attributes:
        test_fraction: share of the cases held out for evaluation (the paper: 0.1).
        val_fraction: share of the remaining cases used for early stopping while training.
        seed: the random draw of cases.
    """

    test_fraction: float = 0.1
    val_fraction: float = 0.1
    seed: int = 0


@dataclass
class EvaluationSpec:
    """Which slices are attacked and how the results are summarised.

    Attributes:
        slices: ``with_mask`` evaluates the test slices that have a mask (the paper's protocol);
            ``all`` evaluates every test slice.
        max_slices: evaluate at most this many test slices: a draw seeded by the experiment's
            ``seed`` and spread over the test cases (:func:`advseg.data.spread_rows`).
        batch_size: slices per attack batch.
        examples: slices per cell whose images and predictions are kept for the report's panels.
        protocol: the Dice protocol of the summary (``paper``, ``per-class``, ``global``).
        trace: keep iterative attacks' convergence traces (``traces/<cell>.csv``) for the
            report's "Did the attacks converge?".
    """

    slices: Literal["with_mask", "all"] = "with_mask"
    max_slices: int | None = None
    batch_size: int = 16
    examples: int = 2
    protocol: Literal["paper", "per-class", "global"] = DEFAULT_PROTOCOL
    trace: bool = False


@dataclass
class ExperimentConfig:
    """A whole experiment, as read from its YAML file (every key optional).

    Attributes:
        name: a label for the run.
        seed: seeds each cell's attack (torch), so a resumed run gives the same numbers.
        data: the data set and its preprocessing (:class:`advseg.data.DataConfig`); no ``path``
            means the synthetic phantom.
        split: the case split into train, validation and test.
        train: training settings shared by every model trained here
            (:class:`advseg.train.TrainConfig`; ``train.model`` is set from each model's arch).
        models, attacks: the grid.
        evaluation: slices, batch size, examples and the Dice protocol.
        report: write the report when the grid is done.
        seeds: training seeds: each model trained here is trained once per seed (in
            ``models/<model>/seed<k>/``, seeded by ``k`` in place of ``train.seed``), its cells
            are named ``<model>__seed<k>__...`` and its records carry the seed, so that Table II
            shows the mean over seeds and their spread beside the case-bootstrap interval.
            Empty (the default): one training per model, seeded by ``train.seed``.
        compat: ``notebook`` for every attack that does not name its own ``compat`` (the
            paper's notebook reproduced, :mod:`advseg.compat`; ``advseg run --compat``);
            ``none`` (the default): each attack as named.
        encoder_weights: pretrained encoders, one per model: a model's name (``models[i].name``,
            its arch by default) -> a local safetensors file of that encoder's weights (or
            ``imagenet``, downloaded by segmentation_models_pytorch); ``advseg run
            --encoder-weights NAME=PATH``. A model trained here and absent from it trains from
            random init (or from ``train.encoder_weights``, one file for every model); the run
            says which in one line, and a missing or unfitting file is refused before any
            training (:func:`advseg.preflight.check_experiment`).
    """

    name: str = "experiment"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    split: SplitSpec = field(default_factory=SplitSpec)
    train: TrainConfig = field(default_factory=TrainConfig)
    models: list[ModelSpec] = field(default_factory=lambda: [ModelSpec()])
    attacks: list[AttackSpec] = field(default_factory=lambda: [AttackSpec()])
    evaluation: EvaluationSpec = field(default_factory=EvaluationSpec)
    report: bool = True
    seeds: list[int] = field(default_factory=list)
    compat: str = "none"
    encoder_weights: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Cell:
    """One unit of work and of resumption: one model, one attack, one eps, several losses.

    ``source`` is set for a transfer cell: the model (or ensemble ``a+b``) whose adversarial
    images the cell scores on ``model``. ``seed`` is the training seed of the models, in a grid
    with ``seeds:`` (None otherwise). ``compat`` is the attack's compatibility mode
    (:mod:`advseg.compat`); the records and the file name carry :attr:`label`.
    """

    model: str
    attack: str
    eps: float
    losses: tuple[str, ...]
    kwargs: tuple[tuple[str, Any], ...] = ()
    source: str = ""
    seed: int | None = None
    compat: str = "none"

    @property
    def label(self) -> str:
        """The records' attack label: ``fgsm``, or ``fgsm:notebook`` under ``compat: notebook``."""
        return compat_label(self.attack, self.compat)

    @property
    def slug(self) -> str:
        """The cell's file name stem, e.g. ``unet__fgsm__eps0.009`` (``...__from-<source>``),
        ``unet__seed1__fgsm__eps0.009`` in a grid with seeds."""
        seed = "" if self.seed is None else f"__seed{self.seed}"
        slug = f"{file_stem(self.model)}{seed}__{file_stem(self.label)}__eps{self.eps:g}"
        return f"{slug}__from-{source_stem(self.source)}" if self.source else slug


def check_config(config: ExperimentConfig) -> ExperimentConfig:
    """Check what the dataclass types cannot: names, ranges and duplicates, naming the key."""
    if not config.models:
        raise UserError("models: at least one model is needed")
    if not config.attacks:
        raise UserError("attacks: at least one attack is needed")
    seen: dict[str, int] = {}
    for i, model in enumerate(config.models):
        if model.arch.startswith(ENSEMBLE_PREFIX):
            pass  # members are checked by check_cross_model
        elif model.checkpoint is None:
            try:
                resolve_model(model.arch)
            except UserError as err:
                raise UserError(f"models[{i}].arch: {err}") from None
        if model.adversarial is not None and not trained_here(model):
            raise UserError(
                f"models[{i}].adversarial: only a model trained here takes a training defence "
                "(not a checkpoint or an ensemble)"
            )
        if model.name in seen:
            raise UserError(
                f"models[{i}].name: {model.name!r} is also models[{seen[model.name]}]; "
                "give one of them another name"
            )
        seen[model.name] = i
        if "encoder_weights" in model.train and model.name in config.encoder_weights:
            raise UserError(
                f"models[{i}].train.encoder_weights: encoder_weights.{model.name} names "
                "this model's weights too; keep one of them"
            )
        try:
            if trained_here(model):
                model_train_config(config, model)
        except UserError as err:
            raise UserError(f"models[{i}].train: {err}") from None
        for j, spec in enumerate(model.defences):
            try:
                label = defended_name(model.name, spec)
            except UserError as err:
                raise UserError(f"models[{i}].defences[{j}]: {err}") from None
            if label == model.name or label in seen:
                raise UserError(f"models[{i}].defences[{j}]: {spec!r} is listed twice (or none)")
            seen[label] = i
    check_encoder_mapping(config)
    activations = trained_activations(config)
    kwargs_of: dict[str, tuple[int, dict[str, Any]]] = {}
    check_compat(config.compat, "compat")
    for i, attack in enumerate(config.attacks):
        mode = attack_compat(attack, config)
        check_compat(mode, f"attacks[{i}].compat")
        if mode != "none" and attack.name not in NOTEBOOK_ATTACKS:  # named on the attack
            raise UserError(
                f"attacks[{i}].compat: {mode!r} reproduces the paper's notebook, which "
                f"attacked with {', '.join(NOTEBOOK_ATTACKS)} only, not {attack.name!r}"
            )
        if mode != "none" and (attack.transfer or attack.sources):
            raise UserError(
                f"attacks[{i}].compat: the notebook's attack is white-box only (no transfer "
                "or sources); list a plain attack for transfer"
            )  # its losses and options are checked by preflight.check_attacks
        if not attack.losses:
            raise UserError(f"attacks[{i}].losses: at least one loss is needed")
        for j, loss in enumerate(attack.losses):
            if loss not in LOSSES:
                raise UserError(f"attacks[{i}].losses[{j}]: {LOSSES.unknown_message(loss)}")
            kind = loss_activation(loss)
            other = [(name, a) for name, a in activations.items() if kind not in (None, a)]
            if other:
                raise UserError(
                    f"attacks[{i}].losses[{j}]: {loss!r} is for {kind} models; model "
                    f"{other[0][0]!r} has {other[0][1]} outputs (train.activation)"
                )
        try:
            attack_options(attack.name)  # a registry name, maybe with +bpda / +eot
        except UserError as err:
            raise UserError(f"attacks[{i}].name: {err}") from None
        unknown = sorted(set(attack.kwargs) - set(attack_options(attack.name)))
        if unknown:
            raise UserError(
                f"attacks[{i}].kwargs.{unknown[0]}: {attack.name} takes "
                f"{', '.join(attack_options(attack.name))}"
            )
        if not attack.eps:
            raise UserError(f"attacks[{i}].eps: at least one eps is needed")
        for j, eps in enumerate(attack.eps):
            try:
                check_eps(eps, attack.kwargs.get("norm", "linf"), 1.0, attack.name)
            except UserError as err:
                raise UserError(f"attacks[{i}].eps[{j}]: {err}") from None
        first = kwargs_of.setdefault(compat_label(attack.name, mode), (i, attack.kwargs))
        if first[1] != attack.kwargs:
            raise UserError(
                f"attacks[{i}].kwargs: attack {attack.name!r} appears in attacks[{first[0]}] with "
                "other kwargs; the records could not tell them apart"
            )
    for key in ("test_fraction", "val_fraction"):
        value = getattr(config.split, key)
        if not 0 < value < 1:
            raise UserError(f"split.{key}: {value} is not between 0 and 1")
    if len(set(config.seeds)) != len(config.seeds):
        raise UserError(f"seeds: each seed once, got {config.seeds}")
    for i, model in enumerate(config.models):
        if config.seeds and "seed" in model.train:
            raise UserError(f"models[{i}].train.seed: the grid's seeds: decide the training seed")
    if config.train.model != TrainConfig.model:
        raise UserError("train.model: name the models under models: (each one's arch)")
    ev = config.evaluation
    for key in ("batch_size", "max_slices"):
        value = getattr(ev, key)
        if value is not None and value < 1:
            raise UserError(f"evaluation.{key}: {value} must be at least 1")
    if ev.examples < 0:
        raise UserError(f"evaluation.examples: {ev.examples} must be 0 or more")
    check_cross_model(config)
    return config


def trained_here(model: ModelSpec) -> bool:
    """Whether the grid trains ``model`` (not a checkpoint, not an ensemble of other models)."""
    return model.checkpoint is None and not model.arch.startswith(ENSEMBLE_PREFIX)


def check_encoder_mapping(config: ExperimentConfig) -> None:
    """Refuse an ``encoder_weights`` entry naming no model trained here, or an empty file name;
    and the mapping beside ``train.encoder_weights`` (one file for every model): keep one."""
    if not config.encoder_weights:
        return
    if config.train.encoder_weights is not None:
        raise UserError(
            "train.encoder_weights: one file for every model, beside encoder_weights (one per "
            "model); keep one of them"
        )
    names = [m.name for m in config.models if trained_here(m)]
    for name, path in config.encoder_weights.items():
        if name not in names:
            raise UserError(
                f"encoder_weights.{name}: no model trained here is named {name!r} (models "
                f"trained here: {', '.join(names) or 'none'})"
            )
        if not str(path).strip():
            raise UserError(f"encoder_weights.{name}: empty file name")


def encoder_line(config: ExperimentConfig) -> str | None:
    """One line saying how each model trained here starts: from which encoder weights, or
    from random init; None when the grid trains no model."""
    pretrained, random = [], []
    for model in config.models:
        if trained_here(model):
            weights = model_train_config(config, model).encoder_weights
            if weights is None:
                random.append(model.name)
            else:
                pretrained.append(f"{model.name} from {weights}")
    if not pretrained and not random:
        return None
    parts = [*pretrained, *(["random init: " + ", ".join(random)] if random else [])]
    return "encoders: " + "; ".join(parts)


def trained_activations(config: ExperimentConfig) -> dict[str, str]:
    """Each model trained here -> its ``train.activation``; a softmax model is refused in a
    cross-model study (transfer, sources, ensembles), which reads sigmoid outputs only."""
    found = {
        model.name: model_train_config(config, model).activation
        for model in config.models
        if trained_here(model)
    }
    crossing = any(a.transfer or a.sources for a in config.attacks) or any(
        m.arch.startswith(ENSEMBLE_PREFIX) for m in config.models
    )
    softmax = [name for name, activation in found.items() if activation == "softmax"]
    if crossing and softmax:
        raise UserError(
            f"models: {softmax[0]!r} is a softmax model; transfer, sources and ensembles take "
            "sigmoid models only"
        )
    return found


def model_variants(model: ModelSpec) -> list[str]:
    """The grid's names of one model: as trained, then behind each of its input defences."""
    return [model.name, *(defended_name(model.name, spec) for spec in model.defences)]


def model_train_config(config: ExperimentConfig, model: ModelSpec) -> TrainConfig:
    """The experiment's training settings with this model's arch and its own ``train`` changes."""
    if "model" in model.train:
        raise UserError("model: a model's arch is its train.model; do not set it here")
    values = _merged(to_dict(config.train), model.train)
    if model.name in config.encoder_weights:  # the grid's per-model mapping
        values["encoder_weights"] = config.encoder_weights[model.name]
    if "loss" not in model.train and config.train.loss == DEFAULT_LOSS[config.train.activation]:
        values["loss"] = None  # the default loss of this model's activation
    return from_dict(TrainConfig, {**values, "model": model.arch}, where="train")


def _merged(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``changes`` applied key by key, nested mappings merged, not replaced."""
    out = dict(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            value = _merged(out[key], value)
        out[key] = value
    return out


def packaged_config(name: str) -> Path | None:
    """The experiment file shipped with advseg under ``name`` (``demo``, ``paper.yaml``), if any."""
    stem = name.removesuffix(".yaml")
    path = Path(str(resources.files("advseg") / "configs" / f"{stem}.yaml"))
    return path if path.is_file() else None


def find_experiment(path_or_name: str | Path) -> Path:
    """An experiment file: ``path_or_name`` when it exists, else a shipped one of that name.

    Raises:
        UserError: neither exists (the shipped names are listed).
    """
    path = Path(path_or_name)
    if path.is_file():
        return path
    shipped = packaged_config(path.name) if path.parent == Path(".") else None
    if shipped is not None:
        return shipped
    names = sorted(p.stem for p in resources.files("advseg").joinpath("configs").iterdir())
    raise UserError(f"{path}: no such experiment file (shipped experiments: {', '.join(names)})")


def load_experiment(path: str | Path) -> ExperimentConfig:
    """Read and check an experiment file; a bad key or value is a UserError naming key and file."""
    data = load_yaml(path)
    try:
        return check_config(from_dict(ExperimentConfig, data or {}))
    except UserError as err:
        raise UserError(f"{path}: {err}") from None


def attack_compat(attack: AttackSpec, config: ExperimentConfig) -> str:
    """The compatibility mode of one attack: its own ``compat``, else the experiment's (which
    reaches only the attacks the notebook had: a grid-wide ``notebook`` leaves PGD as it is)."""
    if attack.compat is not None:
        return attack.compat
    return config.compat if attack.name in NOTEBOOK_ATTACKS else "none"


def plan_cells(config: ExperimentConfig) -> list[Cell]:
    """The grid in run order (model by model), with the losses of repeated (attack, eps) united."""
    cells: dict[tuple[str, int | None, str, str, float], list[str]] = {}
    kwargs: dict[tuple[str, str], tuple[tuple[str, Any], ...]] = {}
    names = [
        (name, seed)
        for model in config.models
        for seed in model_seeds(config, model.name)  # seed by seed: each trained once
        for name in model_variants(model)
    ]
    for name, seed in names:
        for attack in config.attacks:
            mode = attack_compat(attack, config)
            kwargs[attack.name, mode] = tuple(sorted(attack.kwargs.items()))
            for eps in attack.eps:
                losses = cells.setdefault((name, seed, attack.name, mode, float(eps)), [])
                losses += [loss for loss in attack.losses if loss not in losses]
    planned = [
        Cell(model, attack, eps, tuple(losses), kwargs[attack, mode], seed=seed, compat=mode)
        for (model, seed, attack, mode, eps), losses in cells.items()
    ]
    return planned + transfer_cells(config, planned)


@dataclass
class CellOutput:
    """What computing one cell gives: its records and (optionally) example arrays."""

    records: pd.DataFrame
    examples: dict[str, Any] | None = None
    trace: pd.DataFrame | None = None


@dataclass
class GridResult:
    """Which cells were computed now and which were found finished on disk."""

    computed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def sweep_key(cell: Cell) -> tuple | None:
    """Cells with one key can share one gradient (a single-step attack's eps sweep); None: alone.

    A single-step attack's images at every eps come from the same input gradient, so the cells of
    one (model, attack, options) are computed together by ``run_cells``' ``sweep``.
    """
    if cell.source or "+" in cell.attack or not ATTACKS.get(cell.attack).single_step:
        return None  # a transfer cell scores images crafted elsewhere; +bpda/+eot attack a view
    return (cell.model, cell.seed, cell.attack, cell.compat, cell.kwargs)


def run_cells(
    cells: Sequence[Cell],
    run_dir: str | Path,
    compute: Callable[[Cell], CellOutput],
    on_cell: Callable[[Cell, bool], None] | None = None,
    sweep: Callable[[list[Cell]], list[CellOutput]] | None = None,
) -> GridResult:
    """Compute every cell whose records file is missing; a present file means the cell is done.

    The examples file is written before the records file, and each atomically, so a records file
    on disk always belongs to a finished cell and an interrupted cell leaves nothing behind.
    Cells computed together by ``sweep`` are still written (and so resumed) one by one.

    Args:
        cells: the grid, in run order.
        run_dir: the run directory (``records/`` and ``examples/`` are made inside it).
        compute: evaluates one cell.
        on_cell: called after each cell with the cell and whether it was skipped (for progress).
        sweep: evaluates several unfinished cells of one :func:`sweep_key` at once (their
            outputs in the same order); without it every cell goes through ``compute``.
    """
    run_dir = Path(run_dir)
    result = GridResult()

    def records_path(cell: Cell) -> Path:
        return run_dir / "records" / f"{cell.slug}.parquet"

    done = {cell.slug for cell in cells if records_path(cell).exists()}
    done = distributed.broadcast_object(done)  # under torchrun every rank skips alike
    pending = [cell for cell in cells if cell.slug not in done]
    main = distributed.is_main()
    ready: dict[Cell, CellOutput] = {}
    for cell in cells:
        if cell not in pending:
            result.skipped.append(cell.slug)
        else:
            if cell not in ready:
                key = sweep_key(cell) if sweep is not None else None
                group = [c for c in pending if c == cell or (key and sweep_key(c) == key)]
                outputs = sweep(group) if sweep and len(group) > 1 else [compute(cell)]
                ready.update(zip(group, outputs, strict=True))
            output = ready.pop(cell)
            if main and output.examples:  # every rank computed the cell; rank 0 writes it
                path = run_dir / "examples" / f"{cell.slug}.npz"
                save_examples(
                    output.examples,
                    path,
                    model=cell.model,
                    attack=cell.label,
                    eps=cell.eps,
                    seed=cell.seed,
                )
            if main and output.trace is not None:
                write_trace(output.trace, run_dir / "traces" / f"{cell.slug}.csv")
            if main:
                write_records(output.records, records_path(cell))
            distributed.barrier()  # the files are whole before any rank reads them
            result.computed.append(cell.slug)
        if on_cell is not None:
            on_cell(cell, cell.slug in result.skipped)
    return result


RESUMABLE_KEYS = frozenset(
    {
        "train.num_workers",
        "train.tensorboard",
        "evaluation.protocol",
        "evaluation.trace",
        "report",
        "data.cache_dir",  # where the arrays are cached: the data fingerprint checks the data
    }
)
"""Config keys a resume may change: they decide how the work is done or shown, not its records
(the summary and the report are recomputed from the records at every run)."""


LEGACY_VALUES: dict[str, object] = {
    "data.strict_labels": False,
    "data.preprocess.resize": "stretch",
    "data.path": "synthetic",  # an empty path meant the phantom before it had to be named
    "train.activation": "sigmoid",  # every model was sigmoid before softmax training
}
"""Settings added since runs began, with the value a saved config that lacks them meant (a run
begun before aspect-preserving resize stretched its slices)."""


def prepare_run_dir(config: ExperimentConfig, run_dir: str | Path) -> Path:
    """Create ``run_dir`` with the resolved config, or check that it holds this same experiment.

    A resume may change the :data:`RESUMABLE_KEYS`; the saved config then takes the new values.

    Raises:
        UserError: ``run_dir/config.yaml`` holds a different experiment (naming the first key that
            differs), since resuming it with this config would mix two experiments' records.
    """
    run_dir = Path(run_dir)
    saved_path = run_dir / "config.yaml"
    resolved = to_dict(config)
    if saved_path.exists():
        differences = _differences(load_yaml(saved_path), resolved)
        refused = [key for key in differences if key not in RESUMABLE_KEYS]
        if refused and holds_work(run_dir):
            legacy = (
                f"; it began before {refused[0]} existed, with {LEGACY_VALUES[refused[0]]!r}: "
                "set that to resume it"
                if refused[0] in LEGACY_VALUES
                else ""
            )
            raise UserError(
                f"{saved_path}: this run directory holds another experiment ({refused[0]} "
                f"differs{legacy}); use a new run directory"
            )
        if differences:  # resumable keys, or a directory with nothing finished in it
            save_yaml(resolved, saved_path)
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_yaml(resolved, saved_path)
    return run_dir


def holds_work(run_dir: str | Path) -> bool:
    """True when ``run_dir`` holds finished work: a cell's records or a model's checkpoint.

    A directory holding only ``config.yaml`` (an experiment refused or stopped before its first
    save) holds none: it may be reused with a corrected experiment.
    """
    run_dir = Path(run_dir)
    if any((run_dir / "records").glob("*.parquet")):
        return True
    found = [*(run_dir / "models").glob("*/checkpoints/*.json")]
    found += (run_dir / "models").glob("*/seed*/checkpoints/*.json")  # a grid with seeds
    return any(checkpoint_exists(path.with_name(path.name.removesuffix(".json"))) for path in found)


def _differences(old: Any, new: Any, where: str = "") -> list[str]:
    """The dotted keys (``train.lr``, ``models[0].arch``) whose values differ, in key order."""
    if isinstance(old, dict) and isinstance(new, dict):
        found = []
        for key in sorted(set(old) | set(new), key=str):
            found += _differences(old.get(key), new.get(key), f"{where}.{key}" if where else key)
        return found
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [d for i, (a, b) in enumerate(zip(old, new, strict=True))
                for d in _differences(a, b, f"{where}[{i}]")]  # fmt: skip
    if old is None and isinstance(new, (dict, list)) and not new:
        return []  # a key added to the config since the run began, at its empty default
    if old is None and where in LEGACY_VALUES and new == LEGACY_VALUES[where]:
        return []  # a key added since the run began, at the value the run had
    return [] if old == new else [where or "the whole config"]


@dataclass
class RunResult:
    """What :func:`run_experiment` did.

    Attributes:
        run_dir: the run directory.
        grid: cells computed now and cells found finished.
        trained: models trained (or whose training was resumed) by this call.
        summary: Table II at the headline eps (also in ``summary.csv``).
        cells: its numbers one row per (model, attack, loss), from
            :func:`advseg.summary.summarize_cells`; protocol: the Dice protocol of both.
        report: the written report, when ``config.report`` is true.
        seconds: wall time of this call.
    """

    run_dir: Path
    grid: GridResult
    trained: list[str]
    summary: pd.DataFrame
    cells: pd.DataFrame
    protocol: str
    report: Report | None
    seconds: float


def run_experiment(
    config: ExperimentConfig, run_dir: str | Path, *, progress: bool = False
) -> RunResult:
    """Run (or resume) an experiment in ``run_dir``: data, training, the grid, summary, report.

    Args:
        config: the experiment (checked by :func:`check_config`).
        run_dir: the run directory; an existing one must hold this same experiment.
        progress: show rich progress (data, training epochs, cells) on the terminal.

    Under ``torchrun`` every rank calls this with the same arguments: training runs as
    DistributedDataParallel (:func:`advseg.train.train_on_data`), each cell's batches are
    sharded over the ranks and merged (:func:`advseg.evaluate.evaluate_sweep`), and rank 0
    alone writes the run's files (every rank returns the same result; the report is rank 0's).
    """
    start = time.perf_counter()
    check_config(config)
    distributed.init()
    main = distributed.is_main()
    # everything the grid needs, before anything is written; rank 0 alone writes run files
    distributed.main_first(lambda: check_experiment(config, run_dir))
    run_dir = Path(run_dir)
    distributed.main_first(lambda: prepare_run_dir(config, run_dir))
    console = Console(stderr=True, quiet=not (progress and main))
    removed = remove_debris(run_dir) if main else []
    if removed:
        console.print(
            f"removed {len(removed)} temporary file(s) left in {run_dir} by a killed run",
            highlight=False,
            soft_wrap=True,
        )
    columns = (SpinnerColumn(), TextColumn("{task.description}"), MofNCompleteColumn())
    hidden = not console.is_terminal
    with Progress(
        *columns, TimeElapsedColumn(), console=console, transient=True, disable=hidden
    ) as bar:
        task = bar.add_task(
            "loading data (the phantom is written on first use), slices", total=None
        )
        data = distributed.main_first(  # rank 0 fills the preprocessing cache first
            lambda: load_data(config.data, progress=lambda n: bar.update(task, completed=n))
        )
    data = data if main else load_data(config.data)
    distributed.main_first(lambda: check_data_fingerprint(run_dir, data, config.data))
    train_rows, val_rows, test_rows = split_train_val_test(
        data.index, config.split.test_fraction, config.split.val_fraction, config.split.seed
    )
    eval_rows = _evaluation_rows(data, test_rows, config.evaluation, config.seed)
    console.print(
        f"data: {len(data)} slices; cases split into train {len(train_rows)}, validation "
        f"{len(val_rows)}, test {len(test_rows)} slices; evaluated {len(eval_rows)} test slices "
        f"({config.evaluation.slices})",
        highlight=False,
        soft_wrap=True,
    )
    for line in data.exclusions.lines():
        console.print(f"data: {line}", highlight=False, soft_wrap=True)
    encoders = encoder_line(config)
    if encoders is not None:
        console.print(encoders, highlight=False, soft_wrap=True)
    cells = plan_cells(config)
    models: dict[tuple[str, int | None], tuple[torch.nn.Module, str]] = {}
    seed_of: dict[tuple[str, int | None], int] = {}  # the training seed of each model loaded
    activation_of: dict[tuple[str, int | None], str] = {}  # how each model's logits are read
    trained = []
    device = resolve_device(config.train.device)
    if main:
        record_session(run_dir, "advseg run", device)  # version, device, date for the report

    variants = {
        name: (spec, defence)
        for spec in config.models
        for name, defence in zip(model_variants(spec), ["none", *spec.defences], strict=True)
    }

    def key_of(name: str, seed: int | None) -> tuple[str, int | None]:
        spec = variants[name][0]  # a checkpoint is one model, whatever the cell's seed
        return spec.name, seed if model_seeds(config, spec.name) != [None] else None

    def model_for(name: str, seed: int | None = None) -> tuple[torch.nn.Module, str]:
        spec, defence = variants[name]
        key = key_of(name, seed)
        if key not in models:
            if spec.arch.startswith(ENSEMBLE_PREFIX):
                net = cross.ensemble(spec.arch, lambda member: model_for(member, key[1]))
                arch, members = spec.arch, ensemble_members(spec.arch)
                seed_of[key] = seed_of[key_of(members[0], key[1])]
                activation_of[key] = "sigmoid"  # members are sigmoid (trained_activations)
            else:
                net, arch, fresh, seed_of[key], activation_of[key] = _get_model(
                    spec, config, data, run_dir, progress, key[1]
                )
                if fresh:
                    trained.append(spec.name if key[1] is None else f"{spec.name} (seed {key[1]})")
            models.clear()  # one model in memory at a time
            models[key] = (net.to(device).eval(), arch)
        net, arch = models[key]
        return defend(net, defence), arch  # a fresh defence per cell: its own noise draws

    def seeded(cell: Cell, output: CellOutput) -> CellOutput:
        """The cell's records with the training seed of its model (``seed`` column)."""
        seed = seed_of[key_of(cell.model, cell.seed)] if cell.seed is None else cell.seed
        output.records = output.records.assign(seed=seed)
        if output.trace is not None:
            output.trace = output.trace.assign(seed=seed)  # the report names each trace's seed
        return output

    cross = CrossModel(config, data, eval_rows, train_rows, run_dir, model_for, console)
    cross.check_io()

    def compute_cells(group: list[Cell]) -> list[CellOutput]:
        first = group[0]  # the group shares model, seed, attack and options (sweep_key)
        net, arch = model_for(first.model, first.seed)
        activation = checkpoint_activation(  # an attack's own activation must agree
            activation_of[key_of(first.model, first.seed)],
            dict(first.kwargs).get("activation"),
            f"model {first.model!r}",
        )
        eps = ", ".join(f"{c.eps:g}" for c in group)
        losses = ", ".join(dict.fromkeys(loss for c in group for loss in c.losses))
        what = f"evaluating {first.model}, {first.label} eps {eps} ({losses})"
        what += f" on {len(eval_rows)} slices"
        with cell_progress(console, what) as on_batch:
            results = evaluate_sweep(
                net,
                data,
                eval_rows,
                first.attack,
                {c.eps: list(c.losses) for c in group},
                model_name=first.model,
                arch=arch,
                attack_kwargs={"seed": config.seed, **dict(first.kwargs), "activation": activation},
                batch_size=config.evaluation.batch_size,
                examples=config.evaluation.examples,
                on_batch=on_batch,
                keep_adversarial=any(cross.is_source(c) for c in group),
                trace=config.evaluation.trace,
                compat=first.compat,
            )
        for cell, result in zip(group, results, strict=True):
            cross.keep(cell, result.adversarial)
        return [
            seeded(c, CellOutput(r.records, r.examples, r.trace))
            for c, r in zip(group, results, strict=True)
        ]

    def compute(cell: Cell) -> CellOutput:
        if cross.handles(cell):
            return seeded(cell, CellOutput(cross.compute(cell)))
        return compute_cells([cell])[0]

    total = len(cells)

    def on_cell(cell: Cell, skipped: bool) -> None:
        index = cells.index(cell) + 1
        state = "already done" if skipped else "done"
        console.print(f"cell {index}/{total} {cell.slug}: {state}", highlight=False)

    grid = run_cells(cells, run_dir, compute, on_cell, sweep=compute_cells)
    records = white_box(read_records(run_dir))  # every cell written: run_cells' last barrier
    eps = headline_eps(records)
    protocol = config.evaluation.protocol
    headline = records[records["eps"] == eps]
    summary = with_intervals(headline, protocol)  # Table II with case-bootstrap intervals
    headline_cells = summarize_cells(headline, protocol)
    if main:
        written = summary.assign(protocol=protocol)  # the file names its Dice protocol
        write_text_atomic(run_dir / "summary.csv", written.to_csv(index=False, na_rep="n/a"))
    report = None
    if config.report and main:
        with console.status("writing the report"):
            report = write_report(run_dir, protocol=protocol, eps=eps)
    seconds = time.perf_counter() - start
    return RunResult(run_dir, grid, trained, summary, headline_cells, protocol, report, seconds)


def check_data_fingerprint(run_dir: Path, data: SliceData, config: DataConfig) -> None:
    """Record the data in ``run_dir/data.json`` (resolved locations, fingerprint, size, classes,
    label source, cache: :func:`advseg.data.location.run_data_record`); refuse a resume on other
    data. A resume on the same data rewrites the record (the cache may have moved).

    Raises:
        UserError: the run holds finished work computed on data with another fingerprint (the
            data at the path was replaced, edited or copied anew since).
    """
    path = run_dir / "data.json"
    now = run_data_record(data, config)
    if path.is_file() and holds_work(run_dir):
        try:
            saved = json.loads(path.read_text())["fingerprint"]
        except (ValueError, KeyError, TypeError):
            raise UserError(
                f"{path}: damaged (no data fingerprint); use a new run directory"
            ) from None
        if not same_data(saved, data):
            raise UserError(
                f"{path}: the data changed since this run computed on it (fingerprint {saved}, "
                f"now {now['fingerprint']}: files replaced, edited or copied anew); restore the "
                "data or use a new run directory"
            )
    write_text_atomic(path, json.dumps(now, indent=1) + "\n")


def _evaluation_rows(
    data: SliceData, test_rows: np.ndarray, evaluation: EvaluationSpec, seed: int = 0
) -> np.ndarray:
    rows = test_rows
    if evaluation.slices == "with_mask":
        has_mask = data.masks[rows].reshape(len(rows), -1).any(axis=1)
        rows = rows[has_mask]
    if evaluation.max_slices is not None:  # seeded, spread over the cases, not the first N
        rows = spread_rows(data.index, rows, evaluation.max_slices, seed)
    if len(rows) == 0:
        raise UserError(
            f"evaluation.slices: no test slice left to evaluate ({evaluation.slices}, "
            f"{len(test_rows)} test slices)"
        )
    return rows


def _get_model(
    spec: ModelSpec,
    config: ExperimentConfig,
    data: SliceData,
    run_dir: Path,
    progress: bool,
    seed: int | None = None,
) -> tuple[torch.nn.Module, str, bool, int, str]:
    """The model of ``spec``: loaded from its checkpoint, or trained (resumed) in the run dir.

    Training is :func:`advseg.train.train_on_data`, the one training path (``advseg train``
    takes it too): the same split, augmentation, encoder weights and checkpoint metadata.

    Args:
        seed: a training seed of the grid's ``seeds`` (in place of ``train.seed``; the run in
            ``models/<name>/seed<k>/``), or None.

    Returns:
        ``(model, zoo name, trained_now, training seed, activation)``.
    """
    if spec.checkpoint is not None:
        net, meta = load_checkpoint(spec.checkpoint, classes=data.classes)
        check_held_out(meta.data, spec.checkpoint, config)
        return net, meta.model, False, int(meta.train.get("seed", 0)), meta.activation
    out = model_dir(run_dir, spec.name, seed)
    best = out / "checkpoints" / "best"
    last = out / "checkpoints" / "last"
    train_config = model_train_config(config, spec)
    if spec.adversarial is not None:
        train_config = replace(train_config, adversarial=spec.adversarial)
    if seed is not None:
        train_config = replace(train_config, seed=seed)
    fresh = not (checkpoint_exists(best) and _finished(last, train_config))
    if fresh:
        train_on_data(
            config.data,
            train_config,
            out,
            test_fraction=config.split.test_fraction,
            val_fraction=config.split.val_fraction,
            split_seed=config.split.seed,
            resume=checkpoint_exists(last),
            progress=progress,
            data=data,
        )
    net, meta = load_checkpoint(best, classes=data.classes)
    return net, meta.model, fresh, train_config.seed, meta.activation


def model_dir(run_dir: str | Path, name: str, seed: int | None = None) -> Path:
    """Where a grid model trains: ``models/<name>/``, or ``models/<name>/seed<k>/`` with seeds."""
    out = Path(run_dir) / "models" / name
    return out if seed is None else out / f"seed{seed}"


def check_held_out(metadata: dict[str, Any], checkpoint: Path, config: ExperimentConfig) -> None:
    """Refuse a checkpoint whose training split differs from the experiment's.

    The experiment evaluates its own test cases; a checkpoint trained with another split seed or
    fraction, or on another data source, may have trained on some of them.
    """
    split = config.split
    expected = {"test_fraction": split.test_fraction, "split_seed": split.seed}
    for key, value in expected.items():
        if key not in metadata:
            raise UserError(
                f"{checkpoint}: its metadata does not say which cases it held out (no "
                f"data.{key}); the experiment cannot tell train cases from test cases"
            )
        if metadata[key] != value:
            raise UserError(
                f"{checkpoint}: trained with data.{key} {metadata[key]}, the experiment's split "
                f"has {value}; its test cases would include training cases"
            )
    trained_on = metadata.get("config", {}).get("path")
    ours = None if config.data.path is None else str(config.data.path)
    if trained_on != ours:
        raise UserError(f"{checkpoint}: trained on data {trained_on}, the experiment uses {ours}")


def _finished(last: Path, train_config: TrainConfig) -> bool:
    """True when the training run at ``last`` ran all its epochs or stopped early."""
    if not checkpoint_exists(last):
        return False
    _, _, state = read_checkpoint(last)
    return state is not None and (state["stopped_early"] or state["epoch"] >= train_config.epochs)
