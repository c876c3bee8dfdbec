"""Variant profiling: what each exported variant costs and delivers, measured through ONNX Runtime.

The one way the build side times a model: a session from ``edgeshift.runtime.session.create_session`` under a
device profile, warm-up excluded, percentiles from ``time_calls``, or, where variants are compared (the portfolio's
latencies, INT8 against FP32, the ladder), from one interleaved run in a process of its own on one thread pool
(``edgeshift.runtime.timing_process``). ``OrtMeasurer`` offers it to the pruner
(``edgeshift.pruner.measure.ModelMeasurer``), which measures with it but never imports it.
"""

from __future__ import annotations

import dataclasses
import os
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from edgeshift.device_profiles import DeviceProfile, cpu_profile, load_profile
from edgeshift.device_profiles.profile import BenchmarkSettings
from edgeshift.runtime.measure import LatencyStats, time_calls
from edgeshift.runtime.session import create_session
from edgeshift.runtime.timing_process import Graph, TimingSettings, time_graphs

from .onnx_export import INPUT_NAME, onnx_bytes

DEFLATE_LEVEL = 9


@dataclass
class TestData:
    """A labelled test set, already preprocessed: x float32 NCHW, y int labels."""

    __test__ = False  # not a pytest class
    x: np.ndarray
    y: np.ndarray
    name: str = "test"


def deflated_size(data: bytes) -> int:
    """Bytes after raw DEFLATE at the portfolio's level (what the ZIP member costs)."""
    c = zlib.compressobj(DEFLATE_LEVEL, zlib.DEFLATED, -15)
    return len(c.compress(data) + c.flush())


def onnx_logits(session, x: np.ndarray, batch: int = 256) -> np.ndarray:
    """The outputs of an ORT session on ``x``, in batches."""
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x[i : i + batch]})[0] for i in range(0, len(x), batch)])


def accuracy_from_logits(logits: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Top-1 and top-5 accuracy of ``logits`` against labels ``y``."""
    k = min(5, logits.shape[1])
    best = np.argpartition(-logits, kth=k - 1, axis=1)[:, :k]
    return float((logits.argmax(1) == y).mean()), float((best == y[:, None]).any(1).mean())


def onnx_accuracy(session, data: TestData, batch: int = 256) -> tuple[float, float]:
    """Top-1 and top-5 accuracy of an ORT session on ``data``."""
    return accuracy_from_logits(onnx_logits(session, data.x, batch), data.y)


def timing_profile(
    profile: DeviceProfile | str, *, threads: int | None = None, iterations: int | None = None
) -> DeviceProfile:
    """``profile`` (a name, a path or a profile) with its intra-op threads and timed calls overridden where given."""

    p = load_profile(profile) if isinstance(profile, str) else profile
    if threads is not None:
        p = dataclasses.replace(p, execution=dataclasses.replace(p.execution, intra_op_threads=threads))
    if iterations is not None:
        p = dataclasses.replace(p, benchmark=dataclasses.replace(p.benchmark, iterations=iterations))
    return p


def profile_threads(profile: DeviceProfile) -> int:
    """The intra-op threads a profile runs with (0, ORT's choice, counts as the machine's cores)."""

    t = profile.execution.intra_op_threads
    return int(t) if isinstance(t, int) and t > 0 else os.cpu_count() or 1


def time_interleaved_models(
    models: dict[str, bytes], feed: dict, profile: DeviceProfile, *, batch: int
) -> dict[str, LatencyStats]:
    """Every ONNX model timed against the others on ``feed`` in one interleaved run with the profile's warm-up,
    iterations, rounds and time cap, in a process of its own whose sessions share one thread pool
    (``edgeshift.runtime.timing_process``)."""
    return time_graphs(
        {name: Graph(raw, feed) for name, raw in models.items()}, profile, TimingSettings.of_profile(profile, batch)
    )


def time_session(session, feed: dict, profile: DeviceProfile, *, batch: int) -> LatencyStats:
    """Latency percentiles of ``session.run(None, feed)`` with the profile's warm-up, iterations and time cap."""
    b = profile.benchmark
    return time_calls(
        lambda: session.run(None, feed),
        warmup=b.warmup,
        iterations=b.iterations,
        max_seconds=b.max_seconds,
        batch=batch,
    )


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

        raw = onnx_bytes(model.eval(), example_inputs)
        return create_session(raw, self.profile), len(raw)

    def latency(self, model, example_inputs) -> tuple[dict, int]:

        session, size = self._session(model, example_inputs)
        feed = {INPUT_NAME: example_inputs.detach().numpy().astype(np.float32)}
        return time_session(session, feed, self.profile, batch=int(example_inputs.shape[0])).to_dict(), size

    def latencies(self, models: dict, example_inputs) -> dict[str, dict]:

        raws = {name: onnx_bytes(m.eval(), example_inputs) for name, m in models.items()}
        feed = {INPUT_NAME: example_inputs.detach().numpy().astype(np.float32)}
        stats = time_interleaved_models(raws, feed, self.profile, batch=int(example_inputs.shape[0]))
        return {name: s.to_dict() for name, s in stats.items()}

    def top1(self, model, x: np.ndarray, y: np.ndarray) -> float:

        session, _ = self._session(model, torch.from_numpy(x[:1]))
        return onnx_accuracy(session, TestData(x, y))[0]


def cpu_measurer(threads: int = 1, iterations: int = 50, *, warmup: int = 5, max_seconds: float = 3.0) -> OrtMeasurer:
    """An ``OrtMeasurer`` on the CPU provider with ``threads`` intra-op threads and a short timing budget."""

    profile = dataclasses.replace(cpu_profile(threads), benchmark=BenchmarkSettings(warmup, iterations, max_seconds))
    return OrtMeasurer(profile)
