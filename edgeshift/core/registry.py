"""One registry idea for every named choice (architectures, scorers, PaI modes, layer criteria, policies, device
profiles): entries register where they are defined, ``get(name)`` fails naming the known ones, and the CLI's
choices and help come from here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Iterator, Mapping, TypeVar

from .errors import UnknownNameError

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    """One registered thing, with a line of help and any facts the registry's owner records with it."""

    name: str
    value: T
    help: str = ""
    info: Mapping[str, Any] = field(default_factory=dict)


class Registry(Generic[T]):
    """``name -> Entry``, filled by ``@registry.register(name)`` where each thing is defined.

    ``load`` (optional) imports the modules that register themselves, on the first lookup: the registry can sit
    below the things registered in it without importing them at import time.
    """

    def __init__(self, kind: str, load: Callable[[], None] | None = None) -> None:
        self.kind = kind  # what an entry is, in words: "architecture", "switch policy", ...
        self._entries: dict[str, Entry[T]] = {}
        self._load = load

    def _loaded(self) -> dict[str, Entry[T]]:
        if self._load is not None:
            load, self._load = self._load, None
            load()
        return self._entries

    def add(self, name: str, value: T, help: str = "", **info: Any) -> T:
        """Register ``value`` under ``name``; a second registration of one name is a programming error."""
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._entries[name] = Entry(name, value, help, dict(info))
        return value

    def register(self, name: str, help: str = "", **info: Any) -> Callable[[T], T]:
        """Decorator form of ``add``: ``@REGISTRY.register("name", help="...")`` above a function or class."""

        def decorate(value: T) -> T:
            return self.add(name, value, help, **info)

        return decorate

    def entry(self, name: str) -> Entry[T]:
        entries = self._loaded()
        if name not in entries:
            raise UnknownNameError(self.kind, name, entries)
        return entries[name]

    def get(self, name: str) -> T:
        """The thing registered as ``name``; an unknown name raises UnknownNameError listing the known ones."""
        return self.entry(name).value

    def names(self) -> list[str]:
        return sorted(self._loaded())

    def __contains__(self, name: object) -> bool:
        return name in self._loaded()

    def __iter__(self) -> Iterator[Entry[T]]:
        entries = self._loaded()
        return iter([entries[n] for n in sorted(entries)])

    def choices_help(self) -> str:
        """``name: help`` for every entry, for a CLI option's help text."""
        return "; ".join(f"{e.name}: {e.help}" if e.help else e.name for e in self)
