"""The ``advseg`` command line: thin typer commands over the library.

Each command group lives in its own module here and is attached below, explicitly. Commands parse
options, call one library function and print its result; they hold no logic. A
:class:`~advseg.errors.UserError` becomes one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import sys
import warnings

import typer
from rich.console import Console

from advseg import __version__
from advseg.allocator import keep_freed_memory
from advseg.cli import data
from advseg.cli import experiment as experiment_cli
from advseg.cli import report as report_cli
from advseg.errors import AdvsegWarning, UserError

app = typer.Typer(
    name="advseg",
    help="Adversarial robustness of medical image segmentation models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


app.add_typer(data.app, name="data")


@app.callback()
def _root() -> None:
    """Adversarial robustness of medical image segmentation models."""


@app.command()
def version() -> None:
    """Print the advseg version."""
    print(__version__)


from advseg.cli import certify as _certify  # noqa: E402
from advseg.cli import evaluate as _evaluate  # noqa: E402
from advseg.cli import models as _models  # noqa: E402
from advseg.cli import train as _train  # noqa: E402

app.command("models")(_models.models)
app.command("train")(_train.train)
app.command("evaluate")(_evaluate.evaluate_command)
app.command("attacks")(_evaluate.attacks_command)
app.command("certify")(_certify.certify_command)
app.add_typer(report_cli.app)  # advseg report
app.add_typer(experiment_cli.app)  # advseg run, advseg demo


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """advseg's own warnings as one line on stderr; any other keeps Python's format."""
    if issubclass(category, AdvsegWarning):
        Console(stderr=True).print(
            f"[bold yellow]warning:[/] {message}", highlight=False, soft_wrap=True
        )
    else:
        _python_show_warning(message, category, filename, lineno, file, line)


_python_show_warning = warnings.showwarning


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point; ``argv`` defaults to ``sys.argv[1:]``."""
    keep_freed_memory()
    warnings.showwarning = _show_warning
    try:
        app(args=argv, prog_name="advseg")
    except UserError as err:
        Console(stderr=True).print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
        sys.exit(2)
