"""JSON from files we did not write: bounded before the parser sees it, strict about what it gives back.

Python's ``json`` parser recurses once per nesting level, so a document of 200,000 ``[`` raises RecursionError
(or worse, deeper than the C stack) instead of a decode error. Our documents (manifests, bench results, traces)
nest a handful of levels; anything deeper is refused as malformed. The parser also accepts what no document of
ours holds and what breaks later code far from the file: ``NaN`` and ``Infinity``, ``1e400`` (infinite), integers
of thousands of digits (Python refuses to convert them later) and lone UTF-16 surrogates (``"\\ud800"``, which
cannot be printed or encoded). Each is refused here as a ``json.JSONDecodeError``.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

__all__ = ["MAX_JSON_DEPTH", "MalformedJSON", "loads_bounded"]

MAX_JSON_DEPTH = 32
MAX_INT_DIGITS = 20  # 2**64 has 20 digits: no count, size or hash of ours is longer
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKET = re.compile(r"[\[\]{}]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _too_deep(text: str, max_depth: int) -> int | None:
    """Offset of the first bracket nested deeper than ``max_depth`` (strings skipped), else None."""
    depth = 0
    for match in _BRACKET.finditer(_STRING.sub('""', text)):
        depth += 1 if match.group() in "[{" else -1
        if depth > max_depth:
            return match.start()
    return None


class MalformedJSON(json.JSONDecodeError):
    """What we refuse beyond the parser's own errors; no position (it would point into a rewritten text)."""

    def __init__(self, why: str):
        super().__init__(why, "", 0)

    def __str__(self) -> str:
        return self.msg


def _malformed(why: str) -> json.JSONDecodeError:
    return MalformedJSON(why)


def _int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise _malformed(f"an integer of {len(text)} digits")
    return int(text)


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _malformed(f"a number out of range ({text[:20]})")
    return value


def _constant(name: str) -> Any:
    raise _malformed(f"{name} is not a number")


def _check_strings(value: Any) -> None:
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            if _SURROGATE.search(v):
                raise _malformed("a string holds a lone UTF-16 surrogate")
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)


def loads_bounded(text: str, *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads(text)``, refusing nesting deeper than ``max_depth``, non-finite numbers, integers longer than
    20 digits and lone surrogates, each with a JSONDecodeError."""
    where = _too_deep(text, max_depth)
    if where is not None:
        # The offset is into the text with its strings shortened, so it is not reported as a position.
        raise _malformed(f"nested deeper than {max_depth} levels")
    value = json.loads(text, parse_int=_int, parse_float=_float, parse_constant=_constant)
    _check_strings(value)
    return value
