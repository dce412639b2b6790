"""Library errors in the words the user typed: ``--lr`` where the library names the key
``train.lr``, ``--adv-train`` where it names ``train.adversarial.method``."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import click

from advseg.errors import UserError
from advseg.limits import COUNT_MAX, NOISE_MAX, check_count, check_seed

_KEY = re.compile(r"^(?:train\.|preprocess\.|data\.)?((?:adversarial\.)?[a-z_]+)(?=[:. ])")
"""The key a library message starts with: ``train.lr: ...``, ``adversarial.select_by: ...``."""


def flag_of(key: str, flags: Mapping[str, str]) -> str:
    """The option of ``key``: ``flags[key]``, else ``--key`` (``adversarial.eps``:
    ``--adv-eps``)."""
    return flags.get(key) or "--" + key.replace("adversarial.", "adv-").replace("_", "-")


@contextmanager
def options_named(
    options: Iterable[str], file: Path | None = None, flags: Mapping[str, str] | None = None
) -> Iterator[None]:
    """Reword a :class:`UserError` raised inside to name the option typed.

    Args:
        options: the keys given on the command line (``lr``, ``adversarial.eps``); a message
            starting with one of them starts with its option instead.
        file: the ``--config`` file the other keys came from; its name is put first.
        flags: keys whose option is not ``--key`` (``{"num_workers": "--workers"}``).
    """
    given = set(options)
    try:
        yield
    except UserError as err:
        message = str(err)
        match = _KEY.match(message)
        key = match.group(1) if match else None
        if key in given:
            raise UserError(flag_of(key, flags or {}) + message[match.end() :]) from None
        if key is not None and file is not None and not message.startswith(str(file)):
            raise UserError(f"{file}: {message}") from None
        raise


def seed_flag(ctx: click.Context, param: click.Parameter, value: int | None) -> int | None:
    """Typer callback of every seed option (``--seed``, ``--split-seed``, ``--train-seed``): the
    one seed range of :mod:`advseg.limits`, refused in one line naming the option."""
    return None if value is None else check_seed(value, _flag_name(param))


def count_flag(low: int = 1, high: int = COUNT_MAX):
    """A typer callback for a count option: a whole number in ``[low, high]``
    (:func:`advseg.limits.check_count`), or None when not given."""

    def check(ctx: click.Context, param: click.Parameter, value: int | None) -> int | None:
        return None if value is None else check_count(value, _flag_name(param), low, high)

    return check


def eps_flag(ctx: click.Context, param: click.Parameter, value: object) -> object:
    """Typer callback of a budget option (``evaluate --eps``, repeatable): each a finite number
    >= 0, refused in one line before any data is read (it was after the data line)."""
    for eps in value if isinstance(value, (list, tuple)) else [value]:
        if eps is not None and not (math.isfinite(eps) and eps >= 0):
            raise UserError(f"{_flag_name(param)}: eps must be a finite number >= 0, got {eps}")
    return value


NOISE_FLAG = count_flag(1, NOISE_MAX)
"""``certify --n`` / ``--n0``: at most :data:`advseg.limits.NOISE_MAX` noisy forwards."""


def _flag_name(param: click.Parameter) -> str:
    long = [o for o in param.opts if o.startswith("--")]
    return (long or param.opts or [str(param.name)])[0]
