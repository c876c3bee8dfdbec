"""One strict loader for every configuration the project reads: device profiles, pipeline configs, manifests.

A configuration is a tree of frozen dataclasses. Each field states its type, its default and its help once, with
``setting(default, help, ...)``; ``load(cls, document, source=..., error=...)`` checks a parsed TOML or JSON
document against it: an unknown key, a value of the wrong type, a value outside its range or its choices is an
error naming the source and the key (``my.toml: serving.batch_size must be int, got str 'four'``).

Types understood: bool, int, float (an int is accepted), str, ``Literal[...]`` (choices), unions of those,
``X | None`` (JSON null), ``tuple[X, ...]`` and ``list[X]`` (from lists), ``dict[str, X]`` and nested
dataclasses (from tables), and ``Any``.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import types
import typing
from pathlib import Path
from typing import Any, Callable, Literal, TypeVar, Union

from .errors import EdgeshiftError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 devices
    import tomli as tomllib

__all__ = ["load", "load_toml", "read_toml", "setting"]

C = TypeVar("C")
_MISSING = dataclasses.MISSING
MAX_INT = 2**63 - 1  # TOML's integers are 64-bit; a longer one in a file we did not write is malformed
MAX_CONFIG_BYTES = 1024 * 1024  # a configuration file larger than this is refused before it is parsed


def setting(
    default: Any = _MISSING,
    help: str = "",
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    check: Callable[[Any], str | None] | None = None,
) -> Any:
    """A dataclass field with its help; ``minimum`` and ``maximum`` (inclusive) and ``check`` (returns what is
    wrong, or None) are checked on load. A list or dict default is copied per instance."""
    meta = {"help": help, "minimum": minimum, "maximum": maximum, "check": check}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    if default is _MISSING:
        return dataclasses.field(metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def _describe(tp: Any) -> str:
    if tp is Any:
        return "any value"
    if tp is type(None):
        return "null"
    if tp is Any:
        return "any value"
    if _is_union(tp):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) in (list, tuple):
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    if typing.get_origin(tp) is dict or dataclasses.is_dataclass(tp):
        return "a table"
    if tp is float:
        return "int or float"
    return getattr(tp, "__name__", str(tp))


class _Bad(Exception):
    """A value does not match its type (the caller words the message)."""


def _convert(tp: Any, value: Any, where: str, source: str, error: type[EdgeshiftError]) -> Any:
    if tp is Any:
        return value
    if tp is Any:  # free-form (a model factory's keyword arguments): TOML already typed it
        return value
    if _is_union(tp):
        for arg in typing.get_args(tp):
            try:
                return _convert(arg, value, where, source, error)
            except _Bad:
                continue
        raise _Bad
    origin = typing.get_origin(tp)
    if origin is Literal:
        if isinstance(value, bool) or value not in typing.get_args(tp):
            raise _Bad
        return value
    if tp is type(None):
        if value is not None:
            raise _Bad
        return None
    if tp is bool:
        if not isinstance(value, bool):
            raise _Bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int) or not -MAX_INT <= value <= MAX_INT:
            raise _Bad
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _Bad
        if isinstance(value, int) and not -MAX_INT <= value <= MAX_INT or not math.isfinite(value):
            raise _Bad
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise _Bad
        return value
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise _Bad
        item = typing.get_args(tp)[0]
        items = [_convert_or_fail(item, v, f"{where}[{i}]", source, error) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise _Bad
        item = typing.get_args(tp)[1]
        return {str(k): _convert_or_fail(item, v, f"{where}.{k}", source, error) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise _Bad
        return load(tp, value, source=source, error=error, section=where)  # type: ignore[arg-type]
    raise TypeError(f"config type {tp!r} is not supported")  # a programming error, not a user's


def _convert_or_fail(tp: Any, value: Any, where: str, source: str, error: type[EdgeshiftError]) -> Any:
    try:
        return _convert(tp, value, where, source, error)
    except _Bad:
        if typing.get_origin(tp) is Literal:
            choices = ", ".join(str(a) for a in typing.get_args(tp))
            raise error(f"{source}: {where} = {value!r}; expected one of {choices}") from None
        if _out_of_range(value):
            raise error(f"{source}: {where} is out of range (not finite, or past 64 bits)") from None
        raise error(f"{source}: {where} must be {_describe(tp)}, got {type(value).__name__} {value!r}") from None


def _out_of_range(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return not -MAX_INT <= value <= MAX_INT
    return isinstance(value, float) and not math.isfinite(value)


def load(
    cls: type[C], document: Any, *, source: str, error: type[EdgeshiftError] = EdgeshiftError, section: str = ""
) -> C:
    """Build ``cls`` from ``document`` (a parsed table), strictly; ``section`` is its place in the whole file."""
    if not isinstance(document, dict):
        raise error(f"{source}: [{section or 'top level'}] must be a table, got {type(document).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    hints = typing.get_type_hints(cls)
    unknown = [k for k in document if k not in fields]
    if unknown:
        where = f"{section}.{unknown[0]}" if section else str(unknown[0])
        if all(dataclasses.is_dataclass(hints[f]) for f in fields):
            raise error(f"{source}: unknown section [{where}]; known: {', '.join(fields)}")
        raise error(
            f"{source}: unknown key {where!r}; known in [{section or 'top level'}]: {', '.join(sorted(fields))}"
        )
    values = {}
    for name, f in fields.items():
        where = f"{section}.{name}" if section else name
        if name not in document:
            if f.default is _MISSING and f.default_factory is _MISSING:
                raise error(f"{source}: [{section or 'top level'}] lacks {name!r}")
            if dataclasses.is_dataclass(hints[name]) and f.default_factory is not _MISSING:
                values[name] = load(hints[name], {}, source=source, error=error, section=where)
            continue
        value = _convert_or_fail(hints[name], document[name], where, source, error)
        minimum, maximum = f.metadata.get("minimum"), f.metadata.get("maximum")
        if minimum is not None and isinstance(value, (int, float)) and value < minimum:
            raise error(f"{source}: {where} must be >= {minimum:g}, got {value}")
        if maximum is not None and isinstance(value, (int, float)) and value > maximum:
            raise error(f"{source}: {where} must be <= {maximum:g}, got {value}")
        check = f.metadata.get("check")
        problem = check(value) if check is not None and value is not None else None
        if problem:
            raise error(f"{source}: {where} {problem}, got {value!r}")
        values[name] = value
    return cls(**values)


def read_toml(path: Any, *, error: type[EdgeshiftError] = EdgeshiftError, what: str = "file") -> dict:
    """A TOML file's document; a missing file or bad TOML is ``error`` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} not found: {path}")
    try:
        return tomllib.loads(read_capped(path, MAX_CONFIG_BYTES, error=error, what=what).decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{path}: not valid TOML ({exc})") from None
    except RecursionError:  # tomllib recurses per nesting level, in Python, so this is raised cleanly
        raise error(f"{path}: not valid TOML (nested too deeply)") from None


def toml_value(text: str) -> Any:
    """A value written on a command line as TOML reads it (``[2, 3]``, ``0.5``, ``true``, ``"x"``); a bare word
    that is not TOML is that string."""
    try:
        return tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError:
        return text


def read_capped(path: Any, cap: int, *, error: type[EdgeshiftError] = EdgeshiftError, what: str = "file") -> bytes:
    """The bytes of ``path``, refused with ``error`` when it holds more than ``cap`` (read at most ``cap + 1``:
    a file we did not write is never read whole before its size is known)."""
    try:
        with open(path, "rb") as f:
            data = f.read(cap + 1)
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if len(data) > cap:
        raise error(f"{path}: {what} larger than {cap:,} bytes; refused before parsing")
    return data


def load_toml(
    cls: type[C],
    path: Any,
    *,
    error: type[EdgeshiftError] = EdgeshiftError,
    overrides: dict[tuple[str, str], Any] | None = None,
) -> C:
    """Read a TOML file into ``cls``; ``overrides`` maps (section, key) to a value that replaces the file's."""
    document = read_toml(path, error=error)
    for (section, key), value in (overrides or {}).items():
        document.setdefault(section, {})[key] = value
    return load(cls, document, source=str(path), error=error)
