"""The device runtime: serve predictions from one variant and switch variants live without downtime.

A request reads the active slot once (a single reference, swapped atomically) and runs to completion on that
session, so a switch never interrupts or mixes requests: in-flight requests finish on the old session, which is
released when the last of them returns. A switch inflates the next variant, creates and warms its session on a
background thread, then swaps the reference.

Pacing: on a small device every core is busy serving, and a build running flat out raises the requests' tail
latency. So while requests are being served, a build toward a larger variant (and a standby build) inflates in
short pieces and rests between them, working at most ``switch_cpu_share`` of the time. A switch to a smaller
variant is not paced: it is how the runtime answers overload, and finishing it sooner is what helps requests.
Torch-free.
"""

from __future__ import annotations

import collections
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from edgeshift.core.errors import InputShapeError, UnknownNameError

from .portfolio import Portfolio
from .session import session_for_variant

LATENCY_WINDOW = 20_000  # request latencies kept for percentiles
SERVING_WINDOW = 0.1  # seconds: a request finished this recently means the runtime is serving (pace switches)


@dataclass
class _Slot:
    name: str
    session: Any  # an onnxruntime.InferenceSession
    input_name: str


@dataclass
class SwitchRecord:
    """What one switch cost, measured."""

    source: str
    target: str
    reason: str
    at: float  # seconds since the runtime started
    inflate_ms: float
    create_ms: float
    warm_ms: float
    total_ms: float  # from the request to the swap
    standby: bool  # served from a warm standby session (no inflate/create)
    yielded_ms: float = 0.0  # of inflate_ms: time the switch slept to leave the CPU to requests

    def to_dict(self) -> dict:
        return asdict(self)


