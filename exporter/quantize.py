"""INT8 variants through ``onnxruntime.quantization``: its pre-processing, then static quantization with
per-channel int8 weights, calibrated on the user's training images, or dynamic quantization of the weight
MatMuls (activations quantized per call: what ONNX Runtime recommends for transformers). Build side only (onnx,
onnxruntime, numpy).

INT8 is not exact: each INT8 variant is checked (ONNX checker, an ORT session, the test images run) and reported
against its FP32 source (top-1 agreement, largest logit deviation), never assumed faster: ``build_portfolio``
times it against its source under the device profile and drops it when it is not.

Which format is fast depends on the device (QOperator with uint8 activations is ONNX Runtime's fast path on x86
with VNNI; QDQ with int8 activations is its guidance for ARM and TensorRT; dynamic for MatMul-heavy transformers),
so the device profile's ``[quantization]`` table chooses, and ``format = "auto"`` builds the candidates (dynamic
among them where the model has MatMuls with weights) and keeps the one measured faster.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from edgeshift.core.errors import EdgeshiftError
from edgeshift.device_profiles.profile import DeviceProfile, QuantizationSettings
from edgeshift.runtime.session import create_session

from .profile import time_interleaved_models

__all__ = [
    "CALIBRATION_METHODS",
    "Calibration",
    "Int8Choice",
    "Int8Scheme",
    "QuantizationError",
    "agreement",
    "fastest_int8",
    "matmul_heavy",
    "quantize_onnx",
    "schemes_for",
]

CalibrationMethodName = Literal["minmax", "entropy", "percentile"]
CALIBRATION_METHODS: tuple[str, ...] = ("minmax", "entropy", "percentile")


class QuantizationError(EdgeshiftError):
    """ONNX Runtime could not quantize a variant, or its INT8 model fails the export checks."""


@dataclass(frozen=True)
class Calibration:
    """Calibration images (preprocessed like the test data, float32 NCHW) and how ranges are taken from them."""

    x: np.ndarray
    method: CalibrationMethodName = "minmax"
    dataset: str = ""

    def __post_init__(self) -> None:
        if self.method not in CALIBRATION_METHODS:
            raise EdgeshiftError(
                f"unknown calibration method {self.method!r}; choose one of {', '.join(CALIBRATION_METHODS)}"
            )
        if len(self.x) == 0:
            raise EdgeshiftError("no calibration images: INT8 needs training images (pass --data)")


@dataclass(frozen=True)
class Int8Scheme:
    """One way to quantize: model format, activation type, and the weight options."""

    format: Literal["qoperator", "qdq", "dynamic"]
    activations: Literal["uint8", "int8"]
    per_channel: bool = True
    reduce_range: bool = False

    @property
    def label(self) -> str:
        return f"{self.format}/{self.activations}"


def schemes_for(settings: QuantizationSettings, transformer: bool = False) -> list[Int8Scheme]:
    """The profile's scheme, or for ``format = "auto"`` the candidates to time against each other (dynamic too for a
    ``transformer``: a MatMul-heavy model, see ``matmul_heavy``)."""
    reduce_range = settings.reduce_range
    if isinstance(reduce_range, str):  # "auto": loading the profile resolves it for the machine that builds
        raise ValueError("reduce_range is still 'auto': quantize with a profile from load_profile")
    if settings.format == "auto":
        return [
            Int8Scheme("qoperator", "uint8", settings.per_channel, reduce_range),
            Int8Scheme("qdq", "int8", settings.per_channel, reduce_range),
        ] + ([Int8Scheme("dynamic", "uint8", settings.per_channel, reduce_range)] if transformer else [])
    if settings.format == "dynamic":  # activations are quantized per call to uint8: ORT's dynamic kernels
        return [Int8Scheme("dynamic", "uint8", settings.per_channel, reduce_range)]
    return [Int8Scheme(settings.format, settings.activations, settings.per_channel, reduce_range)]


class _Reader:
    """``onnxruntime.quantization.CalibrationDataReader`` over an array, a few images per call."""

    def __init__(self, input_name: str, x: np.ndarray, batch: int = 8) -> None:
        self._batches = iter([{input_name: x[i : i + batch]} for i in range(0, len(x), batch)])

    def get_next(self):
        return next(self._batches, None)

    def rewind(self) -> None:  # not needed by static calibration, part of the interface
        pass


def _quantize_static(
    pre: str, out: str, input_name: str, calibration: Calibration, scheme: Int8Scheme, methods: dict
) -> None:
    quantize_static(
        pre,
        out,
        _Reader(input_name, calibration.x.astype(np.float32)),
        quant_format=QuantFormat.QOperator if scheme.format == "qoperator" else QuantFormat.QDQ,
        activation_type=QuantType.QUInt8 if scheme.activations == "uint8" else QuantType.QInt8,
        weight_type=QuantType.QInt8,
        per_channel=scheme.per_channel,
        reduce_range=scheme.reduce_range,
        calibrate_method=methods[calibration.method],
        calibration_providers=["CPUExecutionProvider"],
    )


def _weight_products(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """MatMul and Gemm nodes whose second operand is a weight (an initializer)."""
    weights = {t.name for t in graph.initializer}
    return [n for n in graph.node if n.op_type in ("MatMul", "Gemm") and len(n.input) > 1 and n.input[1] in weights]


def matmul_heavy(fp32: bytes) -> bool:
    """Whether the model is MatMul-heavy, as a transformer is: more products with weights than convolutions."""
    graph = onnx.load_model_from_string(fp32).graph
    return len(_weight_products(graph)) > sum(n.op_type == "Conv" for n in graph.node)


def _gemms_as_matmuls(path: Path) -> None:
    """Rewrite, in place, each ``Gemm(A, W, b)`` with a weight W (alpha = beta = 1) as ``MatMul(A, W') + b``: ORT's
    dynamic quantizer turns MatMuls into integer MatMuls and leaves Gemms in float, and onnxsim makes Gemms of
    some of a transformer's linears."""
    model = onnx.load_model(str(path))
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    weighted = {p.output[0] for p in _weight_products(graph)}
    nodes = []
    for n in graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        if (
            n.output[0] not in weighted
            or n.op_type != "Gemm"
            or attrs.get("transA", 0)
            or attrs.get("alpha", 1.0) != 1.0
            or attrs.get("beta", 1.0) != 1.0
        ):
            nodes.append(n)
            continue
        w = onnx.numpy_helper.to_array(inits[n.input[1]])
        name = f"{n.input[1]}__matmul" + ("_t" if attrs.get("transB", 0) else "")
        if name not in inits:  # a weight two Gemms share is laid out once
            inits[name] = onnx.numpy_helper.from_array(np.ascontiguousarray(w.T if attrs.get("transB", 0) else w), name)
            graph.initializer.append(inits[name])
        product = n.output[0] + "__product" if len(n.input) > 2 else n.output[0]
        nodes.append(onnx.helper.make_node("MatMul", [n.input[0], name], [product], name=f"{n.output[0]}__matmul"))
        if len(n.input) > 2:
            nodes.append(
                onnx.helper.make_node("Add", [product, n.input[2]], [n.output[0]], name=f"{n.output[0]}__bias")
            )
    del graph.node[:]
    graph.node.extend(nodes)
    used = {i for n in graph.node for i in n.input}
    kept = [t for t in graph.initializer if t.name in used]  # the Gemms' own weights, now read by nobody, go
    del graph.initializer[:]
    graph.initializer.extend(kept)
    onnx.save_model(model, str(path))


def quantize_onnx(fp32: bytes, calibration: Calibration, scheme: Int8Scheme, *, name: str = "model") -> bytes:
    """The INT8 model of ``fp32`` (ONNX bytes), checked by the ONNX checker and loadable by ONNX Runtime; raise
    QuantizationError naming ``name`` and the scheme when ONNX Runtime cannot quantize it."""

    methods = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }
    quiet = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # the quantizer warns on every run about things it handles
    try:
        with tempfile.TemporaryDirectory(prefix="edgeshift-int8-") as tmp:
            src, pre, out = Path(tmp) / "fp32.onnx", Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
            src.write_bytes(fp32)
            input_name = onnx.load_model(str(src), load_external_data=False).graph.input[0].name
            # Symbolic shape inference is for dynamic transformer shapes; a CNN's come from ONNX's own inference,
            # and on failure ORT's symbolic pass leaves a file in the working directory.
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
            if scheme.format == "dynamic":
                _gemms_as_matmuls(pre)
                quantize_dynamic(
                    str(pre),
                    str(out),
                    weight_type=QuantType.QInt8,
                    per_channel=scheme.per_channel,
                    reduce_range=scheme.reduce_range,
                    op_types_to_quantize=["MatMul"],  # ConvInteger is slower than float convs on ORT's CPU
                )
            else:
                _quantize_static(str(pre), str(out), input_name, calibration, scheme, methods)
            data = out.read_bytes()
            onnx.checker.check_model(onnx.load_model_from_string(data), full_check=True)
            ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    except EdgeshiftError:
        raise
    except Exception as exc:  # the quantizer's failures have no common type; say which model and why
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise QuantizationError(
            f"ONNX Runtime cannot quantize {name} as {scheme.label}: {type(exc).__name__}: {reason}"
        ) from None
    finally:
        logging.getLogger().setLevel(quiet)
    return data


