"""Tiny ONNX classifiers and portfolios built directly with onnx.helper: fast, deterministic, no torch."""

from __future__ import annotations

import hashlib
import io
import json
import zipfile

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgeshift.runtime.manifest import SCHEMA_VERSION, variant_file

SIZE = 8
CLASSES = 4


def tiny_classifier(width: int, seed: int = 0, *, depth: int = 1, hidden: int = 0, payload: bytes = b"") -> bytes:
    """input [N,3,8,8] -> Conv 3x3 (width) -> Relu [-> (Conv 3x3 -> Relu) x (depth-1)] -> GlobalAveragePool ->
    Flatten [-> Gemm (hidden) -> Relu] -> Gemm -> logits [N,4]. ``depth`` makes a model slower for its bytes (one
    operator each), ``hidden`` larger for its speed; ``payload``, an unused uint8 initializer, larger alone."""
    rng = np.random.default_rng(seed + width)
    inits = [
        numpy_helper.from_array(rng.standard_normal((width, 3, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.standard_normal(width).astype(np.float32), "b"),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r0"]),
    ]
    for i in range(1, depth):
        inits += [
            numpy_helper.from_array(0.2 * rng.standard_normal((width, width, 3, 3)).astype(np.float32), f"w{i}"),
            numpy_helper.from_array(rng.standard_normal(width).astype(np.float32), f"b{i}"),
        ]
        nodes += [
            helper.make_node("Conv", [f"r{i - 1}", f"w{i}", f"b{i}"], [f"c{i}"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", [f"c{i}"], [f"r{i}"]),
        ]
    nodes += [
        helper.make_node("GlobalAveragePool", [f"r{depth - 1}"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
    ]
    features = "f"
    if hidden:
        inits += [
            numpy_helper.from_array(rng.standard_normal((hidden, width)).astype(np.float32), "hw"),
            numpy_helper.from_array(rng.standard_normal(hidden).astype(np.float32), "hb"),
        ]
        nodes += [helper.make_node("Gemm", ["f", "hw", "hb"], ["h"], transB=1), helper.make_node("Relu", ["h"], ["hr"])]
        features, width = "hr", hidden
    inits += [
        numpy_helper.from_array(rng.standard_normal((CLASSES, width)).astype(np.float32), "fw"),
        numpy_helper.from_array(rng.standard_normal(CLASSES).astype(np.float32), "fb"),
    ]
    nodes.append(helper.make_node("Gemm", [features, "fw", "fb"], ["logits"], transB=1))
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", CLASSES])],
        inits,
    )
    if payload:
        graph.initializer.append(helper.make_tensor("payload", TensorProto.UINT8, [len(payload)], payload, raw=True))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def manifest_for(blobs: dict[str, bytes], top1: dict[str, float] | None = None, reference: str | None = None) -> dict:
    """A manifest without a ladder (as version 1 wrote them) whose recorded latency and accuracy (unless ``top1``
    says otherwise) grow with the size: the ladder the runtime builds from it is every variant, smallest first."""
    variants = []
    rank = {name: i for i, name in enumerate(sorted(blobs, key=lambda n: len(blobs[n])))}
    for name, data in blobs.items():
        p50 = 0.1 * 2 ** rank[name]
        variants.append(
            {
                "name": name,
                "file": variant_file(name),
                "sha256": hashlib.sha256(data).hexdigest(),
                "bytes": len(data),
                "params": len(data) // 4,
                "macs": len(data),
                "compression": 1.0,
                "recipe": "test",
                "reference": False,
                "accuracy": {
                    "top1": (top1 or {}).get(name, 0.5 + 0.1 * rank[name]),
                    "top5": 1.0,
                    "samples": 10,
                    "dataset": "t",
                },
                "latency": {
                    "p50_ms": p50,
                    "p95_ms": 2 * p50,
                    "p99_ms": 3 * p50,
                    "throughput": 1.0,
                    "batch": 1,
                    "calls": 10,
                    "threads": 1,
                    "machine": "test",
                },
                "peak_memory_bytes": 4 * len(data),
                "exactness": None,
            }
        )
    variants.sort(key=lambda v: int(str(v["bytes"])))
    next(v for v in variants if v["name"] == reference or reference is None and v is variants[-1])["reference"] = True
    return {
        "schema_version": SCHEMA_VERSION,
        "producer": "tests",
        "created": "2026-11-21T00:00:00+00:00",
        "architecture": "tiny",
        "input": {"name": "input", "shape": [None, 3, SIZE, SIZE], "dtype": "float32", "layout": "NCHW"},
        "output": {"name": "logits", "shape": [None, CLASSES]},
        "preprocessing": {
            "mean": [0.5, 0.5, 0.5],
            "std": [0.25, 0.25, 0.25],
            "layout": "NCHW",
            "scale": 1 / 255,
            "size": [SIZE, SIZE],
        },
        "labels": ["a", "b", "c", "d"],
        "variants": variants,
        "dropped": [],
    }


def tiny_blobs(widths=(4, 8, 16, 32)) -> dict[str, bytes]:
    return {f"w{w}": tiny_classifier(w) for w in widths}


def write_zip(path, manifest: dict | bytes, members: dict[str, bytes], method=zipfile.ZIP_DEFLATED) -> None:
    """Write a ZIP as given, valid or not (for testing what the reader refuses)."""
    with zipfile.ZipFile(path, "w", compression=method) as z:
        z.writestr("manifest.json", manifest if isinstance(manifest, bytes) else json.dumps(manifest))
        for name, data in members.items():
            z.writestr(name, data)


def tiny_portfolio(path, widths=(4, 8, 16, 32), top1=None) -> dict[str, bytes]:
    blobs = tiny_blobs(widths)
    write_zip(path, manifest_for(blobs, top1), {variant_file(n): d for n, d in blobs.items()})
    return blobs


def reference_outputs(blobs: dict[str, bytes], x: np.ndarray) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    return {
        n: ort.InferenceSession(d, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
        for n, d in blobs.items()
    }


def zip_bytes(manifest, members) -> bytes:
    buf = io.BytesIO()
    write_zip(buf, manifest, members)
    return buf.getvalue()


# name -> (model, top-1): bytes and speed disagree. "small_slow" is half the bytes of "dense" (the reference, most
# accurate) and ~4x slower (400 operators against 60), "big_fast" the largest file and ~4x faster than dense.
SPEED_VARIANTS = {
    "dense": (dict(width=16, depth=30), 0.90),
    "small_slow": (dict(width=4, depth=200), 0.85),
    "big_fast": (dict(width=16, hidden=8000), 0.80),
}


def speed_portfolio(path) -> dict[str, bytes]:
    """A portfolio whose larger variant is faster than its smaller ones (see ``SPEED_VARIANTS``)."""
    blobs = {
        n: tiny_classifier(cfg["width"], depth=cfg.get("depth", 1), hidden=cfg.get("hidden", 0))
        for n, (cfg, _) in SPEED_VARIANTS.items()
    }
    top1 = {n: acc for n, (_, acc) in SPEED_VARIANTS.items()}
    write_zip(path, manifest_for(blobs, top1, reference="dense"), {variant_file(n): d for n, d in blobs.items()})
    return blobs
