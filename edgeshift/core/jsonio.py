"""JSON from files we did not write: nesting is bounded before the parser sees it.

Python's ``json`` parser recurses once per nesting level, so a document of 200,000 ``[`` raises RecursionError
(or worse, deeper than the C stack) instead of a decode error. Our documents (manifests, bench results, traces)
nest a handful of levels; anything deeper is refused as malformed, as a ``json.JSONDecodeError``.
"""

from __future__ import annotations

import json
import re
from typing import Any

__all__ = ["MAX_JSON_DEPTH", "loads_bounded"]

MAX_JSON_DEPTH = 32
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKET = re.compile(r"[\[\]{}]")


def _too_deep(text: str, max_depth: int) -> int | None:
    """Offset of the first bracket nested deeper than ``max_depth`` (strings skipped), else None."""
    depth = 0
    for match in _BRACKET.finditer(_STRING.sub('""', text)):
        depth += 1 if match.group() in "[{" else -1
        if depth > max_depth:
            return match.start()
    return None


def loads_bounded(text: str, *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads(text)``, refusing nesting deeper than ``max_depth`` with a JSONDecodeError."""
    where = _too_deep(text, max_depth)
    if where is not None:
        # The offset is into the text with its strings shortened, so it is not reported as a position.
        raise json.JSONDecodeError(f"nested deeper than {max_depth} levels", "", 0)
    return json.loads(text)