@dataclass
class Int8Choice:
    """The INT8 form kept for one FP32 model, and what chose it."""

    scheme: Int8Scheme
    data: bytes  # the INT8 ONNX model
    session: object  # an ONNX Runtime session of ``data`` under the profile
    candidates_p50_ms: dict[str, float] | None  # p50 of every format timed (``format = "auto"``), else None


def fastest_int8(
    fp32: bytes, calibration: Calibration, profile: DeviceProfile, feed: dict, *, name: str = "model"
) -> Int8Choice:
    """The INT8 form of ``fp32`` in the profile's format; with ``format = "auto"`` every candidate format is built
    and timed against the others (interleaved, under the profile, batch 1) and the one with the lowest p50 kept.
    The portfolio and the benchmarks choose through this one function, so they choose alike."""

    return fastest_of(
        schemes_for(profile.quantization, matmul_heavy(fp32)),
        lambda scheme: quantize_onnx(fp32, calibration, scheme, name=name),
        profile,
        feed,
    )


def fastest_of(
    schemes: list[Int8Scheme], quantize: Callable[[Int8Scheme], bytes], profile: DeviceProfile, feed: dict
) -> Int8Choice:
    """``quantize`` in each of ``schemes``; the one alone, or the one of lowest p50 timed against the others."""
    built = {s.label: (s, quantize(s)) for s in schemes}
    chosen, timed = next(iter(built)), None
    if len(built) > 1:
        stats = time_interleaved_models({label: data for label, (_, data) in built.items()}, feed, profile, batch=1)
        timed = {label: round(st.p50_ms, 4) for label, st in stats.items()}
        chosen = min(stats, key=lambda label: stats[label].p50_ms)
    scheme, data = built[chosen]
    return Int8Choice(scheme, data, create_session(data, profile), timed)


def agreement(reference_logits: np.ndarray, logits: np.ndarray) -> tuple[float, float]:
    """(share of rows whose top-1 matches the reference's, largest absolute logit deviation)."""
    same = float(np.mean(reference_logits.argmax(1) == logits.argmax(1))) if len(logits) else 1.0
    deviation = float(np.abs(reference_logits - logits).max()) if len(logits) else 0.0
    return same, deviation
