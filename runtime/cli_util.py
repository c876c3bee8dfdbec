"""Shared CLI plumbing: expected errors become one line on stderr and a non-zero exit."""
from __future__ import annotations

import functools
import sys
from typing import Callable

import typer

from .errors import EdgeshiftError


def fail(message: str, code: int = 2) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def handle_errors(fn: Callable) -> Callable:
    """Run a command body; an EdgeshiftError (an expected mistake) prints one line and exits non-zero."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except EdgeshiftError as exc:
            raise fail(str(exc), exc.exit_code) from None
        except ModuleNotFoundError as exc:
            if exc.name in ("torch", "onnx", "onnxsim", "torch_pruning"):
                raise fail(f"this command needs the build tools ({exc.name} is not installed): "
                           "pip install 'edgeshift[build]'") from None
            raise
        except KeyboardInterrupt:
            raise fail("interrupted", 130) from None

    return wrapper


def echo_table(rows: list[list[str]], header: list[str], out=None) -> None:
    """Print a left-aligned text table."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    print(line(header), file=out or sys.stdout)
    print("  ".join("-" * w for w in widths), file=out or sys.stdout)
    for r in rows:
        print(line(r), file=out or sys.stdout)
