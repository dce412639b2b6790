"""Library errors in the words the user typed: ``--lr`` where the library names the key
``train.lr``, ``--adv-train`` where it names ``train.adversarial.method``."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from advseg.errors import UserError

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
