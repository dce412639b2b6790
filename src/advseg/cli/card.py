"""``advseg card CHECKPOINT`` and ``advseg leaderboard CARD...``: robustness cards and their
leaderboard (:mod:`advseg.card`)."""

from __future__ import annotations

from pathlib import Path

import typer

from advseg.cli.console import console
from advseg.cli.data import CACHE_HELP
from advseg.errors import UserError
from advseg.threads import THREADS_HELP


def card_command(
    checkpoint: Path = typer.Argument(..., help="Checkpoint (PATH or PATH.safetensors)."),
    out: Path = typer.Option(..., "--out", help="Directory for card.json and card.html."),
    data: str | None = typer.Option(
        None, "--data", help="Data directory, or 'synthetic' (default: the one trained on)."
    ),
    cache_dir: Path | None = typer.Option(None, "--cache-dir", help=CACHE_HELP),
    max_slices: int | None = typer.Option(
        None,
        "--max-slices",
        help="At most N held-out slices, seeded and spread over cases (default: all; fewer "
        "is a reduced card, marked as such).",
    ),
    sea_steps: int | None = typer.Option(
        None,
        "--sea-steps",
        help="SEA steps per member (default: its reference preset's; fewer: a reduced card).",
    ),
    certify_n: int = typer.Option(
        128, "--certify-n", help="Noisy samples per certified decision (fewer: a reduced card)."
    ),
    corruption: list[str] = typer.Option(
        [],
        "--corruption",
        help="Only this corruption (repeatable; each at severities 1-5). Default: every "
        "corruption, the protocol's; fewer is a reduced card.",
    ),
    batch_size: int = typer.Option(8, "--batch-size", help="Slices per batch."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N."),
    threads: int | None = typer.Option(None, "--threads", help=THREADS_HELP),
) -> None:
    """Measure a checkpoint by the card protocol (advseg-card/1) on its held-out cases: clean
    Dice, Dice under SEA at eps 2/255, 4/255 and 8/255 (L-inf), corruption mean Dice (every
    corruption at severities 1-5), certified Dice at L2 radius 0.1 (sigma 0.25); every number
    with the slices and cases behind it. Writes OUT/card.json (the numbers) and OUT/card.html."""
    from advseg.card import CardConfig, make_card
    from advseg.threads import set_threads

    set_threads(threads)  # before any model or data: torch's pool is sized once
    from advseg.card.pages import result_rows
    from advseg.data.location import data_argument

    config = CardConfig(
        checkpoint=checkpoint, out=out, data=data_argument(data), cache_dir=cache_dir,
        max_slices=max_slices, sea_steps=sea_steps, certify_n=certify_n, device=device,
        batch_size=batch_size, corruptions=list(corruption) or None,
    )  # fmt: skip
    card = make_card(config)
    terminal = console()
    terminal.print(f"card of {card['model']['name']} ({card['protocol']['version']}):")
    for measure, value, interval, on in result_rows(card):
        interval = (
            f" 95% {interval}" if interval.startswith("[") else f" ({interval})" * bool(interval)
        )
        terminal.print(f"  {measure}: {value}{interval}  [{on}]", highlight=False, markup=False)
    for line in card["warnings"]:
        terminal.print(f"[bold red]warning:[/] {line}", highlight=False)
    for deviation in card["protocol"]["deviations"]:
        terminal.print(f"[yellow]reduced:[/] {deviation}", highlight=False)
    terminal.print(f"card: [bold]{out / 'card.json'}[/] and {out / 'card.html'}")


def leaderboard_command(
    cards: list[Path] = typer.Argument(..., help="card.json files (or directories with one)."),
    out: Path = typer.Option(..., "--out", help="The leaderboard page to write (FILE.html)."),
) -> None:
    """A static, sortable HTML leaderboard of robustness cards (no external request)."""
    from advseg.atomic import write_text_atomic
    from advseg.card import read_card
    from advseg.card.pages import leaderboard_page

    if out.suffix.lower() not in (".html", ".htm"):
        raise UserError(f"--out {out}: give an .html file name")
    loaded = [read_card(path) for path in cards]
    write_text_atomic(out, leaderboard_page(loaded))
    console().print(f"leaderboard of {len(loaded)} cards: [bold]{out}[/]")
