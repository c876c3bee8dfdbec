"""What a switch policy sees of the live runtime: one window of requests turned into an ``Observation`` and a
view of the variants it chooses among (the ladder, fastest first, or every variant), with the known latencies
rescaled to how fast this device really runs. Torch-free."""

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
    order: list[str] | None = None,
    known_ms: dict[str, float] | None = None,
) -> tuple[Observation, list[VariantView], int]:
    """(Observation, variant views, active index) from the ``recent`` (seconds, variant) requests of the last
    ``window`` seconds. The views are ``order``'s variants (default: the portfolio's); ``known_ms`` are their p95s
    as measured (this device's bench, else the manifest). The active variant, when not in ``order``, counts as the
    step whose known latency is nearest its own. ``fastest_ms`` (per variant: the fastest window median seen on
    this device) is updated."""
    import psutil

    names = list(order or portfolio.names)
    known_ms = {} if known_ms is None else known_ms
    own = [dt * 1e3 for dt, n in recent if n == active]
    share = 1.0
    if len(own) >= 3:
        median = float(np.median(own))
        fastest = fastest_ms[active] = min(fastest_ms.get(active, median), median)
        share = max(min(fastest / median, 1.0), 1e-3)
    infos = [portfolio.info(n) for n in names]
    # measured latencies (this device's bench or build time), rescaled by how fast the active variant ran at best
    known = {n: known_ms.get(n) or portfolio.info(n).p95_ms or 1.0 for n in {*names, active}}
    scale = fastest_ms[active] / known[active] if active in fastest_ms else 1.0
    views = [
        VariantView(
            v.name,
            i,
            v.top1 or 0.0,
            fastest_ms.get(v.name, known[v.name] * scale),
            (v.record.peak_memory_bytes or 2 * v.bytes) / 2**20,
        )
        for i, v in enumerate(infos)
    ]
    if active in names:
        ia = names.index(active)
    else:
        ia = min(range(len(names)), key=lambda i: abs(known[names[i]] - known[active]))
    qps = len(recent) / window
    p95 = float(np.percentile([dt for dt, _ in recent], 95)) * 1e3 if recent else None
    return Observation(now, qps, qps, p95, share, psutil.virtual_memory().available / 2**20), views, ia
