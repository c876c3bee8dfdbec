"""Variant profiling: what each exported variant costs and delivers, measured through ONNX Runtime."""
from __future__ import annotations

import zlib
from dataclasses import asdict, dataclass

import numpy as np

from edgeshift.runtime.measure import LatencyStats, cpu_session, machine_label, time_calls
from edgeshift.runtime.memprobe import measure_session_memory

DEFLATE_LEVEL = 9


@dataclass
class TestData:
    """A labelled test set, already preprocessed: x float32 NCHW, y int labels."""

    __test__ = False  # not a pytest class
    x: np.ndarray
    y: np.ndarray
    name: str = "test"


@dataclass
class VariantProfile:
    onnx_bytes: int
    deflated_bytes: int
    params: int
    macs: int
    top1: float | None
    top5: float | None
    samples: int
    latency: LatencyStats
    threads: int
    machine: str
    peak_memory_bytes: int | None  # RSS growth of a fresh process while creating and running the session

    def to_dict(self) -> dict:
        d = asdict(self)
        d["latency"] = self.latency.to_dict()
        return d


def deflated_size(data: bytes) -> int:
    """Bytes after raw DEFLATE at the portfolio's level (what the ZIP member costs)."""
    c = zlib.compressobj(DEFLATE_LEVEL, zlib.DEFLATED, -15)
    return len(c.compress(data) + c.flush())


def onnx_accuracy(session, data: TestData, batch: int = 256) -> tuple[float, float]:
    """Top-1 and top-5 accuracy of an ORT session on ``data``."""
    name = session.get_inputs()[0].name
    top1 = top5 = 0
    for i in range(0, len(data.y), batch):
        logits = session.run(None, {name: data.x[i:i + batch]})[0]
        y = data.y[i:i + batch]
        k = min(5, logits.shape[1])
        best = np.argpartition(-logits, kth=k - 1, axis=1)[:, :k]
        top1 += int((logits.argmax(1) == y).sum())
        top5 += int((best == y[:, None]).any(1).sum())
    return top1 / len(data.y), top5 / len(data.y)


def profile_variant(onnx_bytes: bytes, *, params: int, macs: int, test_data: TestData | None = None,
                    input_shape: tuple[int, ...], threads: int = 1, warmup: int = 10, iterations: int = 100,
                    max_seconds: float = 10.0, memory_path: str | None = None) -> VariantProfile:
    """Accuracy (through ORT), batch-1 latency percentiles and throughput, sizes and session memory."""
    session = cpu_session(onnx_bytes, threads)
    top1 = top5 = None
    if test_data is not None and len(test_data.y):
        top1, top5 = onnx_accuracy(session, test_data)
    name = session.get_inputs()[0].name
    x = np.random.default_rng(0).standard_normal((1, *input_shape[1:])).astype(np.float32)
    latency = time_calls(lambda: session.run(None, {name: x}), warmup=warmup, iterations=iterations,
                         max_seconds=max_seconds, batch=1)
    peak = measure_session_memory(memory_path, threads)["peak_growth"] if memory_path else None
    return VariantProfile(
        onnx_bytes=len(onnx_bytes), deflated_bytes=deflated_size(onnx_bytes), params=params, macs=macs,
        top1=top1, top5=top5, samples=0 if test_data is None else int(len(test_data.y)), latency=latency,
        threads=threads, machine=machine_label(), peak_memory_bytes=peak,
    )


def torch_model_latency(model, example_inputs, *, threads: int = 1, warmup: int = 5, iterations: int = 50,
                        max_seconds: float = 5.0) -> tuple[LatencyStats, int]:
    """(latency percentiles, ONNX bytes) of a torch model run through ONNX Runtime on the CPU.

    The model is exported in memory as it is (eval mode; ONNX Runtime fuses conv+BN itself; not simplified,
    nothing written): a quick profile for comparing variants built in one process, e.g. a model pruned at
    initialisation against its dense self.
    """
    from .onnx_export import INPUT_NAME, onnx_bytes

    raw = onnx_bytes(model, example_inputs)
    session = cpu_session(raw, threads)
    feed = {INPUT_NAME: example_inputs.detach().numpy().astype(np.float32)}
    stats = time_calls(lambda: session.run(None, feed), warmup=warmup, iterations=iterations,
                       max_seconds=max_seconds, batch=int(example_inputs.shape[0]))
    return stats, len(raw)
