"""What a variant's ONNX bytes hold, read from the protobuf wire format itself: torch-free and onnx-free.

A variant is checked here before ONNX Runtime sees it, since what ORT does with a hostile graph is not ours to
bound once it has it:

- every tensor lives inside the model's own bytes: a tensor marked as external data makes ORT open the file it
  names, anywhere on the device;
- at most ``max_nodes`` operators and ``max_initializers`` weights (subgraphs and functions counted), subgraphs
  nested at most ``MAX_GRAPH_DEPTH`` deep, and at most ``MAX_FIELDS`` protobuf fields walked, so that neither this
  reader nor session creation runs for minutes on a small file;
- operators from the standard domain, ONNX Runtime's own ``com.microsoft`` kernels that its optimiser and
  quantizer emit, or functions the model defines; never ``Loop`` or ``Scan`` (their trip counts come from data,
  so one input can make a call run forever) nor ``EPContext`` (it names a compiled-model file);
- one graph input, float32, named and shaped as the manifest says.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Sequence

from edgeshift.core.errors import PortfolioError

__all__ = ["GraphFacts", "Malformed", "WireReader", "check_graph", "MAX_FIELDS", "MAX_GRAPH_DEPTH"]

MAX_FIELDS = 2_000_000  # protobuf fields walked per model: ~1 s of this reader; a real CNN has a few thousand
MAX_GRAPH_DEPTH = 4  # a subgraph (If's branches) inside a subgraph inside ...
DENIED_OPS = frozenset({"Loop", "Scan"})
MS_DOMAIN = "com.microsoft"
MS_OPS = frozenset(
    {
        # quantization (QOperator format, dynamic quantization, low-bit weights)
        "QLinearAdd", "QLinearMul", "QLinearSigmoid", "QLinearLeakyRelu", "QLinearGlobalAveragePool",
        "QLinearAveragePool", "QLinearConcat", "QLinearSoftmax", "QLinearWhere", "QLinearReduceMean", "QGemm",
        "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "MatMulNBits",
        "QAttention", "QOrderedMatMul",
        # fused kernels of ORT's optimiser, transformers above all
        "FusedConv", "FusedGemm", "FusedMatMul", "NhwcConv", "Gelu", "FastGelu", "BiasGelu", "QuickGelu", "BiasAdd",
        "SkipLayerNormalization", "LayerNormalization", "SimplifiedLayerNormalization", "Attention",
        "MultiHeadAttention", "GroupNorm", "BiasSoftmax", "Softmax",
    }
)  # fmt: skip
FLOAT = 1  # TensorProto.DataType.FLOAT

# Field numbers of onnx.proto (ModelProto, GraphProto, NodeProto, AttributeProto, TensorProto, ...).
_MODEL_GRAPH, _MODEL_OPSET, _MODEL_TRAINING, _MODEL_FUNCTIONS = 7, 8, 20, 25
_GRAPH_NODE, _GRAPH_INIT, _GRAPH_INPUT, _GRAPH_OUTPUT, _GRAPH_SPARSE_INIT = 1, 5, 11, 12, 15
_NODE_OP, _NODE_ATTR, _NODE_DOMAIN = 4, 5, 7
_ATTR_T, _ATTR_G, _ATTR_TENSORS, _ATTR_GRAPHS, _ATTR_SPARSE, _ATTR_SPARSES = 5, 6, 10, 11, 22, 23
_TENSOR_NAME, _TENSOR_EXTERNAL, _TENSOR_LOCATION = 8, 13, 14
_SPARSE_VALUES, _SPARSE_INDICES = 1, 2
_FUNCTION_NAME, _FUNCTION_NODE, _FUNCTION_DOMAIN = 1, 7, 10


class Malformed(Exception):
    """Bytes that are not a protobuf message."""


@dataclass
class GraphFacts:
    """What the check found: counts, the operators used, the main graph's inputs and outputs."""

    nodes: int = 0
    initializers: int = 0
    ops: dict[str, int] = field(default_factory=dict)  # "domain::op" (standard domain: "op") -> count
    inputs: list[tuple[str, int, tuple[int | str | None, ...]]] = field(default_factory=list)  # name, type, dims
    outputs: list[str] = field(default_factory=list)


