"""Every pruning method installed: the classes named under the entry-point group ``edgeshift.methods``.

Our own methods are registered in ``pyproject.toml`` exactly as anyone else's package registers its own, so a
method from another package needs no change here: ``[project.entry-points."edgeshift.methods"] name =
"package.module:Class"``.
"""

from __future__ import annotations

import dataclasses
from importlib.metadata import entry_points
from typing import Any

from edgeshift.core.errors import EdgeshiftError
from edgeshift.core.registry import Registry

from .base import PruningMethod

GROUP = "edgeshift.methods"


def check_method(cls: Any, where: str) -> None:
    """Refuse, naming ``where``, a class that does not have what every method has."""
    missing = [a for a in ("name", "help", "Settings", "make_variants") if not hasattr(cls, a)]
    if missing:
        raise EdgeshiftError(f"{where}: a method class needs {', '.join(missing)} (see PruningMethod)")
    if not dataclasses.is_dataclass(cls.Settings):
        raise EdgeshiftError(f"{where}: {cls.__name__}.Settings must be a dataclass of setting(...) fields")
    unexplained = [f.name for f in dataclasses.fields(cls.Settings) if not f.metadata.get("help")]
    if unexplained:
        raise EdgeshiftError(f"{where}: settings {', '.join(unexplained)} have no help; make them with setting()")


def _load_installed() -> None:
    for ep in sorted(entry_points(group=GROUP), key=lambda e: e.name):
        where = f"entry point {ep.name} = {ep.value} ({GROUP})"
        try:
            cls = ep.load()
        except Exception as exc:  # another package's method that does not import: named, in one line
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise EdgeshiftError(f"{where} cannot be loaded: {type(exc).__name__}: {first[:200]}") from None
        check_method(cls, where)
        if cls.name != ep.name:
            raise EdgeshiftError(f"{where}: the class calls itself {cls.name!r}; name the entry point the same")
        METHODS.add(ep.name, cls, cls.help)


METHODS: Registry[type[PruningMethod]] = Registry("method", load=_load_installed)


def _shown(value: Any) -> str:
    if isinstance(value, tuple):
        return "[" + ", ".join(_shown(v) for v in value) + "]"
    return f'"{value}"' if isinstance(value, str) else str(value).lower() if isinstance(value, bool) else str(value)


def _made(factory: Any) -> Any:
    return factory() if callable(factory) else None


def method_lines() -> list[str]:
    """Every installed method with where it comes from, and each setting with its default and help, as a
    ``[[methods]]`` table would take it."""
    lines = []
    for entry in METHODS:
        cls = entry.value
        lines.append(f"{entry.name}: {entry.help} ({cls.__module__}:{cls.__qualname__})")
        fields = dataclasses.fields(cls.Settings)
        width = max((len(f.name) for f in fields), default=0)
        for f in fields:
            default = f.default if f.default is not dataclasses.MISSING else _made(f.default_factory)
            lines.append(f"    {f.name:<{width}} = {_shown(default)}  # {f.metadata['help']}")
    return lines
