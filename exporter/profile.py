"""Variant profiling: what each exported variant costs and delivers, measured through ONNX Runtime.

The one way the build side times a model: a session from ``edgeshift.runtime.session.create_session`` under a
device profile, warm-up excluded, percentiles from ``time_calls``. ``OrtMeasurer`` offers it to the pruner
(``edgeshift.pruner.measure.ModelMeasurer``), which measures with it but never imports it.
"""
from __future__ import annotations

import zlib
from dataclasses import asdict, dataclass

import numpy as np

from edgeshift.device_profiles import DeviceProfile, cpu_profile, load_profile
from edgeshift.runtime.measure import LatencyStats, machine_label, time_calls
from edgeshift.runtime.memprobe import measure_session_memory
from edgeshift.runtime.session import create_session

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
    session = create_session(onnx_bytes, cpu_profile(threads))
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


def time_session(session, feed: dict, profile: DeviceProfile, *, batch: int) -> LatencyStats:
    """Latency percentiles of ``session.run(None, feed)`` with the profile's warm-up, iterations and time cap."""
    b = profile.benchmark
    return time_calls(lambda: session.run(None, feed), warmup=b.warmup, iterations=b.iterations,
                      max_seconds=b.max_seconds, batch=batch)


class OrtMeasurer:
    """Measures torch models through ONNX Runtime under a device profile (the pruner's ``ModelMeasurer``).

    The model is exported in memory as it is (eval mode; ONNX Runtime fuses conv+BN itself; not simplified,
    nothing written): a quick, like-for-like profile for comparing variants built in one process.
    """

    def __init__(self, profile: DeviceProfile | str = "host") -> None:
        self.profile = load_profile(profile) if isinstance(profile, str) else profile

    @property
    def profile_name(self) -> str:
        return self.profile.name

    @property
    def batch_size(self) -> int:
        return self.profile.serving.batch_size

    def _session(self, model, example_inputs):
        from .onnx_export import onnx_bytes

        raw = onnx_bytes(model.eval(), example_inputs)
        return create_session(raw, self.profile), len(raw)

    def latency(self, model, example_inputs) -> tuple[dict, int]:
        from .onnx_export import INPUT_NAME

        session, size = self._session(model, example_inputs)
        feed = {INPUT_NAME: example_inputs.detach().numpy().astype(np.float32)}
        return time_session(session, feed, self.profile, batch=int(example_inputs.shape[0])).to_dict(), size

    def top1(self, model, x: np.ndarray, y: np.ndarray) -> float:
        import torch

        session, _ = self._session(model, torch.from_numpy(x[:1]))
        return onnx_accuracy(session, TestData(x, y))[0]


def cpu_measurer(threads: int = 1, iterations: int = 50, *, warmup: int = 5, max_seconds: float = 3.0) -> OrtMeasurer:
    """An ``OrtMeasurer`` on the CPU provider with ``threads`` intra-op threads and a short timing budget."""
    import dataclasses

    from edgeshift.device_profiles.profile import BenchmarkSettings

    profile = dataclasses.replace(cpu_profile(threads), benchmark=BenchmarkSettings(warmup, iterations, max_seconds))
    return OrtMeasurer(profile)
