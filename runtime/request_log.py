"""What the runtime has served: a window of request latencies, counts, and whether it is serving right now.

Written on the predict path, so recording is a deque append (atomic) plus a counter under a lock. Torch-free.
"""

from __future__ import annotations

import collections
import threading
import time

import numpy as np

LATENCY_WINDOW = 20_000  # request latencies kept for percentiles
SERVING_WINDOW = 0.1  # seconds: a request finished this recently means the runtime is serving (pace switches)


class RequestLog:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._log: collections.deque = collections.deque(maxlen=LATENCY_WINDOW)  # (done at, seconds, variant)
        self.requests = 0
        self.failures = 0
        self.per_variant: collections.Counter = collections.Counter()
        self._last_start = self._last_done = float("-inf")  # when the last request started / finished

    def started(self) -> float:
        """Mark a request in flight; returns its start time."""
        t = self._last_start = time.perf_counter()
        return t

    def finished(self, start: float, variant: str) -> None:
        done = self._last_done = time.perf_counter()
        self._log.append((done, done - start, variant))  # deque.append is atomic
        with self._lock:
            self.requests += 1
            self.per_variant[variant] += 1

    def failed(self) -> None:
        self._last_done = time.perf_counter()  # not in flight any more
        with self._lock:
            self.failures += 1

    def serving(self) -> bool:
        """Requests are being served: one is in flight (the latest started after the latest finished; requests
        longer than the window count too) or one finished within ``SERVING_WINDOW``."""
        return self._last_start > self._last_done or time.perf_counter() - self._last_done < SERVING_WINDOW

    def recent(self, window: float) -> list[tuple[float, str]]:
        """(seconds, variant) of the requests that finished in the last ``window`` seconds."""
        since = time.perf_counter() - window
        return [(dt, n) for t, dt, n in list(self._log) if t >= since]

    def percentiles_ms(self) -> dict[str, float | None]:
        """p50/p95/p99 over the kept window (None before the first request)."""
        lat = np.asarray([dt for _, dt, _ in list(self._log)], dtype=np.float64) * 1e3
        if not lat.size:
            return {"p50_ms": None, "p95_ms": None, "p99_ms": None}
        p50, p95, p99 = np.percentile(lat, [50, 95, 99])
        return {"p50_ms": float(p50), "p95_ms": float(p95), "p99_ms": float(p99)}

    def counts(self) -> dict:
        with self._lock:
            return {"requests": self.requests, "failures": self.failures, "per_variant": dict(self.per_variant)}