class WireReader:
    """Fields of protobuf messages in a buffer, read under one budget of ``MAX_FIELDS``: the part of the wire
    format an ONNX model needs (also used to splice nested variants, ``edgeshift.runtime.nested``)."""

    def __init__(self, data):
        self.data, self.fields = data, 0

    def varint(self, pos: int, end: int) -> tuple[int, int]:
        data, value, shift = self.data, 0, 0
        while True:
            if pos >= end or shift > 63:
                raise Malformed("a truncated or overlong varint")
            b = data[pos]
            pos += 1
            value |= (b & 0x7F) << shift
            if b < 0x80:
                return value, pos
            shift += 7

    def fields_of(self, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
        """(field number, wire type, value or start, end) of each field of the message in data[start:end]; for a
        fixed-size field (wire type 1 or 5), (number, wire, start, end) of its bytes."""
        for number, wire, _, a, b in self.spans(start, end):
            yield number, wire, a, b

    def spans(self, start: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
        """As ``fields_of``, with where each field begins (its key) third: ``data[begin:end]`` is the whole field."""
        pos = start
        while pos < end:
            self.fields += 1
            if self.fields > MAX_FIELDS:
                raise Malformed(f"more than {MAX_FIELDS:,} protobuf fields")
            begin = pos
            key, pos = self.varint(pos, end)
            number, wire = key >> 3, key & 7
            if wire == 0:
                value, pos = self.varint(pos, end)
                yield number, wire, begin, value, pos
            elif wire == 2:
                length, pos = self.varint(pos, end)
                if pos + length > end:
                    raise Malformed("a field runs past its message")
                yield number, wire, begin, pos, pos + length
                pos += length
            elif wire in (1, 5):
                size = 8 if wire == 1 else 4
                if pos + size > end:
                    raise Malformed("a field runs past its message")
                yield number, wire, begin, pos, pos + size
                pos += size
            else:
                raise Malformed(f"wire type {wire} (groups are not ONNX)")

    def text(self, start: int, end: int) -> str:
        try:
            return bytes(self.data[start:end]).decode("utf-8")
        except UnicodeDecodeError:
            raise Malformed("a name is not UTF-8") from None


class _Reader(WireReader):
    def __init__(self, data, max_nodes: int, max_initializers: int):
        super().__init__(data)
        self.max_nodes, self.max_initializers = max_nodes, max_initializers
        self.facts = GraphFacts()
        self.functions: set[tuple[str, str]] = set()
        self.calls: set[tuple[str, str]] = set()

    # -- ONNX messages ----------------------------------------------------------------------------------------
    def model(self) -> None:
        graphs = []
        for number, wire, a, b in self.fields_of(0, len(self.data)):
            if wire != 2:
                continue
            if number == _MODEL_GRAPH:
                graphs.append((a, b))
            elif number == _MODEL_TRAINING:
                raise PortfolioError("holds training information, which a variant never needs")
            elif number == _MODEL_FUNCTIONS:
                self.function(a, b)
        if len(graphs) != 1:
            raise Malformed("no graph")
        self.graph(*graphs[0], depth=0)
        unknown = self.calls - self.functions
        if unknown:
            domain, op = sorted(unknown)[0]
            raise PortfolioError(
                f"uses operator {op!r} of domain {domain!r}, which is neither standard, one of ONNX Runtime's "
                "com.microsoft kernels, nor a function the model defines"
            )

    def function(self, start: int, end: int) -> None:
        name = domain = ""
        nodes = []
        for number, wire, a, b in self.fields_of(start, end):
            if wire != 2:
                continue
            if number == _FUNCTION_NAME:
                name = self.text(a, b)
            elif number == _FUNCTION_DOMAIN:
                domain = self.text(a, b)
            elif number == _FUNCTION_NODE:
                nodes.append((a, b))
        self.functions.add((domain, name))
        for a, b in nodes:
            self.node(a, b, depth=1)

    def graph(self, start: int, end: int, depth: int) -> None:
        if depth > MAX_GRAPH_DEPTH:
            raise PortfolioError(f"nests subgraphs more than {MAX_GRAPH_DEPTH} deep")
        initializer_names = set()
        inputs, outputs = [], []
        for number, wire, a, b in self.fields_of(start, end):
            if wire != 2:
                continue
            if number == _GRAPH_NODE:
                self.node(a, b, depth)
            elif number in (_GRAPH_INIT, _GRAPH_SPARSE_INIT):
                self.facts.initializers += 1
                if self.facts.initializers > self.max_initializers:
                    raise PortfolioError(
                        f"has more than {self.max_initializers:,} initializers (the profile's limits.max_initializers)"
                    )
                name = self.tensor(a, b) if number == _GRAPH_INIT else self.sparse(a, b)
                initializer_names.add(name)
            elif depth == 0 and number == _GRAPH_INPUT:
                inputs.append((a, b))
            elif depth == 0 and number == _GRAPH_OUTPUT:
                outputs.append(self.value_info(a, b)[0])
        if depth == 0:
            described = [self.value_info(a, b) for a, b in inputs]
            self.facts.inputs = [v for v in described if v[0] not in initializer_names]
            self.facts.outputs = outputs

    def node(self, start: int, end: int, depth: int) -> None:
        self.facts.nodes += 1
        if self.facts.nodes > self.max_nodes:
            raise PortfolioError(f"has more than {self.max_nodes:,} operators (the profile's limits.max_nodes)")
        op = domain = ""
        for number, wire, a, b in self.fields_of(start, end):
            if wire != 2:
                continue
            if number == _NODE_OP:
                op = self.text(a, b)
            elif number == _NODE_DOMAIN:
                domain = self.text(a, b)
            elif number == _NODE_ATTR:
                self.attribute(a, b, depth)
        key = op if domain in ("", "ai.onnx") else f"{domain}::{op}"
        self.facts.ops[key] = self.facts.ops.get(key, 0) + 1
        if domain in ("", "ai.onnx"):
            if op in DENIED_OPS:
                raise PortfolioError(
                    f"uses {op}, whose iteration count comes from data (a variant of this kit never needs it)"
                )
        elif domain == MS_DOMAIN:
            if op not in MS_OPS:
                raise PortfolioError(f"uses {domain} operator {op!r}, not one this kit allows")
        else:
            self.calls.add((domain, op))

    def attribute(self, start: int, end: int, depth: int) -> None:
        for number, wire, a, b in self.fields_of(start, end):
            if wire != 2:
                continue
            if number in (_ATTR_T, _ATTR_TENSORS):
                self.tensor(a, b)
            elif number in (_ATTR_SPARSE, _ATTR_SPARSES):
                self.sparse(a, b)
            elif number in (_ATTR_G, _ATTR_GRAPHS):
                self.graph(a, b, depth + 1)

    def tensor(self, start: int, end: int) -> str:
        name = ""
        for number, wire, a, b in self.fields_of(start, end):
            if number == _TENSOR_NAME and wire == 2:
                name = self.text(a, b)
            elif number == _TENSOR_EXTERNAL or (number == _TENSOR_LOCATION and wire == 0 and a != 0):
                raise PortfolioError(
                    f"keeps tensor {name or '?'!r} as external data (a file outside the variant); every weight must "
                    "be inside the variant's own bytes"
                )
        return name

    def sparse(self, start: int, end: int) -> str:
        name = ""
        for number, wire, a, b in self.fields_of(start, end):
            if wire == 2 and number in (_SPARSE_VALUES, _SPARSE_INDICES):
                found = self.tensor(a, b)
                name = name or found
        return name

    def value_info(self, start: int, end: int) -> tuple[str, int, tuple[int | str | None, ...]]:
        """(name, element type, dims: int, a symbol's name, or None) of a ValueInfoProto."""
        name, elem, dims = "", 0, []
        for number, wire, a, b in self.fields_of(start, end):
            if wire != 2:
                continue
            if number == 1:
                name = self.text(a, b)
            elif number == 2:  # TypeProto
                for n2, w2, a2, b2 in self.fields_of(a, b):
                    if n2 == 1 and w2 == 2:  # tensor_type
                        for n3, w3, a3, b3 in self.fields_of(a2, b2):
                            if n3 == 1 and w3 == 0:
                                elem = a3
                            elif n3 == 2 and w3 == 2:  # shape
                                for n4, w4, a4, b4 in self.fields_of(a3, b3):
                                    if n4 == 1 and w4 == 2:
                                        dims.append(self.dimension(a4, b4))
        return name, elem, tuple(dims)

    def dimension(self, start: int, end: int) -> int | str | None:
        for number, wire, a, b in self.fields_of(start, end):
            if number == 1 and wire == 0:
                return a
            if number == 2 and wire == 2:
                return self.text(a, b)
        return None


def check_graph(
    data,
    *,
    input_name: str,
    input_shape: Sequence[int | None],
    max_nodes: int,
    max_initializers: int,
) -> GraphFacts:
    """Read ``data`` (the ONNX bytes, or any buffer indexable by byte) and refuse it with a PortfolioError (its
    message says what is wrong, without the variant's name: the caller adds it) unless it is a model this kit
    runs; returns what was found."""
    reader = _Reader(data, max_nodes, max_initializers)
    try:
        reader.model()
    except Malformed as exc:
        raise PortfolioError(f"is not a valid ONNX model ({exc})") from None
    facts = reader.facts
    if len(facts.inputs) != 1:
        raise PortfolioError(f"has {len(facts.inputs)} inputs; a variant takes one, {input_name!r}")
    name, elem, dims = facts.inputs[0]
    if name != input_name or elem != FLOAT:
        raise PortfolioError(f"takes {name!r} (element type {elem}); the manifest says {input_name!r}, float32")
    fixed = [d if isinstance(d, int) else None for d in dims]
    if len(dims) != len(input_shape) or any(
        want is not None and have is not None and have != want for have, want in zip(fixed[1:], input_shape[1:])
    ):
        raise PortfolioError(f"takes shape {list(fixed)}; the manifest says {list(input_shape)}")
    return facts
