"""``advseg certify CHECKPOINT``: randomized-smoothing certification (SegCertify)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.table import Table

from advseg.cli.console import console
from advseg.cli.data import CACHE_HELP
from advseg.cli.flags import NOISE_FLAG, count_flag, seed_flag
from advseg.errors import UserError
from advseg.threads import THREADS_HELP

if TYPE_CHECKING:
    from advseg.data import DataConfig


def certify_command(
    checkpoint: Path = typer.Argument(..., help="Checkpoint (PATH or PATH.safetensors)."),
    out: Path = typer.Option(
        ..., "--out", help="Run directory; records go to OUT/certified/ (advseg report reads them)."
    ),
    sigma: float = typer.Option(0.25, "--sigma", help="Noise standard deviation (image units)."),
    n0: int = typer.Option(
        16, "--n0", callback=NOISE_FLAG, help="Noisy forwards that select each decision."
    ),
    n: int = typer.Option(
        128, "--n", callback=NOISE_FLAG, help="Noisy forwards that estimate its probability."
    ),
    alpha: float = typer.Option(0.001, "--alpha", help="Family-wise error rate per image."),
    radius: list[float] = typer.Option(
        [0.0, 0.1, 0.2], "--radius", help="L2 radius at which certified Dice is kept (repeatable)."
    ),
    data: str | None = typer.Option(
        None, "--data", help="Data directory, or 'synthetic' (default: the one trained on)."
    ),
    cache_dir: Path | None = typer.Option(None, "--cache-dir", help=CACHE_HELP),
    split: str = typer.Option("test", "--split", help="'test' (held-out cases) or 'all'."),
    max_slices: int | None = typer.Option(
        None,
        "--max-slices",
        callback=count_flag(),
        help="Certify at most N slices (seeded, spread over cases; default: all).",
    ),
    batch_size: int = typer.Option(
        8, "--batch-size", callback=count_flag(), help="Slices per batch."
    ),
    samples_per_forward: int = typer.Option(
        32, "--samples-per-forward", callback=count_flag(), help="Noisy copies."
    ),
    seed: int = typer.Option(0, "--seed", callback=seed_flag, help="Seed of the noise."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N."),
    threads: int | None = typer.Option(None, "--threads", help=THREADS_HELP),
) -> None:
    """Certify a model under Gaussian noise (Fischer et al. 2021): per slice and class, the
    certified Dice at each L2 radius (abstentions count as wrong) and the abstention rate.

    Slices with a mask only. Under torchrun the slices are sharded over the ranks.
    """
    from advseg import distributed
    from advseg.data.location import PHANTOM_LABEL, data_argument, is_synthetic
    from advseg.data.record import first_line
    from advseg.defences.smoothing import SmoothingConfig
    from advseg.evaluate.certify import certified_path, certified_summary, certify_checkpoint
    from advseg.runs.records import write_records
    from advseg.threads import set_threads
    from advseg.train.trained import checkpoint_label

    set_threads(threads)

    config = SmoothingConfig(
        sigma=sigma, n0=n0, n=n, alpha=alpha, radii=sorted(set(radius)),
        samples_per_forward=samples_per_forward, seed=seed,
    )  # fmt: skip
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a directory")
    distributed.init()
    terminal = console()
    used: list[DataConfig] = []

    def on_data(data_config: DataConfig) -> None:  # the first line: which data
        used.append(data_config)
        if distributed.is_main():
            terminal.print(first_line(data_config), highlight=False, soft_wrap=True)

    records = certify_checkpoint(
        checkpoint, config, data_path=data_argument(data), cache_dir=cache_dir, split=split,
        max_slices=max_slices, batch_size=batch_size, device=device, on_data=on_data,
    )  # fmt: skip
    if not distributed.is_main():
        return
    path = write_records(records, certified_path(out, checkpoint_label(checkpoint), config))
    summary = certified_summary(records)
    title = f"certified Dice (per-class), sigma {sigma:g}, n {n}, alpha {alpha:g}"
    if used and is_synthetic(used[0].path):
        title += f"; data: {PHANTOM_LABEL}"
    table = Table(title=title)
    columns = ("model", "L2 radius", "slices", "pairs", "DSC plain", "DSC certified", "abstained")
    for column in columns:
        table.add_column(column)
    for row in summary.itertuples(index=False):
        table.add_row(
            row.model, f"{row.radius:g}", str(row.slices), str(row.units), f"{row.dsc_plain:.4f}",
            f"{row.dsc_certified:.4f}", f"{row.abstained:.1%}",
        )  # fmt: skip
    terminal.print(table)
    terminal.print(f"records: {path}")