class Runtime:
    """Serve a portfolio under a device profile and a switch policy.

    ``Runtime(portfolio, profile="host", policy="manual")`` starts on the median-size variant (or ``start``).
    ``preload_neighbours`` (default: the profile's setting) keeps the next smaller and larger variants' sessions
    warm so a switch to them is a reference swap. ``switch_cpu_share`` (default: the profile's setting, 1 = no
    pacing) is the share of the time a build toward a larger variant works while requests are being served.
    """

    def __init__(
        self,
        portfolio,
        profile="host",
        policy="manual",
        *,
        start: str | None = None,
        preload_neighbours: bool | None = None,
        switch_cpu_share: float | None = None,
        warmup_runs: int = 1,
        decide_every: float = 1.0,
    ):
        from edgeshift import device_profiles

        from . import policies

        self.portfolio = portfolio if isinstance(portfolio, Portfolio) else Portfolio.open(portfolio)
        self._owns_portfolio = not isinstance(portfolio, Portfolio)
        self.profile = device_profiles.load_profile(profile) if isinstance(profile, (str, os.PathLike)) else profile
        serving = self.profile.serving
        self.policy = (
            policies.get(policy, latency_target_ms=serving.latency_target_ms, memory_budget_mb=serving.memory_budget_mb)
            if isinstance(policy, str)
            else policy
        )
        self.preload_neighbours = serving.preload_neighbours if preload_neighbours is None else preload_neighbours
        self.switch_cpu_share = serving.switch_cpu_share if switch_cpu_share is None else switch_cpu_share
        if not 0 < self.switch_cpu_share <= 1:
            raise ValueError(f"switch_cpu_share must be in (0, 1], got {self.switch_cpu_share}")
        self._last_start = self._last_done = float("-inf")  # when the last request started / finished
        self.warmup_runs = warmup_runs
        spec = self.portfolio.input_spec
        self._input_shape = spec.shape
        self._input_dtype = np.dtype(spec.dtype)
        self._t0 = time.perf_counter()
        self._lock = threading.Lock()  # bookkeeping: stats, standby sessions
        self._switch_lock = threading.Lock()  # one switch at a time
        # Normal priority on purpose: pacing (not niceness) keeps builds off the requests' tail, and a switch down
        # under overload must not starve behind the requests it is meant to relieve.
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="edgeshift-switch")
        self._standby: dict[str, _Slot] = {}
        self._log: collections.deque = collections.deque(maxlen=LATENCY_WINDOW)  # (done at, seconds, variant)
        self._requests = 0
        self._failures = 0
        self._per_variant: collections.Counter = collections.Counter()
        self._switches: list[SwitchRecord] = []
        self._pending: Future | None = None
        name = start or self.portfolio.median_variant
        try:
            self.portfolio.info(name)  # unknown start -> error naming the variants
            slot, inflate, create, warm, yielded = self._build(name)
        except BaseException:
            self._executor.shutdown(wait=False)
            if self._owns_portfolio:
                self.portfolio.close()
            raise
        self._active = slot
        self._switches.append(
            SwitchRecord("", name, "start", 0.0, inflate, create, warm, inflate + create + warm, False, yielded)
        )
        if self.preload_neighbours:
            self._executor.submit(self._refresh_standby)
        self.decide_every = decide_every
        self._closing = threading.Event()
        self._fastest_ms: dict[str, float] = {}  # per variant: the fastest window median seen on this device
        self._monitor = None
        if self.policy.name != "manual" and decide_every > 0:
            self._monitor = threading.Thread(target=self._monitor_loop, name="edgeshift-policy", daemon=True)
            self._monitor.start()

    # -- serving ------------------------------------------------------------------------------------------
    @property
    def active(self) -> str:
        return self._active.name

    @property
    def variants(self) -> list[str]:
        return self.portfolio.names

    def _expected(self) -> str:
        return "(" + ", ".join("N" if d is None else str(d) for d in self._input_shape) + f") {self._input_dtype}"

    def check_input(self, batch) -> np.ndarray:
        """Return ``batch`` if it matches the manifest's input; else raise InputShapeError naming both."""
        if not isinstance(batch, np.ndarray):
            raise InputShapeError(f"input must be a numpy array shaped {self._expected()}, got {type(batch).__name__}")
        ok = (
            batch.ndim == len(self._input_shape)
            and all(d is None or d == s for d, s in zip(self._input_shape, batch.shape))
            and batch.shape[0] >= 1
        )
        if not ok or batch.dtype != self._input_dtype:
            raise InputShapeError(f"input is {tuple(batch.shape)} {batch.dtype}; expected {self._expected()}")
        return batch

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Run one batch on the active variant."""
        return self.predict_with_variant(batch)[0]

    def predict_with_variant(self, batch: np.ndarray) -> tuple[np.ndarray, str]:
        """Run one batch; also say which variant produced the result."""
        self.check_input(batch)
        slot = self._active  # one read: this request runs wholly on this session
        t = self._last_start = time.perf_counter()
        try:
            out = slot.session.run(None, {slot.input_name: batch})[0]
        except Exception:
            self._last_done = time.perf_counter()  # not in flight any more
            with self._lock:
                self._failures += 1
            raise
        done = self._last_done = time.perf_counter()
        self._log.append((done, done - t, slot.name))  # deque.append is atomic
        with self._lock:
            self._requests += 1
            self._per_variant[slot.name] += 1
        return out, slot.name

    # -- switching ----------------------------------------------------------------------------------------
    def _build(self, name: str, paced: bool = True) -> tuple[_Slot, float, float, float, float]:
        """Inflate, create and warm ``name``'s session: (slot, inflate_ms, create_ms, warm_ms, yielded_ms).

        ``paced``: while requests are being served, rest between inflated pieces (see the module's docstring)."""
        yielded = [0.0]
        idle_per_busy = 1 / self.switch_cpu_share - 1 if paced else 0.0

        def pace(busy: float) -> None:
            if idle_per_busy and self._serving():
                pause = busy * idle_per_busy
                time.sleep(pause)
                yielded[0] += pause

        session, inflate_ms, create_ms = session_for_variant(self.portfolio, name, self.profile, pace)
        t2 = time.perf_counter()
        inp = session.get_inputs()[0]
        shape = [self.profile.serving.batch_size if not isinstance(d, int) else d for d in inp.shape]
        zeros = np.zeros(shape, dtype=self._input_dtype)
        for _ in range(self.warmup_runs):
            session.run(None, {inp.name: zeros})
        t3 = time.perf_counter()
        return _Slot(name, session, inp.name), inflate_ms, create_ms, (t3 - t2) * 1e3, yielded[0] * 1e3

    def _serving(self) -> bool:
        """Requests are being served: one is in flight (the latest started after the latest finished; requests
        longer than the window count too) or one finished within ``SERVING_WINDOW``."""
        return self._last_start > self._last_done or time.perf_counter() - self._last_done < SERVING_WINDOW

    def _neighbours(self, name: str) -> set[str]:
        names = self.portfolio.names
        i = names.index(name)
        return {names[j] for j in (i - 1, i + 1) if 0 <= j < len(names)}

    def _refresh_standby(self) -> None:
        """Keep warm sessions for the active variant's neighbours only."""
        wanted = self._neighbours(self.active)
        with self._lock:
            for name in list(self._standby):
                if name not in wanted:
                    del self._standby[name]
            missing = [n for n in wanted if n not in self._standby]
        for name in missing:
            slot = self._build(name)[0]
            with self._lock:
                if name in self._neighbours(self.active):
                    self._standby[name] = slot

    def _do_switch(self, name: str, reason: str, requested: float) -> SwitchRecord:
        with self._switch_lock:
            source = self.active
            if name == source:
                return SwitchRecord(source, name, reason, requested - self._t0, 0, 0, 0, 0, True)
            with self._lock:
                slot = self._standby.pop(name, None)
            standby = slot is not None
            inflate = create = warm = yielded = 0.0
            if slot is None:
                upward = self.portfolio.names.index(name) > self.portfolio.names.index(source)  # larger, slower
                slot, inflate, create, warm, yielded = self._build(name, paced=upward)
            old = self._active
            self._active = slot  # the swap: one reference assignment
            with self._lock:
                if self.preload_neighbours and old.name in self._neighbours(name):
                    self._standby[old.name] = old  # the old session is a neighbour now: keep it warm
            record = SwitchRecord(
                source,
                name,
                reason,
                requested - self._t0,
                inflate,
                create,
                warm,
                (time.perf_counter() - requested) * 1e3,
                standby,
                yielded,
            )
            with self._lock:
                self._switches.append(record)
        if self.preload_neighbours:
            self._refresh_standby()
        return record

    def switch_to(self, name: str, reason: str = "manual", wait: bool = True):
        """Make ``name`` the active variant. ``wait=False`` returns a Future and keeps serving meanwhile."""
        if name not in self.portfolio.names:
            raise UnknownNameError("variant", name, self.portfolio.names)
        fut = self._executor.submit(self._do_switch, name, reason, time.perf_counter())
        self._pending = fut
        return fut.result() if wait else fut

    # -- live policy ----------------------------------------------------------------------------------------
    def observe(self, window: float) -> tuple:
        """The last ``window`` seconds as the policy sees them: (Observation, variant views, active index)."""
        import psutil

        from .policies import Observation, VariantView

        now = time.perf_counter()
        recent = [(dt, n) for t, dt, n in list(self._log) if t >= now - window]
        active = self.active
        names = self.portfolio.names
        own = [dt * 1e3 for dt, n in recent if n == active]
        share = 1.0
        if len(own) >= 3:
            median = float(np.median(own))
            fastest = self._fastest_ms[active] = min(self._fastest_ms.get(active, median), median)
            share = max(min(fastest / median, 1.0), 1e-3)
        infos = [self.portfolio.info(n) for n in names]
        # build-time latencies, rescaled by how fast this device ran the active variant at its best
        build = [v.p95_ms or (v.macs / 1e6 if v.macs else 1.0) for v in infos]
        ia = names.index(active)
        scale = self._fastest_ms[active] / build[ia] if active in self._fastest_ms and build[ia] else 1.0
        views = [
            VariantView(
                v.name,
                i,
                v.top1 or 0.0,
                self._fastest_ms.get(v.name, build[i] * scale),
                (v.record.peak_memory_bytes or 2 * v.bytes) / 2**20,
            )
            for i, v in enumerate(infos)
        ]
        qps = len(recent) / window
        p95 = float(np.percentile([dt for dt, _ in recent], 95)) * 1e3 if recent else None
        obs = Observation(now - self._t0, qps, qps, p95, share, psutil.virtual_memory().available / 2**20)
        return obs, views, ia

    def _monitor_loop(self) -> None:
        while not self._closing.wait(self.decide_every):
            if self._pending is not None and not self._pending.done():
                continue  # one switch at a time
            obs, views, active = self.observe(self.decide_every)
            decision = self.policy.decide(obs, views, active)
            if decision is not None and decision.target != active and not self._closing.is_set():
                self.switch_to(views[decision.target].name, reason=f"{self.policy.name}: {decision.reason}", wait=False)

    # -- reporting ----------------------------------------------------------------------------------------
    def stats(self) -> dict:
        lat = np.asarray([dt for _, dt, _ in list(self._log)], dtype=np.float64) * 1e3
        with self._lock:
            out = {
                "active": self.active,
                "requests": self._requests,
                "failures": self._failures,
                "per_variant": dict(self._per_variant),
                "switches": len(self._switches) - 1,
                "switch_log": [s.to_dict() for s in self._switches],
                "standby": sorted(self._standby),
            }
        if lat.size:
            p50, p95, p99 = np.percentile(lat, [50, 95, 99])
            out.update(p50_ms=float(p50), p95_ms=float(p95), p99_ms=float(p99))
        else:
            out.update(p50_ms=None, p95_ms=None, p99_ms=None)
        return out

    def close(self) -> None:
        self._closing.set()
        if self._monitor is not None:
            self._monitor.join()
        self._executor.shutdown(wait=True)
        with self._lock:
            self._standby.clear()
        if self._owns_portfolio:
            self.portfolio.close()

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
