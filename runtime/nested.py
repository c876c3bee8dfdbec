"""Nested variants: a narrower width built on the device from the weights of a wider one. Torch-free, onnx-free.

A network trained with nested widths ("Self-adaptive neural network for edge devices", sec. 4.2-4.3; Slimmable
Networks) keeps every narrower width's weights as slices of the widest one's. The portfolio stores the base
variant whole and each narrower one as its *skeleton*: its ONNX model with the data of every shared weight left
out, plus, per shared weight, the ranges of the base's weight of the same name that it keeps and, where the two
widths' batch norms differ (fused into the weights), one float32 factor per output channel. Here the skeleton and
the base's weights are spliced back into the narrower variant's ONNX bytes, on the protobuf wire format: every
shared weight's ``raw_data`` is the numpy slice of the base's (times its factors), appended to its tensor, and the
enclosing graph and model are re-encoded with their new lengths. The exporter builds the variant with this same
function, so the bytes made here are the bytes whose sha256 the manifest records, checked before ONNX Runtime sees
them.

Untrusted input: the skeleton, the base and the ranges are checked (float32 tensors, ranges inside the base's
dimensions, the skeleton's dimensions those of the slice, no data left in a shared tensor, the result no larger
than ``limit``) before anything is allocated for the result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from edgeshift.core.errors import PortfolioError

from .graph_check import Malformed, WireReader

__all__ = ["Ranges", "Shared", "Splicer", "assemble", "slice_index"]

Ranges = tuple[tuple[tuple[int, int], ...], ...]  # per dimension: the [start, stop) runs kept, ascending

_MODEL_GRAPH = 7
_GRAPH_INIT = 5
_TENSOR_DIMS, _TENSOR_TYPE, _TENSOR_FLOAT, _TENSOR_NAME, _TENSOR_RAW = 1, 2, 4, 8, 9
_TENSOR_EXTERNAL, _TENSOR_LOCATION = 13, 14
_FLOAT = 1
_MAX_DIMS = 8


@dataclass
class _Tensor:
    start: int  # the TensorProto message's bytes
    end: int
    dims: tuple[int, ...]
    data_type: int
    raw: tuple[int, int] | None  # raw_data's span
    has_values: bool  # raw_data, float_data or any other typed data, or external data


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, payload) -> bytes:
    """A length-delimited field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + bytes(payload)


def _tensor(reader: WireReader, start: int, end: int) -> tuple[str, _Tensor]:
    name, dims, data_type, raw, has_values = "", [], 0, None, False
    for number, wire, a, b in reader.fields_of(start, end):
        if number == _TENSOR_NAME and wire == 2:
            name = reader.text(a, b)
        elif number == _TENSOR_DIMS:
            if wire == 0:
                dims.append(a)
            elif wire == 2:  # packed
                pos = a
                while pos < b:
                    value, pos = reader.varint(pos, b)
                    dims.append(value)
            if len(dims) > _MAX_DIMS:
                raise Malformed(f"a tensor with more than {_MAX_DIMS} dimensions")
        elif number == _TENSOR_TYPE and wire == 0:
            data_type = a
        elif number == _TENSOR_RAW and wire == 2:
            raw, has_values = (a, b), True
        elif number in (3, 4, 5, 6, 7, 10, 11, _TENSOR_EXTERNAL) or (number == _TENSOR_LOCATION and a != 0):
            has_values = True  # typed data fields (float_data, int32_data, ...), external data
    return name, _Tensor(start, end, tuple(dims), data_type, raw, has_values)


def _initializers(reader: WireReader, wanted: set[str]) -> tuple[tuple[int, int], dict[str, _Tensor]]:
    """The model's graph span and its initializers named in ``wanted``."""
    graphs = [(a, b) for number, wire, a, b in reader.fields_of(0, len(reader.data)) if number == _MODEL_GRAPH]
    if len(graphs) != 1 or not isinstance(graphs[0][0], int):
        raise Malformed("no graph")
    found: dict[str, _Tensor] = {}
    for number, wire, a, b in reader.fields_of(*graphs[0]):
        if number == _GRAPH_INIT and wire == 2:
            name, tensor = _tensor(reader, a, b)
            if name in wanted:
                if name in found:
                    raise Malformed(f"two initializers named {name!r}")
                found[name] = tensor
    return graphs[0], found


def slice_index(ranges: Ranges, dims: Sequence[int]) -> tuple[np.ndarray, ...]:
    """Per dimension, the positions ``ranges`` keep, checked against ``dims`` (PortfolioError when outside)."""
    if len(ranges) != len(dims):
        raise PortfolioError(f"ranges for {len(ranges)} dimensions, the tensor has {len(dims)}")
    index = []
    for runs, size in zip(ranges, dims):
        previous = 0
        parts = []
        for start, stop in runs:
            if not previous <= start < stop <= size:
                raise PortfolioError(f"range [{start}, {stop}) is empty, out of order or outside a dimension of {size}")
            parts.append(np.arange(start, stop, dtype=np.int64))
            previous = stop
        if not parts:
            raise PortfolioError("a dimension keeps nothing")
        index.append(np.concatenate(parts))
    return tuple(index)


Shared = tuple[str, Ranges, "Sequence[float] | None"]  # a weight's name, its runs, its per-row scale


