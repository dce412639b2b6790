"""Every command's help says each option's default: typer's ``[default: ...]`` where the option
has one, else the help text names it (``default 16``, ``default: the YAML's``) or says the option
is required; and the defaults train's help names are TrainConfig's."""

from __future__ import annotations

import re

import pytest
from typer._click import Context
from typer.core import TyperOption

from advseg.cli import COMMANDS, load_command


def _leaves(name: str, command) -> list[tuple[str, object]]:
    subcommands = getattr(command, "commands", None)
    if not subcommands:
        return [(name, command)]
    return [leaf for sub, c in subcommands.items() for leaf in _leaves(f"{name} {sub}", c)]


COMMAND_LEAVES = [leaf for name in COMMANDS for leaf in _leaves(name, load_command(name))]


def _options(command, name: str) -> list[tuple[TyperOption, str]]:
    """The non-flag options of a command, each with its help as rendered."""
    context = Context(command, info_name=name)
    found = []
    for param in command.params:
        if isinstance(param, TyperOption) and not param.is_flag and param.name != "help":
            found.append((param, param.get_help_record(context)[1]))
    return found


@pytest.mark.parametrize(("name", "command"), COMMAND_LEAVES, ids=[n for n, _ in COMMAND_LEAVES])
def test_every_option_says_its_default(name, command):
    undocumented = []
    for option, text in _options(command, name):
        if option.required:
            continue
        has_value = option.default is not None and option.default != []
        if has_value and "[default: " in text:
            continue
        if not has_value and re.search(r"\bdefault\b|\brequired\b", text, re.IGNORECASE):
            continue
        undocumented.append(option.opts[0])
    assert not undocumented, f"advseg {name}: no default in the help of {undocumented}"


def test_train_help_defaults_are_train_config_defaults():
    """``--epochs`` says ``(default 15)`` where TrainConfig says 15, and so on for every numeric
    default train's help names (its options default to None: the --config file's value wins)."""
    from advseg.defences.adversarial_training import AdversarialConfig
    from advseg.train import TrainConfig

    fields = {**vars(AdversarialConfig()), **vars(TrainConfig())}
    fields = {key: value for key, value in fields.items() if isinstance(value, (int, float))}
    fields["workers"] = fields["num_workers"]
    checked = 0
    for option, text in _options(load_command("train"), "train"):
        key = option.name.removeprefix("adv_")
        stated = re.search(r"\bdefault:? (-?[0-9][0-9.e-]*)\b", text)
        if option.default is not None or stated is None or key not in fields:
            continue
        assert float(stated.group(1)) == fields[key], f"{option.opts[0]}: help says {stated[1]}"
        checked += 1
    assert checked >= 10  # epochs, batch size, lr, weight decay, patience, ..., adv eps, beta


def test_every_import_inside_the_command_modules_resolves():
    """Command modules import the library inside their bodies (so that help needs no torch); a
    renamed library name would only fail when the command runs: import each one here."""
    import ast
    import importlib
    import importlib.util
    from pathlib import Path

    import advseg.cli

    checked = 0
    for path in sorted(Path(advseg.cli.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                module = importlib.import_module(node.module)
                for alias in node.names:
                    found = hasattr(module, alias.name) or (
                        hasattr(module, "__path__")  # a package: maybe a submodule not loaded
                        and importlib.util.find_spec(f"{node.module}.{alias.name}") is not None
                    )
                    assert found, f"{path.name}: from {node.module} import {alias.name}"
                    checked += 1
    assert checked > 50
