"""A routed network (``edgeshift.pruner.routing``) as one ONNX graph: the router, then the signature it names.

Each part is exported on its own first (conv-BN fused, simplified, checked against PyTorch), then composed: per
signature an ``If`` runs it on the inputs routed to it (``GatherND``) and writes their logits into their rows
(``ScatterND``), skipped when it has none, so at batch 1 an input costs the router and its own signature. Each
signature's weights live inside its branch, as constants of that branch. No ``Loop`` or ``Scan``: the device side
refuses those (their trip counts come from data). The INT8 form quantizes every part alone and composes them the
same way (``routed_int8``).

Measured against the same router and signatures as separate sessions, the choice made in Python (the CIFAR-10
VGG-16's four signatures, batch 1 under ``host``, test images interleaved, 2026-12-04, 2 vCPU AMD EPYC): within
the runs' noise of each other (mean 3.57 against 3.54 ms on 600 images), so the routed form ships as one variant
that every part of the runtime already serves.
"""

from __future__ import annotations

import collections
import copy
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from edgeshift.core.atomic import write_bytes_atomic
from edgeshift.core.errors import NotExactError
from edgeshift.device_profiles import DeviceProfile
from edgeshift.pruner.metrics import count_macs
from edgeshift.pruner.routing import RoutedNetwork

from .onnx_export import (
    DEFAULT_OPSET,
    DEFAULT_RTOL,
    INPUT_NAME,
    OUTPUT_NAME,
    ExportError,
    ExportReport,
    _ort_outputs,
    export_onnx,
)
from .quantize import Calibration, Int8Choice, Int8Scheme, fastest_of, matmul_heavy, quantize_onnx, schemes_for


def _renamed(graph: onnx.GraphProto, prefix: str, keep: str = "") -> onnx.GraphProto:
    """A copy of ``graph`` with every value, weight and node name but ``keep`` prefixed (names stay unique once
    composed)."""
    g = copy.deepcopy(graph)

    def name(n: str) -> str:
        return n if not n or n == keep else prefix + n

    for node in g.node:
        node.name = prefix + (node.name or node.op_type)
        node.input[:] = [name(i) for i in node.input]
        node.output[:] = [name(o) for o in node.output]
    for t in g.initializer:
        t.name = name(t.name)
    for v in [*g.input, *g.output, *g.value_info]:
        v.name = name(v.name)
    return g


def _constant(name: str, value: int | list[int]) -> onnx.NodeProto:
    dims = [] if isinstance(value, int) else [len(value)]
    vals = [value] if isinstance(value, int) else value
    return helper.make_node(
        "Constant", [], [name], name=name, value=helper.make_tensor(name, TensorProto.INT64, dims, vals)
    )


def _branch(
    nodes: list[onnx.NodeProto], name: str, output: str, weights: list[onnx.TensorProto] | None = None
) -> onnx.GraphProto:
    return helper.make_graph(
        nodes, name, [], [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)], initializer=weights or []
    )


