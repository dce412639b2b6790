"""``advseg export RUN_DIR``: one cell's adversarial images and predictions as PNG (and NIfTI)."""

from __future__ import annotations

from pathlib import Path

import typer

from advseg.cli.console import console
from advseg.cli.data import CACHE_HELP
from advseg.cli.flags import count_flag, eps_flag, seed_flag
from advseg.errors import UserError
from advseg.threads import THREADS_HELP


def export_command(
    run_dir: Path = typer.Argument(..., help="A run directory (advseg run or evaluate)."),
    model: str | None = typer.Option(None, "--model", help="Model [default: the only one]."),
    attack: str | None = typer.Option(
        None, "--attack", help="Attack as the records name it [default: the only one]."
    ),
    eps: float | None = typer.Option(
        None, "--eps", help="eps [default: the only one].", callback=eps_flag
    ),
    loss: str | None = typer.Option(None, "--loss", help="Attack loss [default: the only one]."),
    train_seed: int | None = typer.Option(
        None,
        "--train-seed",
        callback=seed_flag,
        help="Training seed, in a grid with seeds [default: the only one].",
    ),
    slices: str | None = typer.Option(
        None,
        "--slices",
        help="Comma-separated slice ids; scan ids for a 3D model's cell, whose volumes are "
        "written as NIfTI on the source grid (default: --count slices, seeded).",
    ),
    count: int = typer.Option(
        4, "--count", callback=count_flag(), help="Slices to draw when --slices is not given."
    ),
    seed: int = typer.Option(
        0, "--seed", callback=seed_flag, help="Seed of the draw (spread over cases)."
    ),
    out: Path | None = typer.Option(
        None, "--out", help="Export folder [default: RUN_DIR/export/<cell>__<loss>]."
    ),
    checkpoint: Path | None = typer.Option(
        None, "--checkpoint", help="The model's checkpoint [default: the run's]."
    ),
    data: str | None = typer.Option(
        None, "--data", help="Data directory, or 'synthetic' (default: the one trained on)."
    ),
    cache_dir: Path | None = typer.Option(None, "--cache-dir", help=CACHE_HELP),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N."),
    threads: int | None = typer.Option(None, "--threads", help=THREADS_HELP),
) -> None:
    """Write one cell's adversarial images and clean / adversarial predictions of chosen slices
    as PNG and, for NIfTI sources, as NIfTI volumes on the source affine.

    The images are recomputed from the checkpoint with the run's attack settings (a run keeps
    numbers, not images) and checked against the run's records: export.json and the last line
    say how many slices reproduce the recorded pixel counts exactly (deterministic attacks do;
    attacks with random starts draw their own).
    """
    from advseg.data.location import data_argument
    from advseg.export_volumes import export_any
    from advseg.threads import set_threads

    set_threads(threads)  # before any model or data: torch's pool is sized once

    ids = [s.strip() for s in slices.split(",") if s.strip()] if slices else None
    if slices is not None and not ids:
        raise UserError(f"--slices {slices!r}: no slice id given (e.g. case1_day0_slice_0001)")
    result = export_any(  # a 3D model's cell: whole volumes as NIfTI on the source grid
        run_dir, model=model, attack=attack, eps=eps, loss=loss, train_seed=train_seed,
        slices=ids, count=count, seed=seed, out=out, checkpoint=checkpoint,
        data=data_argument(data), cache_dir=cache_dir, device=device,
    )  # fmt: skip
    terminal = console()
    cell = result.cell
    terminal.print(
        f"exported {len(result.slices)} slices of {cell['model']} / {cell['attack']} / eps "
        f"{cell['eps']:g} / {cell['loss']} to {result.out} ({len(result.files)} files)",
        highlight=False, soft_wrap=True,
    )  # fmt: skip
    gap = (result.check["dice_adv_export"] - result.check["dice_adv_recorded"]).abs().max()
    terminal.print(
        f"check: {result.reproduced} of {len(result.slices)} slices give the recorded pixel "
        f"counts exactly; largest adversarial Dice difference {gap:.4f} (export.json)",
        highlight=False, soft_wrap=True,
    )  # fmt: skip