def assemble(skeleton, base, shared: Sequence[Shared], limit: int) -> bytes:
    """The narrower variant's ONNX bytes: ``skeleton`` with each ``(name, ranges, scale)`` of ``shared`` filled with
    that slice of ``base``'s initializer of the same name, each row along the first dimension multiplied by its
    ``scale`` (float32) where one is given. ``limit``: the most bytes the result may take.
    A PortfolioError (its message without the variant's name) for anything malformed or inconsistent."""
    return Splicer(skeleton, base, shared, limit).build()


class Splicer:
    """A skeleton read once against its base: the bytes around each shared weight and where the base holds it, so
    that building the variant again (every switch to it) is numpy slices and one join. Holds views of ``base``.
    Construction checks everything ``assemble`` promises; a PortfolioError otherwise."""

    def __init__(self, skeleton, base, shared: Sequence[Shared], limit: int):
        try:
            self._plan(skeleton, base, shared, limit)
        except Malformed as exc:
            raise PortfolioError(f"cannot be assembled from its base: not a valid ONNX model ({exc})") from None

    def _plan(self, skeleton, base, shared: Sequence[Shared], limit: int) -> None:
        wanted = {name for name, _, _ in shared}
        if len(wanted) != len(shared):
            raise PortfolioError("a shared weight is named twice")
        _, base_tensors = _initializers(WireReader(base), wanted)
        reader = WireReader(skeleton)
        graph, skeleton_tensors = _initializers(reader, wanted)
        base_view = memoryview(base)
        sources: dict[str, tuple[np.ndarray, Any, np.ndarray | None]] = {}
        total = len(skeleton)
        for name, ranges, scale in shared:
            source, target = base_tensors.get(name), skeleton_tensors.get(name)
            if source is None or target is None:
                raise PortfolioError(f"shares weight {name!r}, which its base or its skeleton lacks")
            if source.data_type != _FLOAT or target.data_type != _FLOAT or source.raw is None:
                raise PortfolioError(f"shares weight {name!r}, which is not a float32 tensor with raw data in both")
            if target.has_values:
                raise PortfolioError(f"shares weight {name!r}, yet its skeleton already holds values for it")
            if source.raw[1] - source.raw[0] != 4 * int(np.prod(source.dims, dtype=np.int64)):
                raise PortfolioError(f"its base's weight {name!r} does not hold the values its dimensions declare")
            index = slice_index(ranges, source.dims)
            if tuple(len(i) for i in index) != target.dims:
                raise PortfolioError(
                    f"shares weight {name!r} as a slice whose shape is not the skeleton's {target.dims}"
                )
            factor = None
            if scale is not None:
                if not target.dims or len(scale) != target.dims[0]:
                    raise PortfolioError(f"shares weight {name!r} with a scale that is not one number per row")
                factor = np.asarray(scale, dtype=np.float32).reshape(-1, *[1] * (len(target.dims) - 1))
            values = np.frombuffer(base_view[source.raw[0] : source.raw[1]], dtype="<f4").reshape(source.dims)
            if all(len(runs) == 1 for runs in ranges):  # one run per dimension: a view, no index arrays
                selector: Any = tuple(slice(runs[0][0], runs[0][1]) for runs in ranges)
            else:
                selector = np.ix_(*index)
            sources[name] = (values, selector, factor)
            total += 4 * int(np.prod(target.dims, dtype=np.int64)) + 16
        if total > limit + 16 * len(shared) + 64:
            raise PortfolioError(f"would take more than the {limit:,} bytes its manifest declares")
        by_start = {t.start: name for name, t in skeleton_tensors.items()}
        chunks: list[bytes | tuple[bytes, tuple[np.ndarray, Any, np.ndarray | None]]] = []
        run_start = graph[0]  # a stretch of graph fields copied as they are
        for number, wire, begin, a, b in reader.spans(*graph):
            if number == _GRAPH_INIT and wire == 2 and a in by_start:
                chunks.append(bytes(reader.data[run_start:begin]))
                chunks.append((bytes(reader.data[a:b]), sources[by_start[a]]))
                run_start = b
        chunks.append(bytes(reader.data[run_start : graph[1]]))
        head = tail = b""
        for number, wire, begin, a, b in reader.spans(0, len(skeleton)):
            if number == _MODEL_GRAPH and (a, b) == graph:
                head, tail = bytes(reader.data[:begin]), bytes(reader.data[b:])
        self._chunks, self._head, self._tail, self._limit = chunks, head, tail, limit

    def build(self) -> bytes:
        """The variant's ONNX bytes (at most the declared size)."""
        parts = []
        for chunk in self._chunks:
            if isinstance(chunk, bytes):
                parts.append(chunk)
                continue
            header, (values, selector, factor) = chunk
            sliced = values[selector]
            if factor is not None:
                sliced = sliced * factor  # float32 x float32: rounded alike on every IEEE machine
            parts.append(_field(_GRAPH_INIT, header + _field(_TENSOR_RAW, np.ascontiguousarray(sliced).tobytes())))
        out = self._head + _field(_MODEL_GRAPH, b"".join(parts)) + self._tail
        if len(out) > self._limit:
            raise PortfolioError(
                f"assembles to {len(out):,} bytes, more than the {self._limit:,} its manifest declares"
            )
        return out