def compose(router: onnx.ModelProto, signatures: list[onnx.ModelProto], classes: int) -> onnx.ModelProto:
    """One graph computing, per input, the logits of the signature the router's argmax names: per signature an
    ``If`` that runs it on the inputs routed to it (``GatherND``) and writes their logits into their rows
    (``ScatterND``), skipped when it has none; each signature's weights inside its branch."""
    r = _renamed(router.graph, "router/", keep=INPUT_NAME)
    nodes = [
        *r.node,
        helper.make_node("ArgMax", [r.output[0].name], ["route"], name="route", axis=1, keepdims=0),
        helper.make_node("Shape", [INPUT_NAME], ["input_shape"], name="input_shape", start=0, end=1),
        _constant("classes", [classes]),
        helper.make_node("Concat", ["input_shape", "classes"], ["logits_shape"], name="logits_shape", axis=0),
        helper.make_node(
            "ConstantOfShape",
            ["logits_shape"],
            ["logits_0"],
            name="logits_0",
            value=helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0]),
        ),
        _constant("none", 0),
    ]
    for k, model in enumerate(signatures):
        s = _renamed(model.graph, f"signature_{k}/")
        items, logits = s.input[0].name, s.output[0].name
        rows, before, after = f"rows_{k}", f"logits_{k}", f"logits_{k + 1}"
        nodes += [
            _constant(f"k_{k}", k),
            helper.make_node("Equal", ["route", f"k_{k}"], [f"is_{k}"], name=f"is_{k}"),
            helper.make_node("NonZero", [f"is_{k}"], [f"where_{k}"], name=f"where_{k}"),
            helper.make_node("Transpose", [f"where_{k}"], [rows], name=rows, perm=[1, 0]),  # (M, 1)
            helper.make_node("Size", [rows], [f"count_{k}"], name=f"count_{k}"),
            helper.make_node("Greater", [f"count_{k}", "none"], [f"any_{k}"], name=f"any_{k}"),
        ]
        then = _branch(
            [
                helper.make_node("GatherND", [INPUT_NAME, rows], [items], name=f"signature_{k}/gather"),
                *s.node,
                helper.make_node("ScatterND", [before, rows, logits], [f"then_{k}"], name=f"signature_{k}/scatter"),
            ],
            f"signature_{k}",
            f"then_{k}",
            # the weights inside the branch, not read from the outer scope: ONNX Runtime optimises a branch's own
            # constants (an INT8 signature's weights read from outside ran 1.7x slower than its FP32 form)
            [*s.initializer],
        )
        skip = _branch(
            [helper.make_node("Identity", [before], [f"else_{k}"], name=f"skip_{k}")], f"skip_{k}", f"else_{k}"
        )
        nodes.append(helper.make_node("If", [f"any_{k}"], [after], name=f"run_{k}", then_branch=then, else_branch=skip))
    nodes.append(helper.make_node("Identity", [f"logits_{len(signatures)}"], [OUTPUT_NAME], name="output"))
    graph = helper.make_graph(
        nodes,
        "routed",
        [copy.deepcopy(router.graph.input[0])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", classes])],
        initializer=[*r.initializer],
    )
    versions: dict[str, int] = {}
    for model in (router, *signatures):  # every domain a part uses (an INT8 part: ONNX Runtime's own too)
        for opset in model.opset_import:
            versions[opset.domain] = max(versions.get(opset.domain, 0), opset.version)
    out = helper.make_model(
        graph, opset_imports=[helper.make_opsetid(d, v) for d, v in versions.items()], producer_name="edgeshift"
    )
    out.ir_version = max(m.ir_version for m in (router, *signatures))
    return out


def _op_counts(graph: onnx.GraphProto, counts: collections.Counter | None = None) -> dict[str, int]:
    """Operators of ``graph`` and of every branch inside it."""
    counts = collections.Counter() if counts is None else counts
    for node in graph.node:
        counts[node.op_type] += 1
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                _op_counts(attribute.g, counts)
    return dict(sorted(counts.items()))


def _params(graph: onnx.GraphProto) -> int:
    """Weight elements of ``graph`` and of every branch inside it."""
    own = sum(int(np.prod(t.dims)) for t in graph.initializer)
    return own + sum(_params(a.g) for node in graph.node for a in node.attribute if a.type == onnx.AttributeProto.GRAPH)


def _near_tie(router_logits: np.ndarray, rtol: float) -> np.ndarray:
    """Inputs whose two best routes are within float rounding of each other: ONNX Runtime may pick the other."""
    top2 = np.sort(router_logits, axis=1)[:, -2:]
    return (top2[:, 1] - top2[:, 0]) <= rtol * max(float(np.abs(router_logits).max()), 1e-12)


def export_parts(
    model: RoutedNetwork, example_inputs: torch.Tensor, opset: int = DEFAULT_OPSET
) -> list[tuple[bytes, ExportReport]]:
    """The router and each signature through ``export_onnx`` (fused, simplified, checked against PyTorch): their
    ONNX bytes and reports, router first."""
    model.eval()
    with tempfile.TemporaryDirectory(prefix="edgeshift-routed-") as tmp:
        out = []
        for i, part in enumerate([model.router, *model.signatures]):
            report = export_onnx(part, example_inputs, Path(tmp) / f"part{i}.onnx", opset=opset)
            out.append((Path(report.path).read_bytes(), report))
        return out


def export_routed(
    model: RoutedNetwork,
    example_inputs: torch.Tensor,
    path: str | Path,
    *,
    parts: list[tuple[bytes, ExportReport]] | None = None,
    opset: int = DEFAULT_OPSET,
    rtol: float = DEFAULT_RTOL,
    random_batches: int = 2,
) -> ExportReport:
    """Export ``model`` as one graph (``compose``) to ``path`` and prove it computes what PyTorch does: each part
    through ``export_onnx``'s checks, then the whole on the example, batch 1 and random batches (inputs whose routes
    tie within rounding are left out of the comparison). MACs: the router's plus the signatures' weighted by the
    share of test images routed to each (the mean per input), evenly where no shares are recorded. ``parts``: those
    ``export_parts`` made already."""
    model.eval()
    made = parts if parts is not None else export_parts(model, example_inputs, opset)
    protos = [onnx.load_from_string(data) for data, _ in made]
    reports = [report for _, report in made]
    classes = int(reports[1].output_shape[1])
    proto = compose(protos[0], protos[1:], classes)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as exc:
        raise ExportError(f"the routed graph fails onnx.checker: {str(exc).splitlines()[0][:200]}") from None
    raw = proto.SerializeToString()
    gen = torch.Generator().manual_seed(0)
    batches = [example_inputs, example_inputs[:1]] + [
        torch.randn(example_inputs.shape, generator=gen) for _ in range(random_batches)
    ]
    with torch.no_grad():
        reference = [model(b).numpy() for b in batches]
        router_logits = [model.router(b).numpy() for b in batches]
    got = _ort_outputs(raw, [b.numpy() for b in batches])
    max_diff = max_out = 0.0
    for g, ref, routes in zip(got, reference, router_logits):
        keep = ~_near_tie(routes, rtol)
        max_out = max(max_out, float(np.abs(ref).max()))
        if keep.any():
            max_diff = max(max_diff, float(np.abs(g[keep].astype(np.float64) - ref[keep]).max()))
    if max_diff > rtol * max_out:
        raise NotExactError(
            f"the routed graph on ONNX Runtime differs from PyTorch by {max_diff:.3g} ({max_diff / max_out:.3g} "
            f"relative, limit {rtol:g})"
        )
    k = len(model.signatures)
    shares = model.shares if len(model.shares) == k and sum(model.shares) > 0 else (1.0 / k,) * k
    total = sum(shares)
    one = example_inputs[:1]
    macs = count_macs(model.router, one) + sum(s / total * count_macs(n, one) for s, n in zip(shares, model.signatures))
    write_bytes_atomic(Path(path), raw)
    return ExportReport(
        path=str(path),
        opset=opset,
        simplified=all(r.simplified for r in reports),
        max_abs_diff=max_diff,
        max_abs_output=max_out,
        op_counts=_op_counts(proto.graph),
        params=_params(proto.graph),
        macs=int(round(macs)),
        bytes=len(raw),
        output_shape=list(reference[0].shape),
        warnings=[w for r in reports for w in r.warnings],
    )


def routed_int8(
    parts: list[bytes], calibration: Calibration, profile: DeviceProfile, feed: dict, *, name: str = "model"
) -> Int8Choice:
    """The INT8 form of a routed graph: the router and every signature quantized alone in one scheme (each on all
    the calibration images) and composed as the FP32 parts are; with ``format = "auto"`` the scheme whose composed
    graph is fastest, as ``fastest_int8`` chooses."""
    classes = _classes(onnx.load_from_string(parts[-1]))

    def quantize(scheme: Int8Scheme) -> bytes:
        quantized = [
            onnx.load_from_string(quantize_onnx(p, calibration, scheme, name=f"{name} (part {i})"))
            for i, p in enumerate(parts)
        ]
        return compose(quantized[0], quantized[1:], classes).SerializeToString()

    return fastest_of(schemes_for(profile.quantization, matmul_heavy(parts[-1])), quantize, profile, feed)


def _classes(model: onnx.ModelProto) -> int:
    dims = model.graph.output[0].type.tensor_type.shape.dim
    return int(dims[-1].dim_value)
