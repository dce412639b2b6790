"""The ``advseg`` command line: thin typer commands over the library.

Each command group lives in its own module here and is attached below, explicitly. Commands parse
options, call one library function and print its result; they hold no logic. A
:class:`~advseg.errors.UserError` becomes one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import errno
import importlib
import os
import sys
import warnings

import typer
from rich.console import Console
from typer import _click as click  # typer's own click: its commands raise its exceptions
from typer.core import TyperGroup

from advseg import __version__
from advseg.allocator import keep_freed_memory
from advseg.errors import AdvsegWarning, UserError
from advseg.runs.provenance import set_arguments

HELP = "Adversarial robustness of medical image segmentation models."

COMMANDS: dict[str, tuple[str, str, str]] = {
    "version": ("advseg.cli", "version", "Print the advseg version."),
    "models": ("advseg.cli.models", "models", "List the models with their parameter counts."),
    "train": (
        "advseg.cli.train",
        "train",
        "Train a model (AdamW, cosine schedule, early stopping).",
    ),
    "evaluate": (
        "advseg.cli.evaluate",
        "evaluate_command",
        "Attack checkpoints on a data split; write records, print Table II.",
    ),
    "attacks": (
        "advseg.cli.evaluate",
        "attacks_command",
        "List the attacks (with their options), losses and input defences.",
    ),
    "corruptions": (
        "advseg.cli.evaluate",
        "corruptions_command",
        "List the corruptions (TorchIO) with their five severities.",
    ),
    "certify": ("advseg.cli.certify", "certify_command", "Certify a model (randomized smoothing)."),
    "data": ("advseg.cli.data", "app", "Data sets: write the phantom, describe or check one."),
    "report": ("advseg.cli.report", "app", "Write a run's report from its records (no model)."),
    "export": (
        "advseg.cli.export",
        "export_command",
        "Write a cell's adversarial images and predictions (PNG, NIfTI).",
    ),
    "card": (
        "advseg.cli.card",
        "card_command",
        "Measure a checkpoint by the fixed card protocol; write card.json and card.html.",
    ),
    "leaderboard": (
        "advseg.cli.card",
        "leaderboard_command",
        "A static, sortable HTML leaderboard from robustness cards.",
    ),
    "run": ("advseg.cli.experiment", "app", "Run an experiment grid; resumable."),
    "demo": (
        "advseg.cli.experiment",
        "app",
        "Train a U-Net, attack it with FGSM, write the report.",
    ),
}
"""Command name -> (module, attribute, one-line help). A module is imported only when its command
runs or shows its own help: ``advseg --help``, ``--version``, ``version`` and a mistyped command
answer without importing torch, MONAI or matplotlib."""


def version() -> None:
    """Print the advseg version."""
    print(__version__)


def _plain_help(command: click.Command) -> click.Command:
    """Help as plain text: rich markup would take ``[default: ...]`` in help strings for a tag."""
    if hasattr(command, "rich_markup_mode"):
        command.rich_markup_mode = None  # type: ignore[attr-defined]
    command.params = [p for p in command.params if p.name not in _COMPLETION]
    for sub in getattr(command, "commands", {}).values():
        _plain_help(sub)
    return command


_COMPLETION = ("install_completion", "show_completion")


def load_command(name: str) -> click.Command:
    """Import the module of command ``name`` and return it as a click command."""
    module_name, attribute, _ = COMMANDS[name]
    target = getattr(importlib.import_module(module_name), attribute)
    if isinstance(target, typer.Typer):
        command = typer.main.get_command(target)
        if isinstance(command, TyperGroup) and name in command.commands:  # report, run, demo
            command = command.commands[name]
    else:
        single = typer.Typer(pretty_exceptions_enable=False, add_completion=False)
        single.command(name)(target)
        command = typer.main.get_command(single)
    command.name = name
    return _plain_help(command)


class LazyGroup(TyperGroup):
    """The ``advseg`` group: lists its commands from :data:`COMMANDS`, imports one when used."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        return load_command(cmd_name) if cmd_name in COMMANDS else None

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(name, text) for name, (_, _, text) in COMMANDS.items()])


app = typer.Typer(
    name="advseg",
    cls=LazyGroup,
    help=HELP,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _print_version(value: bool) -> None:
    if value:
        print(__version__)
        raise typer.Exit()


@app.callback()
def _root(
    show_version: bool = typer.Option(
        False,
        "--version",
        "-V",
        help="Print the version and exit.",
        is_eager=True,
        callback=_print_version,
    ),
) -> None:
    """Adversarial robustness of medical image segmentation models."""


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
    set_arguments(sys.argv[1:] if argv is None else argv)  # what provenance.json records
    warnings.showwarning = _show_warning
    # segmentation_models_pytorch's import (through timm) calls a deprecated torch API: a
    # library's note to its own authors, two lines on every command a user cannot act on.
    warnings.filterwarnings("ignore", r"`torch\.jit\.interface` is deprecated", FutureWarning)
    try:
        check_arguments(sys.argv[1:] if argv is None else argv)
        app(args=argv, prog_name="advseg")
        sys.stdout.flush()  # a full stdout fails here, not at exit
    except UserError as err:
        Console(stderr=True).print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except UnicodeEncodeError as err:
        if "surrogates not allowed" not in str(err) or not isinstance(err.object, str):
            raise
        # a file name found on disk (not typed: check_arguments saw those), or the directory
        # a relative path was resolved in, whose bytes are not UTF-8
        Console(stderr=True).print(
            f"[bold red]error:[/] {not_utf8(err.object)}", highlight=False, soft_wrap=True
        )
        sys.exit(2)
    except OSError as err:
        if err.errno not in _OUTPUT_ERRORS or err.filename is not None:
            raise  # not a stream: advseg.atomic names the files it writes
        _quiet_stdout()
        print(f"error: cannot write the output (stdout): {_OUTPUT_ERRORS[err.errno]}",
              file=sys.stderr)  # fmt: skip
        sys.exit(2)
    finally:
        set_arguments(None)


def check_arguments(argv: list[str]) -> None:
    """Refuse, before any command runs, an argument no command can use: an empty one (``--out
    ''`` was read as ``.``, the current directory) or one that is not UTF-8 (a file name in
    another encoding: records, JSON and YAML hold paths as UTF-8 text, and writing them was a
    traceback). One line naming the option, the undecodable bytes shown as ``\\xff``."""
    for i, arg in enumerate(argv):
        option = argv[i - 1] if i and argv[i - 1].startswith("--") else None
        name, _, value = arg.partition("=") if arg.startswith("--") else ("", "", arg)
        if arg == "" or (name and arg.endswith("=") and not value):
            where = name or option or f"argument {i + 1} of the command line"
            raise UserError(f"{where}: an empty value (a path, name or number was expected)")
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError:
            where = f"{name or option}: " if name or option else ""
            raise UserError(f"{where}{not_utf8(arg)}") from None


def not_utf8(text: str) -> str:
    """The one line for a name whose bytes are not UTF-8 (Python keeps them as surrogates)."""
    shown = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return (
        f"'{shown}' is not UTF-8 text (a name in another encoding); advseg writes paths into "
        "its records and JSON files as UTF-8: rename it"
    )


_OUTPUT_ERRORS = {
    errno.ENOSPC: "no space left on the device",
    errno.EPIPE: "the reader closed the pipe",
    errno.EIO: "input/output error",
    errno.EDQUOT: "disk quota exceeded",
}


def _quiet_stdout() -> None:
    """Point stdout at /dev/null so that the interpreter's last flush cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass
