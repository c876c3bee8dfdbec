"""Export to ONNX with conv+BN fused, simplified, fully checked and compared with PyTorch in one call."""

from __future__ import annotations

import collections
import contextlib
import io
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F

from edgeshift.core.atomic import write_bytes_atomic
from edgeshift.core.errors import EdgeshiftError, NotExactError
from edgeshift.pruner.fuse import fuse_conv_bn
from edgeshift.pruner.metrics import count_macs

DEFAULT_OPSET = 17
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
DEFAULT_RTOL = 1e-4


class ExportError(EdgeshiftError):
    """A model could not be exported to ONNX."""


@dataclass
class ExportReport:
    """What an export produced, measured: ORT-vs-torch deviation, graph op counts, sizes."""

    path: str
    opset: int
    simplified: bool
    max_abs_diff: float  # ONNX Runtime vs PyTorch, over the example and random inputs
    max_abs_output: float
    op_counts: dict[str, int]
    params: int  # elements in the graph's initializers
    macs: int
    bytes: int
    output_shape: list[int]  # of the example batch
    warnings: list[str] = field(default_factory=list)

    @property
    def rel_diff(self) -> float:
        return self.max_abs_diff / max(self.max_abs_output, 1e-12)

    def to_dict(self) -> dict:
        return {**asdict(self), "rel_diff": self.rel_diff}


def op_counts(model_proto) -> dict[str, int]:
    return dict(sorted(collections.Counter(n.op_type for n in model_proto.graph.node).items()))


def initializer_params(model_proto) -> int:
    return int(sum(int(np.prod(t.dims)) for t in model_proto.graph.initializer))


def _ort_outputs(onnx_bytes: bytes, batches: list[np.ndarray]) -> list[np.ndarray]:

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    sess = ort.InferenceSession(onnx_bytes, opts, providers=["CPUExecutionProvider"])
    return [sess.run(None, {INPUT_NAME: b})[0] for b in batches]


@contextlib.contextmanager
def _exportable_adaptive_pooling():
    """During export, an adaptive average pool whose output size does not divide its input (a VGG head's 7x7 pool
    on a small input) is computed as two matrix products with constant averaging matrices, which ONNX can hold;
    torch's exporter refuses the op itself. Same windows, same averages: exact up to float rounding."""

    original = F.adaptive_avg_pool2d

    def averaging(n_in: int, n_out: int, like: torch.Tensor) -> torch.Tensor:
        a = torch.zeros(n_out, n_in, dtype=like.dtype)
        for i in range(n_out):
            start, end = (i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)  # torch's window bounds
            a[i, start:end] = 1.0 / (end - start)
        return a

    def pool(x, output_size):
        sizes = (output_size, output_size) if not isinstance(output_size, (tuple, list)) else tuple(output_size)
        h, w = int(x.shape[-2]), int(x.shape[-1])  # concrete: the tracer would otherwise record shape arithmetic
        out_h, out_w = (h if sizes[0] is None else int(sizes[0])), (w if sizes[1] is None else int(sizes[1]))
        if h % out_h == 0 and w % out_w == 0:
            return original(x, output_size)
        return torch.einsum("oh,nchw,pw->ncop", averaging(h, out_h, x), x, averaging(w, out_w, x))

    F.adaptive_avg_pool2d = pool
    try:
        yield
    finally:
        F.adaptive_avg_pool2d = original


def _torch_to_onnx_bytes(model, example_inputs, opset: int) -> bytes:

    buf = io.BytesIO()
    with warnings.catch_warnings(), _exportable_adaptive_pooling():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example_inputs,),
            cast(Any, buf),  # a file object works as well as a path; the stubs name paths only
            dynamo=False,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            do_constant_folding=True,
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        )
    return buf.getvalue()


def onnx_bytes(model, example_inputs, opset: int = DEFAULT_OPSET) -> bytes:
    """The model (put in eval mode) as ONNX bytes in memory: not fused, simplified or checked; for quick
    measurements (latency, accuracy) of models built in the same process. ``export_onnx`` is the real export."""

    model.eval()
    with torch.no_grad():
        return _torch_to_onnx_bytes(model, example_inputs, opset)


