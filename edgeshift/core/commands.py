"""CLI plumbing shared by every command: an expected mistake is one line on stderr and a non-zero exit."""

from __future__ import annotations

import functools
from typing import Any, Callable, TypeVar

import typer

from .errors import EdgeshiftError
from .text import printable

F = TypeVar("F", bound=Callable[..., Any])

BUILD_MODULES = ("torch", "onnx", "onnxsim", "torch_pruning")


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print ``message`` as one line (control characters escaped: it may quote a file) and return the exit."""
    typer.echo(f"error: {printable(message)}", err=True)
    return typer.Exit(code)


def handle_errors(fn: F) -> F:
    """Run a command body; an EdgeshiftError (an expected mistake) prints one line and exits non-zero."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except EdgeshiftError as exc:
            raise fail(str(exc), exc.exit_code) from None
        except ModuleNotFoundError as exc:
            if exc.name in BUILD_MODULES:
                raise fail(
                    f"this command needs the build tools ({exc.name} is not installed): pip install 'edgeshift[build]'"
                ) from None
            raise
        except KeyboardInterrupt:
            raise fail("interrupted", 130) from None
        except OSError as exc:  # a file the user named: unreadable, a folder, a full disk
            where = f"{exc.filename}: " if exc.filename else ""
            raise fail(f"{where}{exc.strerror or exc}") from None

    return wrapper  # type: ignore[return-value]
