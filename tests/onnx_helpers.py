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


def tiny_classifier(width: int, seed: int = 0) -> bytes:
    """input [N,3,8,8] -> Conv 3x3 (width) -> Relu -> GlobalAveragePool -> Flatten -> Gemm -> logits [N,4]."""
    rng = np.random.default_rng(seed + width)
    w = numpy_helper.from_array(rng.standard_normal((width, 3, 3, 3)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal(width).astype(np.float32), "b")
    fw = numpy_helper.from_array(rng.standard_normal((CLASSES, width)).astype(np.float32), "fw")
    fb = numpy_helper.from_array(rng.standard_normal(CLASSES).astype(np.float32), "fb")
    nodes = [helper.make_node("Conv", ["input", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "fw", "fb"], ["logits"], transB=1)]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                            ["N", 3, SIZE, SIZE])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", CLASSES])],
                              [w, b, fw, fb])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def manifest_for(blobs: dict[str, bytes], top1: dict[str, float] | None = None) -> dict:
    variants = []
    for name, data in blobs.items():
        variants.append({
            "name": name, "file": variant_file(name), "sha256": hashlib.sha256(data).hexdigest(),
            "bytes": len(data), "params": len(data) // 4, "macs": len(data), "compression": 1.0,
            "recipe": "test", "reference": False,
            "accuracy": {"top1": (top1 or {}).get(name, 0.5), "top5": 1.0, "samples": 10, "dataset": "t"},
            "latency": {"p50_ms": 0.1, "p95_ms": 0.2, "p99_ms": 0.3, "throughput": 1.0, "batch": 1,
                        "calls": 10, "threads": 1, "machine": "test"},
            "peak_memory_bytes": 4 * len(data), "exactness": None,
        })
    variants.sort(key=lambda v: v["bytes"])
    variants[-1]["reference"] = True
    return {"schema_version": SCHEMA_VERSION, "producer": "tests", "created": "2026-11-21T00:00:00+00:00",
            "architecture": "tiny",
            "input": {"name": "input", "shape": [None, 3, SIZE, SIZE], "dtype": "float32", "layout": "NCHW"},
            "output": {"name": "logits", "shape": [None, CLASSES]},
            "preprocessing": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "layout": "NCHW",
                              "scale": 1 / 255, "size": [SIZE, SIZE]},
            "labels": ["a", "b", "c", "d"], "variants": variants, "dropped": []}


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

    return {n: ort.InferenceSession(d, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
            for n, d in blobs.items()}


def zip_bytes(manifest, members) -> bytes:
    buf = io.BytesIO()
    write_zip(buf, manifest, members)
    return buf.getvalue()
