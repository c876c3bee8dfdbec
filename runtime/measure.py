"""Timing shared by the build-time profiler and the device benchmark: percentiles with warm-up excluded, and
what a figure was measured on. Torch-free."""

from __future__ import annotations

import os
import platform
import time
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import numpy as np


@dataclass
class LatencyStats:
    """Per-call latency percentiles (warm-up excluded) and the throughput they imply."""

    p50_ms: float
    p95_ms: float
    p99_ms: float
    throughput: float  # items per second over the timed calls
    batch: int
    calls: int
    round_p50_ms: tuple[float, ...] = ()  # interleaved timing: the median of each round, in round order
    thread_pool: str = ""  # interleaved timing: "shared" (one pool, a process of its own) or "per-session"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, doc: dict) -> LatencyStats:
        """The inverse of ``to_dict`` (a JSON round trip turns the rounds' tuple into a list)."""
        return cls(**{**doc, "round_p50_ms": tuple(doc.get("round_p50_ms", ()))})


def percentile_stats(seconds: Sequence[float], batch: int) -> LatencyStats:
    s = np.asarray(seconds, dtype=np.float64)
    p50, p95, p99 = np.percentile(s, [50, 95, 99]) * 1e3
    return LatencyStats(float(p50), float(p95), float(p99), float(batch * len(s) / s.sum()), batch, len(s))


def time_calls(
    fn: Callable[[], object],
    *,
    warmup: int = 10,
    iterations: int = 100,
    max_seconds: float | None = None,
    batch: int = 1,
) -> LatencyStats:
    """Call ``fn`` ``warmup`` times untimed, then time up to ``iterations`` calls (or until ``max_seconds``)."""
    for _ in range(warmup):
        fn()
    samples: list[float] = []
    start = time.perf_counter()
    for _ in range(iterations):
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
        if max_seconds is not None and time.perf_counter() - start > max_seconds and len(samples) >= 5:
            break
    return percentile_stats(samples, batch)


def time_interleaved(
    calls: dict[str, Callable[[], object]],
    *,
    warmup: int = 10,
    iterations: int = 100,
    rounds: int = 5,
    max_seconds: float | None = None,
    batch: int = 1,
) -> dict[str, LatencyStats]:
    """Time several functions against each other in one run: after ``warmup`` untimed calls each, ``rounds``
    rounds in which every function makes ``iterations / rounds`` timed calls, the order rotating each round.

    What a comparison needs: a drift of the machine (a neighbour's job, frequency, heat) lands on every function
    alike instead of on whichever was timed last. Each result carries its per-round medians, the spread that
    says how far apart two figures must be to differ. ``max_seconds`` caps each function's warm-up, and its timed
    total (a round ends early once it is spent, after 3 calls; later rounds are skipped once 2 are done)."""
    names = list(calls)
    for name in names:
        start = time.perf_counter()
        for _ in range(warmup):
            calls[name]()
            if max_seconds is not None and time.perf_counter() - start > max_seconds:
                break
    rounds = max(1, min(rounds, iterations))
    per_round = max(1, iterations // rounds)
    samples: dict[str, list[float]] = {n: [] for n in names}
    medians: dict[str, list[float]] = {n: [] for n in names}
    spent = dict.fromkeys(names, 0.0)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            if max_seconds is not None and spent[name] > max_seconds and len(medians[name]) >= 2:
                continue
            fn, own = calls[name], []
            for _ in range(per_round):
                t = time.perf_counter()
                fn()
                own.append(time.perf_counter() - t)
                if max_seconds is not None and len(own) >= 3 and spent[name] + sum(own) > max_seconds:
                    break  # a graph far slower than the budget: a shorter round, not minutes past it
            spent[name] += sum(own)
            samples[name] += own
            medians[name].append(float(np.median(own)) * 1e3)
    out = {}
    for name in names:
        stats = percentile_stats(samples[name], batch)
        stats.round_p50_ms = tuple(medians[name])
        out[name] = stats
    return out


def machine_fingerprint() -> dict:
    """What a latency figure was measured on."""
    import onnxruntime as ort

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "machine": platform.machine(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "system": platform.system(),
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "providers": ort.get_available_providers(),
    }


def machine_label() -> str:
    fp = machine_fingerprint()
    return f"{fp['machine']} {fp['cpu']} x{fp['cores']}, ORT {fp['onnxruntime']}".strip()
