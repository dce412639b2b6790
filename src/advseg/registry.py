"""Named registries: models, losses, attacks and metrics are created by name.

A name is the user interface (CLI options, YAML experiment files), so an unknown name is answered
with the list of valid ones instead of a KeyError.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from advseg.errors import UserError

T = TypeVar("T")


class Registry(Generic[T]):
    """A mapping from names to builders, with registration by decorator.

    Args:
        kind: what the registry holds, used in error messages ("model", "loss", "attack").
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._builders: dict[str, T] = {}
        self._help: dict[str, str] = {}

    def register(self, name: str, help: str = "") -> Callable[[T], T]:
        """Register a builder under ``name`` (a decorator); a name registered twice is an error."""

        def decorator(builder: T) -> T:
            if name in self._builders:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._builders[name] = builder
            self._help[name] = help or _summary(getattr(builder, "__doc__", None) or "")
            return builder

        return decorator

    def get(self, name: str) -> T:
        """The builder registered under ``name``; an unknown name lists the valid ones."""
        try:
            return self._builders[name]
        except KeyError:
            raise UserError(self.unknown_message(name)) from None

    def unknown_message(self, name: str) -> str:
        return unknown_message(self.kind, name, self.names())

    def names(self) -> list[str]:
        return sorted(self._builders)

    def help(self, name: str) -> str:
        return self._help[name]

    def __contains__(self, name: object) -> bool:
        return name in self._builders

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._builders)


def unknown_message(kind: str, name: str, valid: list[str]) -> str:
    """``unknown loss 'bcee' (did you mean 'bce'?); valid: ...``: how a name not among ``valid``
    (sorted) is answered, by a registry and by :func:`advseg.catalogue.check_names`."""
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown {kind} {name!r}{hint}; valid: {', '.join(valid)}"


def _summary(doc: str) -> str:
    """A docstring's first paragraph on one line: a builder's help when none is given."""
    return " ".join(doc.strip().split("\n\n")[0].split())
