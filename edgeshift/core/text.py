"""Text from files we did not write, made safe to print: one line, no terminal control.

A variant name, a drop reason, a label or an error quoting a file can hold ANSI escape sequences (which move the
cursor, recolour or retitle a terminal, or hide what follows), carriage returns that overwrite a line, bidi
overrides that reorder it, and newlines that make one error look like several lines of output. Everything the CLI
prints from such a file goes through ``printable``.
"""

from __future__ import annotations

import re

__all__ = ["printable"]

# C0 controls (tab too), DEL, C1 controls, bidi embeddings/overrides/isolates, line and paragraph separators,
# and lone surrogates (which cannot be encoded for a terminal).
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def _escape(match: re.Match) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: object) -> str:
    """``str(text)`` with every control character escaped (``\\x1b``, ``\\n``, ``\\u202e``): one printable line."""
    return _UNSAFE.sub(_escape, str(text))
