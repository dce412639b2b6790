"""Typed configs, read from and written to YAML.

Each part of advseg keeps its own config dataclass beside the code that uses it (the preprocessing
config in ``data/preprocess.py``, the training config in ``train/config.py``, ...). This module
holds the one strict conversion between those dataclasses and plain dicts / YAML: an unknown key
or a value of the wrong type is a :class:`~advseg.errors.UserError` that names the key by its full
dotted path.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, TypeVar, Union

import yaml

from advseg.atomic import write_text_atomic
from advseg.errors import UserError

C = TypeVar("C")


def to_dict(config: Any) -> dict[str, Any]:
    """A dataclass as plain YAML-friendly data (tuples become lists, paths strings)."""
    return _plain(dataclasses.asdict(config))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def from_dict(cls: type[C], data: Any, where: str = "") -> C:
    """Build dataclass ``cls`` from ``data``, checking every key and type.

    Args:
        cls: the dataclass type.
        data: a mapping (as read from YAML); missing keys keep their defaults.
        where: dotted path of ``data`` inside the whole document, for error messages.
    """
    if not isinstance(data, dict):
        raise UserError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        key = _join(where, str(unknown[0]))
        raise UserError(f"{key}: unknown key; valid keys: {', '.join(sorted(fields))}")
    values = {
        name: _convert(hints[name], value, _join(where, name)) for name, value in data.items()
    }
    try:
        return cls(**values)
    except (TypeError, ValueError) as err:
        if isinstance(err, UserError):
            raise
        raise UserError(f"{where or cls.__name__}: {err}") from None


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _convert(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _convert(option, value, where)
            except UserError as err:
                errors.append(str(err))
        raise UserError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise UserError(f"{where}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        item = args[0] if args else Any
        items = [_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{where}: expected a mapping, got {type(value).__name__}")
        key_t, val_t = args or (Any, Any)
        return {
            _convert(key_t, k, where): _convert(val_t, v, f"{where}.{k}") for k, v in value.items()
        }
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, where)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise UserError(f"{where}: expected a finite number, got {value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise UserError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise UserError(f"{where}: expected a string, got {value!r}")
        return value
    if hint is Path:
        if not isinstance(value, (str, Path)):
            raise UserError(f"{where}: expected a path, got {value!r}")
        return Path(value)
    return value


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key repeated in one mapping (PyYAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, (str, int, float, bool, type(None))):
                continue  # an unhashable key is the base class's error to give
            line = key_node.start_mark.line + 1
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} repeated (first on line {seen[key]})",
                    key_node.start_mark,
                )  # fmt: skip
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


MAX_DEPTH = 64
"""The deepest nesting a YAML or JSON file advseg reads may have (its own files nest 6 deep):
a file nested thousands of levels deep is refused in one line, not a RecursionError."""


def check_depth(value: Any, where: str, limit: int = MAX_DEPTH) -> Any:
    """``value`` when its lists and mappings nest at most ``limit`` deep (walked without
    recursion), else a UserError naming ``where``."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > limit:
                raise UserError(f"{where}: nested more than {limit} levels deep")
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return value


def _too_deep(where: str) -> UserError:
    return UserError(f"{where}: nested more than {MAX_DEPTH} levels deep")


def read_text_utf8(path: Path) -> str:
    """The text of ``path`` as UTF-8; unreadable or not UTF-8 is a one-line UserError."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise UserError(f"{path}: cannot read ({err.strerror or err})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(
            f"{path}: not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start}); "
            "save it as UTF-8"
        ) from None


def read_json(path: str | Path) -> Any:
    """Parse a JSON file (UTF-8, nested at most :data:`MAX_DEPTH` deep); any fault is a one-line
    UserError naming the file."""
    path = Path(path)
    text = read_text_utf8(path)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON ({err})") from None
    except RecursionError:
        raise _too_deep(str(path)) from None
    return check_depth(value, str(path))


def load_yaml(path: str | Path) -> Any:
    """Parse a YAML file; a missing file, a syntax error, text that is not UTF-8 or nesting
    deeper than :data:`MAX_DEPTH` is a one-line UserError."""
    path = Path(path)
    text = read_text_utf8(path)
    try:
        value = yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or "invalid YAML"
        raise UserError(f"{path}:{line}: {problem}") from None
    except RecursionError:
        raise _too_deep(str(path)) from None
    return check_depth(value, str(path))


def save_yaml(config: Any, path: str | Path) -> None:
    """Write a dataclass (or plain data) as YAML, atomically."""
    data = to_dict(config) if dataclasses.is_dataclass(config) else _plain(config)
    write_text_atomic(path, yaml.safe_dump(data, sort_keys=False))
