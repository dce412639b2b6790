"""``advseg run EXPERIMENT`` and ``advseg demo``: experiments, resumable, ending in a report."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from advseg import catalogue
from advseg.cli.console import console
from advseg.cli.data import CACHE_HELP
from advseg.cli.report import print_report
from advseg.config import load_yaml
from advseg.errors import UserError
from advseg.threads import THREADS_HELP

if TYPE_CHECKING:
    from rich.console import Console

    from advseg.experiment import ExperimentConfig, RunResult

app = typer.Typer()


def _print_phases(result: RunResult, console: Console) -> None:
    """Where the time went: two lines, the wall and the CPU seconds of the phases of
    :func:`advseg.experiment.run_experiment` (the interpreter's start and imports come before it
    and are not counted)."""
    parts = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in result.phases.items())
    console.print(f"time: {parts} (total {result.seconds:.1f} s)", highlight=False)
    parts = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in result.cpu.items())
    total = sum(result.cpu.values())
    console.print(f"CPU time (all threads): {parts} (total {total:.1f} s)", highlight=False)


def _print_result(result: RunResult, console: Console) -> None:
    from advseg.cli.table_ii import table_ii
    from advseg.data.location import run_locations

    grid = result.grid
    console.print(
        f"{len(grid.computed)} cells computed, {len(grid.skipped)} already done; "
        f"models trained now: {', '.join(result.trained) or 'none'}; "
        f"wall time {result.seconds:.1f} s; run directory {result.run_dir}",
        highlight=False,
    )
    if result.report is not None:
        print_report(result.report, console)
    else:
        locations = run_locations(result.run_dir)  # as the report would say: data.json, YAML
        for table in table_ii(result.cells, result.protocol, locations):
            console.print(table)
    for row in result.summary.itertuples(index=False):  # what the intervals rest on
        console.print(f"{row.model}: intervals: {row.interval}", highlight=False)
    if result.report is None:
        console.print(f"summary: {result.run_dir / 'summary.csv'}")


@app.command()
def run(
    experiment: str = typer.Argument(
        ..., help="An experiment YAML file, or a shipped one by name (demo, paper)."
    ),
    out: Path | None = typer.Option(None, help="Run directory [default: runs/<name>]."),
    compat: str | None = typer.Option(
        None,
        "--compat",
        help="The experiment's compat (YAML compat:): none, or notebook: reproduce the paper's "
        "notebook code for its FGSM attacks (blended update, swapped loss arguments, soft "
        "masks; not a recommended attack). Attacks naming their own compat keep it. Default: "
        "the YAML's.",
    ),
    data: str | None = typer.Option(
        None,
        "--data",
        help="Data directory, or 'synthetic' for the synthetic phantom; overrides the YAML's "
        "data.path (default: the YAML's; required where it names none, as paper's).",
    ),
    cache_dir: Path | None = typer.Option(None, "--cache-dir", help=CACHE_HELP),
    encoder_weights: list[str] = typer.Option(
        [],
        "--encoder-weights",
        metavar="NAME=PATH",
        help="NAME=PATH: model NAME (as the YAML's models list names it) starts from the "
        "encoder weights in the local safetensors file PATH (or NAME=imagenet, downloaded); "
        "repeatable, one per model; adds to the YAML's encoder_weights mapping (default: that "
        "mapping alone). A model not named trains from random init.",
    ),
    folds: int | None = typer.Option(
        None,
        "--folds",
        help="Case-level cross-validation (YAML split.folds): every model trained K times, "
        "model k tested on fold k of the cases (each case tested once), the folds' records "
        "pooled as one model's (a fold column). Default: the YAML's (none: one split).",
    ),
    threads: int | None = typer.Option(None, "--threads", help=THREADS_HELP),
) -> None:
    """Run an experiment grid (train or load models, attack, record, report); resumable.

    Under torchrun (`torchrun --nproc-per-node N -m advseg run ...`) training uses
    DistributedDataParallel and each cell's slices are sharded over the ranks; rank 0 writes.
    """
    path = catalogue.find_experiment(experiment)  # a typo answered before torch loads
    if data is None:
        _refuse_unnamed_data(path, experiment)
    from advseg import distributed
    from advseg.data.location import data_argument
    from advseg.experiment import check_config, load_experiment, run_experiment
    from advseg.threads import set_threads

    set_threads(threads)
    config = load_experiment(path)
    if compat is not None:
        try:
            config = check_config(replace(config, compat=compat))
        except UserError as err:
            raise UserError(f"--compat: {err}") from None
    if encoder_weights:
        config = _with_encoder_weights(config, encoder_weights)
    if folds is not None:
        try:
            config = check_config(replace(config, split=replace(config.split, folds=folds)))
        except UserError as err:
            raise UserError(f"--folds: {err}") from None
    if data is not None:
        config = replace(config, data=replace(config.data, path=data_argument(data)))
    if cache_dir is not None:  # where the cache is, not what is computed: a resume may change it
        config = replace(config, data=replace(config.data, cache_dir=cache_dir.absolute()))
    run_dir = out if out is not None else Path("runs") / config.name
    result = run_experiment(config, run_dir, progress=True)
    if distributed.is_main():  # under torchrun every rank ran the grid; rank 0 prints
        _print_result(result, console())


def _refuse_unnamed_data(path: Path, named: str) -> None:
    """Refuse, before torch loads, an experiment that names no data set when ``--data`` is not
    given (``paper.yaml`` names none), naming the experiment as typed (``named``); anything
    else in the file is checked by its loader."""
    settings = load_yaml(path)
    if not isinstance(settings, dict):
        return
    data = settings.get("data")
    if data is None or (isinstance(data, dict) and not data.get("path")):
        raise UserError(f"{named}: data: {catalogue.NO_DATA}")


def _with_encoder_weights(config: ExperimentConfig, given: list[str]) -> ExperimentConfig:
    """``config`` with ``--encoder-weights NAME=PATH`` values added to its mapping (paths made
    absolute, so the run's config.yaml names the files from any directory)."""
    from advseg.experiment import check_config

    mapping = dict(config.encoder_weights)
    for text in given:
        name, sep, path = text.partition("=")
        if not sep or not name or not path:
            raise UserError(f"--encoder-weights: {text!r} is not NAME=PATH")
        mapping[name] = path if path == "imagenet" else str(Path(path).expanduser().absolute())
    try:
        return check_config(replace(config, encoder_weights=mapping))
    except UserError as err:
        raise UserError(f"--encoder-weights: {err}") from None


@app.command()
def demo(
    data: Path | None = typer.Option(
        None, help="A data directory [default: the synthetic phantom, made on the fly]."
    ),
    out: Path | None = typer.Option(
        None, help="Run directory [default: runs/demo, or runs/demo-<data folder>]."
    ),
    threads: int | None = typer.Option(None, "--threads", help=THREADS_HELP),
) -> None:
    """Train the plain U-Net, attack it with FGSM under three losses, write the report."""
    from advseg.demo import run_demo
    from advseg.threads import set_threads

    set_threads(threads)

    result = run_demo(data, out, progress=True)
    _print_result(result, console())
    _print_phases(result, console())
