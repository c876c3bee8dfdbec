"""Plain-text and Markdown tables: what every command prints its results as."""

from __future__ import annotations

import sys
from typing import Sequence, TextIO

from .text import printable


def render_table(rows: Sequence[Sequence[object]], header: Sequence[str]) -> str:
    """A left-aligned text table with a dashed rule under the header."""
    cells = [[printable(c) for c in header], *[[printable(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]

    def line(r: list[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()

    return "\n".join([line(cells[0]), "  ".join("-" * w for w in widths), *(line(r) for r in cells[1:])])


def echo_table(rows: Sequence[Sequence[object]], header: Sequence[str], out: TextIO | None = None) -> None:
    """Print ``render_table`` to ``out`` (default: standard output)."""
    print(render_table(rows, header), file=out or sys.stdout)


def markdown_table(rows: Sequence[Sequence[object]], header: Sequence[str]) -> str:
    """The same rows as a Markdown table."""
    lines = [f"| {' | '.join(header)} |", "|" + "---|" * len(header)]
    lines += [f"| {' | '.join(str(c) for c in r)} |" for r in rows]
    return "\n".join(lines) + "\n"
