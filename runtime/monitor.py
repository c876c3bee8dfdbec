"""What a switch policy sees of the live runtime: one window of requests turned into an ``Observation`` and a
view of every variant, with build-time latencies rescaled to how fast this device really runs. Torch-free."""

from __future__ import annotations

import numpy as np

from .policies import Observation, VariantView
from .portfolio import Portfolio


def observe(
    portfolio: Portfolio,
    recent: list[tuple[float, str]],
    active: str,
    fastest_ms: dict[str, float],
    window: float,
    now: float,
) -> tuple[Observation, list[VariantView], int]:
    """(Observation, variant views, active index) from the ``recent`` (seconds, variant) requests of the last
    ``window`` seconds. ``fastest_ms`` (per variant: the fastest window median seen on this device) is updated."""
    import psutil

    names = portfolio.names
    own = [dt * 1e3 for dt, n in recent if n == active]
    share = 1.0
    if len(own) >= 3:
        median = float(np.median(own))
        fastest = fastest_ms[active] = min(fastest_ms.get(active, median), median)
        share = max(min(fastest / median, 1.0), 1e-3)
    infos = [portfolio.info(n) for n in names]
    # build-time latencies, rescaled by how fast this device ran the active variant at its best
    build = [v.p95_ms or (v.macs / 1e6 if v.macs else 1.0) for v in infos]
    ia = names.index(active)
    scale = fastest_ms[active] / build[ia] if active in fastest_ms and build[ia] else 1.0
    views = [
        VariantView(
            v.name,
            i,
            v.top1 or 0.0,
            fastest_ms.get(v.name, build[i] * scale),
            (v.record.peak_memory_bytes or 2 * v.bytes) / 2**20,
        )
        for i, v in enumerate(infos)
    ]
    qps = len(recent) / window
    p95 = float(np.percentile([dt for dt, _ in recent], 95)) * 1e3 if recent else None
    return Observation(now, qps, qps, p95, share, psutil.virtual_memory().available / 2**20), views, ia
