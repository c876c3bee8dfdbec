"""Building a variant's session for the runtime: inflate (paced while serving), create, warm. Torch-free.

Pacing: on a small device every core is busy serving, and a build running flat out raises the requests' tail
latency. So while requests are being served, a paced build inflates in short pieces and rests between them,
working at most ``cpu_share`` of the time.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np

from .portfolio import Portfolio
from .session import engine_cached, run_bounded, session_for_variant, session_plan


@dataclass
class Slot:
    """A variant ready to serve: its session and input name."""

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
    engine_cached: bool | None = None  # its compiled engine was in the profile's cache (None: no engine cache)
    sliced: bool = False  # a nested width, built from its base's weights in memory (inflate_ms: the slicing)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Built:
    slot: Slot
    inflate_ms: float
    create_ms: float
    warm_ms: float
    yielded_ms: float  # of inflate_ms: time spent resting
    engine_cached: bool | None = None  # see SwitchRecord
    sliced: bool = False  # see SwitchRecord


class Pacer:
    """The ``Pace`` of a build: after each inflated piece that took ``busy`` seconds, while ``serving()``, rest
    ``busy * (1 / cpu_share - 1)`` seconds, so the build works at most ``cpu_share`` of the time."""

    def __init__(self, cpu_share: float, serving: Callable[[], bool]):
        self.idle_per_busy = 1 / cpu_share - 1
        self.serving = serving
        self.yielded_s = 0.0  # rested so far

    def __call__(self, busy: float) -> None:
        if self.idle_per_busy and self.serving():
            pause = busy * self.idle_per_busy
            time.sleep(pause)
            self.yielded_s += pause


def build_slot(
    portfolio: Portfolio,
    name: str,
    profile: Any,
    *,
    dtype: np.dtype,
    warmup_runs: int = 1,
    cpu_share: float = 1.0,
    serving: Callable[[], bool] = lambda: False,
) -> Built:
    """Inflate (a nested width: slice from its base's weights in memory), create and warm ``name``'s session;
    rest between inflated pieces while ``serving()`` so the build works at most ``cpu_share`` of the time (1 =
    never rest)."""
    pace = Pacer(cpu_share, serving)
    plan = session_plan(profile, portfolio.info(name).sha256)
    cached = engine_cached(plan)  # before the session is made, which would fill the cache
    session, inflate_ms, create_ms = session_for_variant(portfolio, name, profile, pace, plan)
    t2 = time.perf_counter()
    inp = session.get_inputs()[0]
    shape = [profile.serving.batch_size if not isinstance(d, int) else d for d in inp.shape]
    zeros = np.zeros(shape, dtype=dtype)
    for _ in range(warmup_runs):
        run_bounded(session, {inp.name: zeros}, profile.limits.run_seconds, f"{portfolio.path}: variant {name!r}")
    warm_ms = (time.perf_counter() - t2) * 1e3
    return Built(
        Slot(name, session, inp.name),
        inflate_ms,
        create_ms,
        warm_ms,
        pace.yielded_s * 1e3,
        cached,
        portfolio.is_nested(name),
    )