def export_onnx(
    model,
    example_inputs,
    path: str | os.PathLike,
    *,
    opset: int = DEFAULT_OPSET,
    simplify: bool = True,
    rtol: float = DEFAULT_RTOL,
    random_batches: int = 2,
    macs: int | None = None,
) -> ExportReport:
    """Export ``model`` (eval mode, conv+BN fused) to ``path`` and prove the file computes what torch does.

    The graph is simplified with onnxsim (the unsimplified graph is kept, with a warning, if simplification fails
    or changes the outputs), passes ``onnx.checker`` with ``full_check``, has a dynamic batch dimension, and its
    ONNX Runtime outputs on the example and random inputs (batch 1 and the example's batch) must match torch
    within ``rtol`` of the output scale, else NotExactError. The file is written atomically.
    """

    path = Path(path)
    if not path.parent.is_dir():
        raise EdgeshiftError(f"output directory does not exist: {path.parent}")
    notes: list[str] = []
    fused = fuse_conv_bn(model, example_inputs=example_inputs[:1])  # a copy in eval mode; the caller's is untouched
    gen = torch.Generator().manual_seed(0)
    batches_t = [example_inputs, example_inputs[:1]] + [
        torch.randn(example_inputs.shape, generator=gen) for _ in range(random_batches)
    ]
    was_training = model.training
    try:
        with torch.no_grad():
            expected = [fused(b).numpy() for b in batches_t]
            reference = [model.eval()(b).numpy() for b in batches_t]
    finally:
        model.train(was_training)
    batches = [b.numpy() for b in batches_t]
    try:
        raw = _torch_to_onnx_bytes(fused, example_inputs, opset)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ExportError(f"model {type(model).__name__} failed to export to ONNX: {first[:200]}") from None
    proto = onnx.load_from_string(raw)
    graph_inputs = [i.name for i in proto.graph.input if i.name not in {t.name for t in proto.graph.initializer}]
    if graph_inputs != [INPUT_NAME] or [o.name for o in proto.graph.output] != [OUTPUT_NAME]:
        raise ExportError(
            f"model {type(model).__name__} failed to export to ONNX: the graph has inputs "
            f"{graph_inputs} and outputs {[o.name for o in proto.graph.output]}, expected one input "
            "that the output depends on (does the forward leave torch, e.g. through numpy?)"
        )
    simplified = False
    if simplify:
        try:
            import onnxsim  # here: where no onnxsim wheel installs, export goes on unsimplified (the fallback below)

            candidate, ok = onnxsim.simplify(proto)
            if not ok:
                raise RuntimeError("onnxsim could not validate the simplified model")
            cand_bytes = candidate.SerializeToString()
            got = _ort_outputs(cand_bytes, batches)
            base = _ort_outputs(raw, batches)
            scale = max(float(np.abs(e).max()) for e in expected)
            if max(float(np.abs(g - b).max()) for g, b in zip(got, base)) > rtol * scale:
                raise RuntimeError("simplified graph changes the outputs")
            proto, raw, simplified = candidate, cand_bytes, True
        except Exception as exc:  # fall back to the unsimplified graph, loudly
            msg = f"onnxsim simplification skipped: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
            warnings.warn(msg)
            notes.append(msg)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as exc:
        raise ExportError(f"exported graph fails onnx.checker: {str(exc).splitlines()[0][:200]}") from None
    got = _ort_outputs(raw, batches)
    max_diff = max(float(np.abs(g.astype(np.float64) - r).max()) for g, r in zip(got, reference))
    max_out = max(float(np.abs(r).max()) for r in reference)
    if max_diff > rtol * max_out:
        raise NotExactError(
            f"ONNX Runtime output differs from PyTorch by {max_diff:.3g} "
            f"({max_diff / max_out:.3g} relative, limit {rtol:g})"
        )
    write_bytes_atomic(path, raw)
    return ExportReport(
        path=str(path),
        opset=opset,
        simplified=simplified,
        max_abs_diff=max_diff,
        max_abs_output=max_out,
        op_counts=op_counts(proto),
        params=initializer_params(proto),
        macs=int(macs if macs is not None else count_macs(fused, example_inputs)),
        bytes=len(raw),
        output_shape=list(reference[0].shape),
        warnings=notes,
    )
