"""Front doors that import on first use: ``import edgeshift`` (or ``edgeshift.pruner``) stays cheap, and a
package's ``__init__`` does not import the layers below it before they are asked for."""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any, Callable


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for a package whose names ``exports`` maps to the modules defining them."""

    def __getattr__(name: str) -> Any:
        if name in exports:
            return getattr(importlib.import_module(exports[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(exports)

    return __getattr__, __dir__


class _LazyModule(ModuleType):
    def __getattr__(self, attr: str) -> Any:
        return getattr(importlib.import_module(self.__name__), attr)


def lazy_module(name: str) -> ModuleType:
    """A stand-in for the module ``name`` that imports it on its first attribute access.

    For a command module whose library imports torch: the commands are listed, and the device commands run,
    without paying for (or having) torch. The layering test reads these names as imports."""
    return _LazyModule(name)
