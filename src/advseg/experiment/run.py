"""Running an experiment: :func:`run_experiment` checks everything first, prepares the run
directory, loads the data, trains (or loads) each model once per seed through the one training
path, works through the grid cell by cell, and writes Table II and the report.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

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
from advseg.corruptions import corruption_of
from advseg.crossmodel.cells import (
    ENSEMBLE_PREFIX,
    CrossModel,
    model_seeds,
)
from advseg.data import (
    SliceData,
    fold_train_val_test,
    load_data,
    load_volumes,
    split_train_val_test,
    spread_rows,
)
from advseg.defences import defend
from advseg.errors import UserError
from advseg.evaluate.cells import evaluate_sweep
from advseg.evaluate.corrupted import evaluate_corruptions
from advseg.experiment.check import check_config
from advseg.experiment.config import (
    EvaluationSpec,
    ExperimentConfig,
    ModelSpec,
    encoder_line,
    model_train_config,
    model_variants,
)
from advseg.experiment.external import open_externals
from advseg.experiment.grid import Cell, CellOutput, GridResult, plan_cells, run_cells
from advseg.experiment.preflight import check_experiment, check_held_out
from advseg.experiment.rundir import (
    check_data_fingerprint,
    model_dir,
    prepare_run_dir,
    run_identity,
)
from advseg.experiment.volumes import volume_model, volumetric
from advseg.labels import checkpoint_activation
from advseg.models import load_checkpoint, read_checkpoint
from advseg.models.checkpoint import checkpoint_exists, checkpoint_id
from advseg.models.ensemble import ensemble_members
from advseg.progress import cell_progress
from advseg.report import Report, write_report
from advseg.report.tables import headline_eps
from advseg.runs.provenance import record_session
from advseg.runs.records import read_records, white_box
from advseg.stats.bootstrap import with_intervals
from advseg.stats.summary import summarize_cells
from advseg.train import TrainConfig, fold_dir, resolve_device, train_on_data

PHASES = ("checks", "data", "training", "evaluation", "summary", "report")
"""The phases of :func:`run_experiment` whose wall time :attr:`RunResult.phases` holds."""


@dataclass
class RunResult:
    """What :func:`run_experiment` did.

    Attributes:
        run_dir: the run directory.
        grid: cells computed now and cells found finished.
        trained: models trained (or whose training was resumed) by this call.
        summary: Table II at the headline eps (also in ``summary.csv``).
        cells: its numbers one row per (model, attack, loss), from
            :func:`advseg.stats.summary.summarize_cells`; protocol: the Dice protocol of both.
        report: the written report, when ``config.report`` is true.
        seconds: wall time of this call.
        phases: wall seconds of its phases, in order: ``checks`` (config, preflight, run
            directory), ``data`` (load, split), ``training`` (models trained or loaded),
            ``evaluation`` (the grid's cells, training excluded), ``summary`` (Table II with its
            intervals), ``report``; they add up to ``seconds``.
        cpu: CPU seconds (user + system, every thread of this process) of the same phases: on a
            busy machine the wall time says little, the CPU time what the work cost.
    """

    run_dir: Path
    grid: GridResult
    trained: list[str]
    summary: pd.DataFrame
    cells: pd.DataFrame
    protocol: str
    report: Report | None
    seconds: float
    phases: dict[str, float] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)


def run_experiment(
    config: ExperimentConfig, run_dir: str | Path, *, progress: bool = False
) -> RunResult:
    """Run (or resume) an experiment in ``run_dir``: data, training, the grid, summary, report.

    ``run_dir`` is locked while it runs (:func:`advseg.lock.output_lock`): a second run into it
    is refused in one line; a lock left by a killed run is taken over.
    """
    from advseg.lock import output_lock

    with output_lock(run_dir, "advseg run"):
        return _run_experiment(config, run_dir, progress=progress)


def _run_experiment(
    config: ExperimentConfig, run_dir: str | Path, *, progress: bool = False
) -> RunResult:
    """:func:`run_experiment`'s work, with ``run_dir`` locked.

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
    phases = dict.fromkeys(PHASES, 0.0)
    cpu = dict.fromkeys(PHASES, 0.0)
    mark, cpu_mark = start, time.process_time()

    def close(phase: str) -> None:  # the time since the last mark goes to ``phase``
        nonlocal mark, cpu_mark
        now, cpu_now = time.perf_counter(), time.process_time()
        phases[phase] += now - mark
        cpu[phase] += cpu_now - cpu_mark
        mark, cpu_mark = now, cpu_now

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
    close("checks")
    columns = (SpinnerColumn(), TextColumn("{task.description}"), MofNCompleteColumn())
    hidden = not console.is_terminal
    with Progress(
        *columns, TimeElapsedColumn(), console=console, transient=True, disable=hidden
    ) as bar:
        task = bar.add_task(
            "loading data (the phantom is written on first use), slices", total=None
        )
        load = load_volumes if volumetric(config) else load_data  # a 3D grid: whole volumes
        data = distributed.main_first(  # rank 0 fills the preprocessing cache first
            lambda: load(config.data, progress=lambda n: bar.update(task, completed=n))
        )
    data = data if main else load(config.data)
    distributed.main_first(lambda: check_data_fingerprint(run_dir, data, config.data))
    splits = run_splits(data, config)  # fold -> (train, val, test) rows; None: one split
    rows_of = {
        fold: evaluation_rows(data, test, config.evaluation, config.seed)
        for fold, (_, _, test) in splits.items()
    }
    most = config.evaluation.max_slices
    drawn = "" if most is None else f"; at most {most}: evaluation.max_slices, a seeded draw"
    for fold, (train_rows, val_rows, test_rows) in splits.items():
        what = "cases split" if fold is None else f"fold {fold} of {config.split.folds}:"
        cases = data.index["case"].iloc[test_rows].nunique()
        console.print(
            f"data: {len(data)} slices; {what} into train {len(train_rows)}, validation "
            f"{len(val_rows)}, test {len(test_rows)} slices ({cases} cases); evaluated "
            f"{len(rows_of[fold])} test slices ({config.evaluation.slices}{drawn})",
            highlight=False,
            soft_wrap=True,
        )
    train_rows, _, _ = next(iter(splits.values()))
    eval_rows = rows_of[next(iter(rows_of))]  # cross-model cells: one split (check_folds)
    for line in data.exclusions.lines():
        console.print(f"data: {line}", highlight=False, soft_wrap=True)
    encoders = encoder_line(config)
    if encoders is not None:
        console.print(encoders, highlight=False, soft_wrap=True)
    cells = plan_cells(config)
    device = resolve_device(config.train.device)
    judged = open_externals(config, data, eval_rows, device)  # not trained: opened, as evaluate
    if judged and main:  # what each is, and the units of its eps (the report's provenance)
        provenance = {name: j.provenance for name, j in judged.items()}
        write_text_atomic(run_dir / "external.json", json.dumps(provenance, indent=2))
    close("data")
    Key = tuple[str, int | None, int | None]  # (model, training seed, fold)
    models: dict[Key, tuple[torch.nn.Module, str]] = {}
    seed_of: dict[Key, int] = {}  # the training seed of each model loaded
    activation_of: dict[Key, str] = {}  # how each model's logits are read
    trained = []
    if main:
        record_session(run_dir, "advseg run", device)  # version, device, date for the report

    variants = {
        name: (spec, defence)
        for spec in config.models
        for name, defence in zip(model_variants(spec), ["none", *spec.defences], strict=True)
    }

    def key_of(name: str, seed: int | None, fold: int | None = None) -> Key:
        spec = variants[name][0]  # a checkpoint is one model, whatever the cell's seed
        return spec.name, seed if model_seeds(config, spec.name) != [None] else None, fold

    def model_for(
        name: str, seed: int | None = None, fold: int | None = None
    ) -> tuple[torch.nn.Module, str]:
        spec, defence = variants[name]
        key = key_of(name, seed, fold)
        if key not in models:
            if spec.name in judged:
                net, arch = judged[spec.name].model, judged[spec.name].arch
                seed_of[key], activation_of[key] = 0, judged[spec.name].activation
            elif spec.arch.startswith(ENSEMBLE_PREFIX):
                members = ensemble_members(spec.arch)
                model_for(members[0], key[1])  # loaded first: its activation is the ensemble's
                activation_of[key] = activation_of[key_of(members[0], key[1])]
                net = cross.ensemble(
                    spec.arch, lambda member: model_for(member, key[1]), activation_of[key]
                )
                arch = spec.arch
                seed_of[key] = seed_of[key_of(members[0], key[1])]
            else:
                close("evaluation")  # what ran before this model was needed
                net, arch, fresh, seed_of[key], activation_of[key] = _get_model(
                    spec, config, data, run_dir, progress, key[1], fold
                )
                close("training")
                if fresh:
                    which = [f"seed {key[1]}"] * (key[1] is not None)
                    which += [f"fold {fold}"] * (fold is not None)
                    trained.append(spec.name + (f" ({', '.join(which)})" if which else ""))
            models.clear()  # one model in memory at a time
            models[key] = (net.to(device).eval(), arch)
        net, arch = models[key]
        return defend(net, defence), arch  # a fresh defence per cell: its own noise draws

    def seeded(cell: Cell, output: CellOutput) -> CellOutput:
        """The cell's records with the training seed of its model (``seed`` column) and its
        cross-validation fold (``fold``, -1 without folds)."""
        seed = seed_of[key_of(cell.model, cell.seed, cell.fold)] if cell.seed is None else cell.seed
        fold = -1 if cell.fold is None else cell.fold
        output.records = output.records.assign(seed=seed, fold=fold)
        if output.trace is not None:
            output.trace = output.trace.assign(seed=seed)  # the report names each trace's seed
        return output

    def activation_for(name: str, seed: int | None = None) -> str:
        if key_of(name, seed) not in activation_of:
            model_for(name, seed)  # loaded (trained) first: its activation is then known
        return activation_of[key_of(name, seed)]

    cross = CrossModel(
        config, data, eval_rows, train_rows, run_dir, model_for, console, activation_for
    )
    cross.check_io(lambda spec: model_train_config(config, spec).activation)

    def compute_cells(group: list[Cell]) -> list[CellOutput]:
        first = group[0]  # the group shares model, seed, fold, attack, options (sweep_key)
        net, arch = model_for(first.model, first.seed, first.fold)
        eval_rows = rows_of[first.fold]
        activation = checkpoint_activation(  # an attack's own activation must agree
            activation_of[key_of(first.model, first.seed, first.fold)],
            dict(first.kwargs).get("activation"),
            f"model {first.model!r}",
        )
        if corruption_of(first.attack) is not None:
            outputs = corrupted(group, net, arch, activation, eval_rows)
            return [seeded(c, o) for c, o in zip(group, outputs, strict=True)]
        eps = ", ".join(f"{c.eps:g}" for c in group)
        losses = ", ".join(dict.fromkeys(loss for c in group for loss in c.losses))
        kwargs = {"seed": config.seed, **dict(first.kwargs), "activation": activation}
        batch_size, volume, examples = config.evaluation.batch_size, {}, config.evaluation.examples
        cell_data = data
        if first.model in judged:  # a model advseg did not train: its own data, rows, units
            own = judged[first.model]
            cell_data, eval_rows, kwargs["valid_range"] = own.data, own.rows, own.valid_range
            batch_size = own.batch_size or batch_size
            examples = 0 if own.batch_size == 1 else examples  # volumes: no example panels
        if first.through:  # whole volumes, one at a time, through the window that scores them
            net = volume_model(config, net, arch, data.valid_range)
            kwargs["valid_range"] = data.valid_range
            batch_size = 1
            volume = {"through": first.through, "nsd_mm": config.evaluation.nsd_mm}
        what = f"evaluating {first.model}, {first.label} eps {eps} ({losses})"
        unit = "volumes" if first.through or batch_size == 1 else "slices"
        what += f" on {len(eval_rows)} {unit}"
        with cell_progress(console, what) as on_batch:
            results = evaluate_sweep(
                net,
                cell_data,
                eval_rows,
                first.attack,
                {c.eps: list(c.losses) for c in group},
                model_name=first.model,
                arch=arch,
                attack_kwargs=kwargs,
                batch_size=batch_size,
                **volume,
                examples=examples,
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

    def corrupted(
        group: list[Cell], net, arch: str, activation: str, eval_rows: np.ndarray
    ) -> list[CellOutput]:
        """A model's corruption cells in one pass (one clean forward per batch)."""
        pairs = [corruption_of(c.attack) for c in group]
        what = f"evaluating {group[0].model}, {len(group)} corruption cells"
        batch_size, volume = config.evaluation.batch_size, {}
        if volumetric(config):  # whole volumes, corrupted in 3D, scored by the sliding window
            net = volume_model(config, net, arch, data.valid_range)
            batch_size, volume = 1, {"volumes": True, "nsd_mm": config.evaluation.nsd_mm}
        unit = "volumes" if volume else "slices"
        with cell_progress(console, f"{what} on {len(eval_rows)} {unit}") as on_batch:
            results = evaluate_corruptions(
                net, data, eval_rows, pairs, model_name=group[0].model, arch=arch,
                activation=activation, seed=config.seed, batch_size=batch_size,
                examples=config.evaluation.examples, on_batch=on_batch, **volume,
            )  # fmt: skip
        return [CellOutput(r.records, r.examples) for r in results]

    def compute(cell: Cell) -> CellOutput:
        if cross.handles(cell):
            return seeded(cell, CellOutput(cross.compute(cell)))
        return compute_cells([cell])[0]

    total = len(cells)

    def on_cell(cell: Cell, skipped: bool) -> None:
        index = cells.index(cell) + 1
        state = "already done" if skipped else "done"
        console.print(f"cell {index}/{total} {cell.slug}: {state}", highlight=False)

    identity = distributed.broadcast_object(  # rank 0 writes run.json; every rank checks
        distributed.main_first(lambda: run_identity(config, run_dir, data.cache_path.name))
    )

    def model_id(cell: Cell) -> str | None:
        """The save_id of the checkpoint the cell's model is (ensembles: their members')."""
        spec = variants[cell.model][0]
        if spec.external is not None:
            return None  # its hashes are in external.json
        if spec.arch.startswith(ENSEMBLE_PREFIX):
            ids = [model_id(replace(cell, model=m)) for m in ensemble_members(spec.arch)]
            return None if None in ids else "+".join(map(str, ids))
        _, seed, fold = key_of(cell.model, cell.seed, cell.fold)
        if spec.checkpoint is not None:
            return checkpoint_id(spec.checkpoint)
        out = model_dir(run_dir, spec.name, seed)
        return checkpoint_id(
            (out if fold is None else fold_dir(out, fold)) / "checkpoints" / "best"
        )

    grid = run_cells(cells, run_dir, compute, on_cell, sweep=compute_cells, identity=identity,
                     model_id=model_id)  # fmt: skip
    close("evaluation")
    records = white_box(read_records(run_dir))  # every cell written: run_cells' last barrier
    if (records["corruption"] == "").any():  # Table II: the attack cells, when there are any
        records = records[records["corruption"] == ""]
    eps = headline_eps(records)
    protocol = config.evaluation.protocol
    headline = records[records["eps"] == eps]
    summary = with_intervals(headline, protocol)  # Table II with case-bootstrap intervals
    headline_cells = summarize_cells(headline, protocol)
    if main:
        written = summary.assign(protocol=protocol)  # the file names its Dice protocol
        write_text_atomic(run_dir / "summary.csv", written.to_csv(index=False, na_rep="n/a"))
    close("summary")
    report = None
    if config.report and main:
        with console.status("writing the report"):
            report = write_report(
                run_dir, protocol=protocol, eps=eps, baseline=config.corruption_baseline
            )
    close("report")
    seconds = mark - start
    return RunResult(
        run_dir, grid, trained, summary, headline_cells, protocol, report, seconds, phases, cpu
    )


def run_splits(
    data: SliceData, config: ExperimentConfig
) -> dict[int | None, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The grid's (train, validation, test) rows: ``{None: split}`` for one split, or one per
    fold ``{0: ..., K-1: ...}`` with ``split.folds`` (the test sides partition the cases)."""
    split = config.split
    if split.folds is None:
        return {None: split_train_val_test(data.index, split.test_fraction, split.val_fraction,
                                           split.seed)}  # fmt: skip
    return {
        fold: fold_train_val_test(data.index, split.folds, fold, split.val_fraction, split.seed)
        for fold in range(split.folds)
    }


def evaluation_rows(
    data: SliceData, test_rows: np.ndarray, evaluation: EvaluationSpec, seed: int = 0
) -> np.ndarray:
    rows = test_rows
    if evaluation.slices == "with_mask":
        if isinstance(data.masks, list):  # volumes: those with any mask
            has_mask = np.array([bool(data.masks[r].any()) for r in rows], bool)
        else:
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
    fold: int | None = None,
) -> tuple[torch.nn.Module, str, bool, int, str]:
    """The model of ``spec``: loaded from its checkpoint, or trained (resumed) in the run dir.

    Training is :func:`advseg.train.train_on_data`, the one training path (``advseg train``
    takes it too): the same split, augmentation, encoder weights and checkpoint metadata.

    Args:
        seed: a training seed of the grid's ``seeds`` (in place of ``train.seed``; the run in
            ``models/<name>/seed<k>/``), or None.
        fold: a cross-validation fold (``split.folds``; the run in ``models/<name>/fold<k>/``,
            trained on that fold's split), or None.

    Returns:
        ``(model, zoo name, trained_now, training seed, activation)``.
    """
    if spec.checkpoint is not None:
        net, meta = load_checkpoint(spec.checkpoint, classes=data.classes)
        check_held_out(meta.data, spec.checkpoint, config, data.index)
        return net, meta.model, False, int(meta.train.get("seed", 0)), meta.activation
    out = model_dir(run_dir, spec.name, seed)
    if fold is not None:
        out = fold_dir(out, fold)
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
            fold=None if fold is None else (fold, config.split.folds),
        )
    net, meta = load_checkpoint(best, classes=data.classes)
    return net, meta.model, fresh, train_config.seed, meta.activation


def _finished(last: Path, train_config: TrainConfig) -> bool:
    """True when the training run at ``last`` ran all its epochs or stopped early."""
    if not checkpoint_exists(last):
        return False
    _, _, state = read_checkpoint(last)
    return state is not None and (state["stopped_early"] or state["epoch"] >= train_config.epochs)
