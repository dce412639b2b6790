"""What a training run shows and logs besides its checkpoints: rich progress bars (or a plain
line at intervals when the output is no terminal), the ETA of the epochs left, TensorBoard."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from advseg.errors import UserError
from advseg.progress import IntervalLines, bar_columns, clock_text
from advseg.train.config import TrainConfig


def tensorboard_writer(out_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError(
            "train.tensorboard: the tensorboard package is not installed (pip install tensorboard)"
        ) from None
    return SummaryWriter(str(out_dir / "tensorboard"))


def eta_text(elapsed: float, epochs_done: int, epoch: int, config: TrainConfig) -> str:
    """``  ETA 0:12:30`` for the epochs left at this run's pace (an upper bound: early stopping)."""
    left = config.epochs - epoch
    if left <= 0:
        return ""
    return f"  ETA {clock_text(elapsed / epochs_done * left)} ({left} epochs left at most)"


class Bar:
    """A rich progress bar with loss, learning rate and images/s, or nothing at all."""

    def __init__(self, progress=None) -> None:
        self.progress = progress
        self.task = None
        self.fields: dict[str, str] = {}
        self.done = 0
        self.lines: IntervalLines | None = None  # output that is no terminal: a line at intervals

    def start(self, description: str, total: int) -> None:
        if self.progress is None:
            return
        if self.task is not None:
            self.progress.update(self.task, visible=False)
        self.fields = {"stats": ""}
        self.task = self.progress.add_task(description, total=total, stats="")
        self.done = 0
        if not self.progress.console.is_terminal:
            self.lines = IntervalLines(self.epoch_done, description, total)

    def advance(self, loss: float | None = None, **values: float) -> None:
        if self.progress is None:
            return
        parts = [] if loss is None else [f"loss {loss:.4f}"]
        parts += [f"lr {values['lr']:.2e}"] if "lr" in values else []
        parts += [f"{values['images_per_s']:.1f} img/s"] if "images_per_s" in values else []
        if parts:
            self.fields["stats"] = "  ".join(parts)
        self.progress.update(self.task, advance=1, stats=self.fields["stats"])
        self.done += 1
        if self.lines is not None:
            self.lines.update(self.done, extra=self.fields["stats"])

    def epoch_done(self, text: str) -> None:
        if self.progress is not None:
            self.progress.console.print(text, highlight=False, soft_wrap=True)


@contextlib.contextmanager
def progress_bar(show: bool) -> Iterator[Bar]:
    if not show:
        yield Bar()
        return
    from rich.progress import Progress, TextColumn

    columns = (*bar_columns(), TextColumn("{task.fields[stats]}"))
    with Progress(*columns) as progress:
        yield Bar(progress)
