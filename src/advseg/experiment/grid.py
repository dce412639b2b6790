"""The grid's cells and how they are worked through: planning (:func:`plan_cells`), which
cells share one gradient (:func:`sweep_key`) and :func:`run_cells`, which computes each
unfinished cell and writes its files atomically (examples, trace, then records), so a resumed
run skips what is done.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd

from advseg import distributed
from advseg.attacks import ATTACKS
from advseg.corruptions import NO_LOSS, corruption_label, corruption_of, parse_corruptions
from advseg.crossmodel.cells import (
    model_seeds,
    transfer_cells,
)
from advseg.crossmodel.transfer import source_members, source_stem
from advseg.evaluate.compat import compat_label
from advseg.experiment.config import ExperimentConfig, attack_compat, model_variants
from advseg.experiment.volumes import volumetric
from advseg.runs.examples import save_examples
from advseg.runs.names import file_stem
from advseg.runs.records import check_identity, write_records
from advseg.runs.traces import write_trace


@dataclass(frozen=True)
class Cell:
    """One unit of work and of resumption: one model, one attack, one eps, several losses.

    ``source`` is set for a transfer cell: the model (or ensemble ``a+b``) whose adversarial
    images the cell scores on ``model``. ``seed`` is the training seed of the models, in a grid
    with ``seeds:`` (None otherwise); ``fold`` the cross-validation fold whose model and test
    cases the cell scores (``split.folds``; None otherwise). ``compat`` is the attack's
    compatibility mode (:mod:`advseg.evaluate.compat`); the records and the file name carry
    :attr:`label`.
    """

    model: str
    attack: str
    eps: float
    losses: tuple[str, ...]
    kwargs: tuple[tuple[str, Any], ...] = ()
    source: str = ""
    seed: int | None = None
    compat: str = "none"
    fold: int | None = None
    through: str = ""

    @property
    def label(self) -> str:
        """The records' attack label: ``fgsm``, or ``fgsm:notebook`` under ``compat: notebook``,
        or ``fgsm:inference`` / ``fgsm:tiles`` for a 3D model's volumes (``through``)."""
        label = compat_label(self.attack, self.compat)
        return f"{label}:{self.through}" if self.through else label

    @property
    def slug(self) -> str:
        """The cell's file name stem, e.g. ``unet__fgsm__eps0.009`` (``...__from-<source>``),
        ``unet__seed1__fgsm__eps0.009`` in a grid with seeds, ``unet__fold2__fgsm__eps0.009``
        with folds."""
        seed = "" if self.seed is None else f"__seed{self.seed}"
        seed += "" if self.fold is None else f"__fold{self.fold}"
        slug = f"{file_stem(self.model)}{seed}__{file_stem(self.label)}__eps{self.eps:g}"
        return f"{slug}__from-{source_stem(self.source)}" if self.source else slug


def plan_cells(config: ExperimentConfig) -> list[Cell]:
    """The grid in run order (model by model), with the losses of repeated (attack, eps) united."""
    cells: dict[tuple[str, int | None, int | None, str, str, float], list[str]] = {}
    kwargs: dict[tuple[str, str], tuple[tuple[str, Any], ...]] = {}
    folds = [None] if config.split.folds is None else list(range(config.split.folds))
    names = [
        (name, seed, fold)
        for model in config.models
        for seed in model_seeds(config, model.name)  # seed by seed: each trained once
        for fold in folds  # fold by fold: one model each
        for name in model_variants(model)
    ]
    for name, seed, fold in names:
        for attack in config.attacks:
            mode = attack_compat(attack, config)
            kwargs[attack.name, mode] = tuple(sorted(attack.kwargs.items()))
            for eps in attack.eps:
                losses = cells.setdefault((name, seed, fold, attack.name, mode, float(eps)), [])
                losses += [loss for loss in attack.losses if loss not in losses]
    protocols = config.evaluation.through if volumetric(config) else [""]
    planned = [
        Cell(model, attack, eps, tuple(losses), kwargs[attack, mode], seed=seed, compat=mode,
             fold=fold, through=through)
        for (model, seed, fold, attack, mode, eps), losses in cells.items()
        for through in protocols
    ]  # fmt: skip
    corrupted = [
        Cell(name, corruption_label(*cell), 0.0, (NO_LOSS,), seed=seed, fold=fold)
        for name, seed, fold in names
        for cell in (
            parse_corruptions(config.corruptions, "corruptions") if config.corruptions else []
        )
    ]
    return planned + corrupted + transfer_cells(config, planned)


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

    A model's corruption cells share one pass over the slices (one clean forward per batch).
    A single-step attack's images at every eps come from the same input gradient, so the cells of
    one (model, attack, options) are computed together by ``run_cells``' ``sweep``.
    """
    if corruption_of(cell.attack) is not None:  # one pass per model: one clean forward
        return (cell.model, cell.seed, cell.fold, "corruption")
    if cell.source or "+" in cell.attack or not ATTACKS.get(cell.attack).single_step:
        return None  # a transfer cell scores images crafted elsewhere; +bpda/+eot attack a view
    return (cell.model, cell.seed, cell.fold, cell.attack, cell.compat, cell.kwargs, cell.through)


def run_cells(
    cells: Sequence[Cell],
    run_dir: str | Path,
    compute: Callable[[Cell], CellOutput],
    on_cell: Callable[[Cell, bool], None] | None = None,
    sweep: Callable[[list[Cell]], list[CellOutput]] | None = None,
    identity: dict[str, str] | None = None,
    model_id: Callable[[Cell], str | None] | None = None,
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
        identity: the run's identity (``run``: config hash, ``data``: fingerprint); each
            records file is written with it and its ``cell``, and a present file that carries
            another (copied from another run or cell) is refused, naming it.
        model_id: the ``save_id`` of the checkpoint of a cell's model (None: not saved yet),
            kept as the records' ``model`` (a transfer cell's also its source's, as
            ``source_model``): a present file of another model (a checkpoint replaced since) is
            refused, naming it.
    """
    run_dir = Path(run_dir)
    result = GridResult()

    def records_path(cell: Cell) -> Path:
        return run_dir / "records" / f"{cell.slug}.parquet"

    def identity_of(cell: Cell) -> dict[str, str] | None:
        if identity is None:
            return None
        model = model_id(cell) if model_id is not None else None
        found = {**identity, "cell": cell.slug, **({"model": model} if model else {})}
        if cell.source and model_id is not None:  # a transfer cell: the images' model too
            ids = [model_id(replace(cell, model=m, source="")) for m in source_members(cell.source)]
            if None not in ids:
                found["source_model"] = "+".join(map(str, ids))
        return found

    done = {cell.slug for cell in cells if records_path(cell).exists()}
    for cell in cells:
        if cell.slug in done and identity is not None:
            check_identity(records_path(cell), identity_of(cell))
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
                    fold=cell.fold,
                )
            if main and output.trace is not None:
                write_trace(output.trace, run_dir / "traces" / f"{cell.slug}.csv")
            if main:
                write_records(output.records, records_path(cell), identity_of(cell))
            distributed.barrier()  # the files are whole before any rank reads them
            result.computed.append(cell.slug)
        if on_cell is not None:
            on_cell(cell, cell.slug in result.skipped)
    return result
