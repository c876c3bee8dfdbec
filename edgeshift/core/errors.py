"""Errors for expected mistakes. The CLI prints their message as one line and exits non-zero.

Torch-free on purpose: every package (device side and build side) raises these.
"""

from __future__ import annotations

import os
from typing import Iterable


class EdgeshiftError(Exception):
    """An expected mistake by the user: the message says what is wrong and what would be right."""

    exit_code = 2


class UnknownNameError(EdgeshiftError):
    """A name looked up in a registry does not exist."""

    def __init__(self, kind: str, name: str, known: Iterable[str]):
        self.kind, self.name, self.known = kind, name, sorted(known)
        super().__init__(f"unknown {kind} {name!r}; known: {', '.join(self.known)}")


class InputFileError(EdgeshiftError):
    """A file the user named is missing, unreadable or of the wrong kind."""


class PortfolioError(EdgeshiftError):
    """A portfolio file is corrupt, truncated, tampered with or malformed."""


class ProfileError(EdgeshiftError):
    """A device profile is malformed."""


class InputShapeError(EdgeshiftError, ValueError):
    """A batch given to the runtime does not match the manifest's input."""


class NotExactError(EdgeshiftError):
    """A transformation that must preserve outputs changed them beyond tolerance."""


class ModelNotTraceableError(EdgeshiftError):
    """A model cannot be traced into a graph (data-dependent control flow, unsupported op)."""


class OutputExistsError(EdgeshiftError):
    """An output path exists and overwriting was not asked for."""


def require_file(path: str | os.PathLike, what: str = "file") -> None:
    """Raise InputFileError naming ``path`` when it is not an existing regular file."""
    if not os.path.exists(path):
        raise InputFileError(f"{what} not found: {path}")
    if not os.path.isfile(path):
        raise InputFileError(f"{what} is not a regular file: {path}")
