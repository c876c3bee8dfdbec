"""``edgeshift simulate``: replay a load trace against a switch policy, with switch costs measured for real.

A trace is CSV with a header ``time_s,rps`` and optionally ``cpu_share`` (speed left to us, 1.0 = as
benchmarked) and ``available_mb``; or JSON, a list of such objects. Each row holds until the next one. The
simulator benchmarks every variant on this device first (latency p95 at batch 1; the cost of a cold switch:
inflate + create + warm), then steps through the trace once per ``step`` seconds, modelling the latency each
variant would give at that load, and asks the policy what to run. Torch-free.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from edgeshift.core.config import read_capped
from edgeshift.core.errors import InputFileError, PortfolioError
from edgeshift.core.jsonio import loads_bounded

from .policies import Observation, SwitchPolicy, VariantView
from .portfolio import Portfolio


@dataclass
class TracePoint:
    time_s: float
    rps: float
    cpu_share: float = 1.0
    available_mb: float = 1e9


@dataclass
class SimSwitch:
    time_s: float
    source: str
    target: str
    reason: str
    cost_ms: float


@dataclass
class SimResult:
    switches: list[SimSwitch]
    seconds_per_variant: dict[str, float]
    requests_per_variant: dict[str, float]
    slo_violations_s: float  # seconds with modelled p95 above the profile's target
    mean_top1: float | None  # request-weighted accuracy served


MAX_TRACE_ROWS = 100_000
MAX_WINDOWS = 100_000  # decision windows a replay steps through (about a day at one a second)
MAX_RPS = 1e9


def read_trace(path: str | Path, max_bytes: int = 16 * 2**20) -> list[TracePoint]:
    """A load trace from a file we did not write: its size checked before it is parsed, at most
    ``MAX_TRACE_ROWS`` rows, every number finite and in range, time increasing."""
    path = Path(path)
    if not path.is_file():
        raise InputFileError(f"trace file not found: {path}")
    try:
        text = read_capped(path, max_bytes, error=InputFileError, what="trace").decode("utf-8")
        rows = loads_bounded(text) if path.suffix == ".json" else list(csv.DictReader(text.splitlines()))
    except (UnicodeDecodeError, json.JSONDecodeError, csv.Error) as exc:
        raise InputFileError(f"{path}: cannot parse trace ({exc})") from None
    if not isinstance(rows, list) or not rows:
        raise InputFileError(f"{path}: empty trace; expected rows of time_s,rps[,cpu_share][,available_mb]")
    if len(rows) > MAX_TRACE_ROWS:
        raise InputFileError(f"{path}: {len(rows):,} rows, more than {MAX_TRACE_ROWS:,}")
    points: list[TracePoint] = []
    for i, r in enumerate(rows):
        if not isinstance(r, dict) or "time_s" not in r or "rps" not in r:
            raise InputFileError(
                f"{path}: row {i + 1} lacks time_s and rps (expected header time_s,rps[,cpu_share][,available_mb])"
            )
        try:
            values = [_number(r["time_s"]), _number(r["rps"]), _number(r.get("cpu_share") or 1.0)]
            values.append(_number(r.get("available_mb") or 1e9))
        except (TypeError, ValueError):
            raise InputFileError(f"{path}: row {i + 1} has a value that is not a finite number") from None
        p = TracePoint(*values)
        if (
            not 0 <= p.rps <= MAX_RPS
            or not 0 < p.cpu_share <= 1
            or p.available_mb < 0
            or (points and p.time_s <= points[-1].time_s)
        ):
            raise InputFileError(
                f"{path}: row {i + 1}: need 0 <= rps <= {MAX_RPS:g}, 0 < cpu_share <= 1, available_mb >= 0, "
                "increasing time_s"
            )
        points.append(p)
    return points


def _number(value: object) -> float:
    """A finite float from a CSV cell or a JSON number (at most 30 characters: ``int()`` of thousands of digits
    is refused by Python, and ``1e400`` is infinite)."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)) or len(str(value)) > 30:
        raise ValueError(value)
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(value)
    return number


def check_windows(trace: list[TracePoint], step: float) -> None:
    """Refuse a replay of more than ``MAX_WINDOWS`` decision windows, before it starts."""
    windows = (trace[-1].time_s - trace[0].time_s) / step + 1
    if windows > MAX_WINDOWS:
        raise InputFileError(
            f"the trace spans {trace[-1].time_s - trace[0].time_s:g} s: {windows:,.0f} windows of {step:g} s, more "
            f"than {MAX_WINDOWS:,}; pass a larger --step"
        )


def measure_variants(
    portfolio: Portfolio, profile, iterations: int = 30
) -> tuple[dict[str, VariantView], dict[str, float], list[str]]:
    """On-device latency of every variant (timed against each other, interleaved) and its cold-switch cost:
    (views by name, cost ms by name, ladder fastest first)."""
    import numpy as np

    from .ladder import LadderPoint, build_ladder, ladder_accuracy
    from .session import absorb_first_session_cost, run_bounded, session_for_variant
    from .timing_process import Graph, TimingError, TimingSettings, time_graphs

    costs = {}
    spec = portfolio.input_spec
    x = np.zeros([1 if d is None else d for d in spec.shape], np.float32)
    settings = TimingSettings(
        warmup=10, iterations=iterations, rounds=min(profile.benchmark.rounds, iterations), max_seconds=10.0
    )
    try:  # first, in a process of its own under the profile's limits: an untrusted variant is loaded there first
        stats = time_graphs(
            {v.name: Graph(portfolio.inflate(v.name), {spec.name: x}, v.sha256) for v in portfolio.variants},
            profile,
            settings,
            kind="variant",
        )
    except TimingError as exc:
        raise PortfolioError(f"{portfolio.path}: {exc}") from None
    absorb_first_session_cost(portfolio, profile)
    for v in portfolio.variants:
        t0 = time.perf_counter()
        sess = session_for_variant(portfolio, v.name, profile)[0]  # the runtime's own cold-switch path
        run_bounded(sess, {spec.name: x}, profile.limits.run_seconds, f"{portfolio.path}: variant {v.name!r}")
        costs[v.name] = (time.perf_counter() - t0) * 1e3
        del sess
    views, points = {}, []
    for i, v in enumerate(portfolio.variants):
        mem = v.record.peak_memory_bytes or 2 * v.bytes
        views[v.name] = VariantView(v.name, i, v.top1 or 0.0, stats[v.name].p95_ms, mem / 2**20)
        points.append(
            LadderPoint(v.name, ladder_accuracy(v.top1, v.reference), stats[v.name].p50_ms, stats[v.name].round_p50_ms)
        )
    return views, costs, build_ladder(points, profile.benchmark.ladder_min_gain)


def simulate(
    trace: list[TracePoint],
    views: list[VariantView],
    costs: dict,
    policy: SwitchPolicy,
    *,
    start: int,
    latency_target_ms: float,
    step: float = 1.0,
) -> SimResult:
    active = start
    switches: list[SimSwitch] = []
    seconds = {v.name: 0.0 for v in views}
    requests = {v.name: 0.0 for v in views}
    violations = 0.0
    end = trace[-1].time_s + step
    t, k = trace[0].time_s, 0
    while t < end:
        while k + 1 < len(trace) and trace[k + 1].time_s <= t:
            k += 1
        point = trace[k]
        v = views[active]
        p95 = policy.predicted_p95_ms(
            v, Observation(t, point.rps, point.rps, None, point.cpu_share, point.available_mb)
        )
        served = point.rps if p95 != float("inf") else policy.threads * 1000 / (v.latency_ms / point.cpu_share)
        obs = Observation(t, point.rps, served, min(p95, 1e6), point.cpu_share, point.available_mb)
        seconds[v.name] += step
        requests[v.name] += served * step
        violations += step if p95 > latency_target_ms else 0.0
        decision = policy.decide(obs, views, active)
        if decision is not None and decision.target != active:
            switches.append(
                SimSwitch(
                    t, v.name, views[decision.target].name, decision.reason, costs.get(views[decision.target].name, 0.0)
                )
            )
            active = decision.target
        t += step
    total = sum(requests.values())
    top1 = None
    if total > 0 and any(v.top1 for v in views):
        top1 = sum(requests[v.name] * v.top1 for v in views) / total
    return SimResult(switches, seconds, requests, violations, top1)


def result_document(result: SimResult) -> dict:
    return {**asdict(result), "switches": [asdict(s) for s in result.switches]}


def simulate_file(
    portfolio_path: str | Path, trace_path: str | Path, policy_name: str, profile, step: float = 1.0
) -> tuple[SimResult, list[str]]:
    """Measure the portfolio's variants under ``profile``, replay the trace against the policy; returns the result
    and the lines to print (variants, every switch with its reason and cost, totals).

    The ladder is the runtime's: from the bench saved beside the portfolio when it was measured here under this
    profile (its latencies too), else from this run's own interleaved measurement."""
    from . import policies
    from .ladder import device_ladder

    points = read_trace(trace_path, profile.limits.file_mb * 2**20)
    check_windows(points, step)
    pol = policies.for_profile(policy_name, profile)
    with Portfolio.open(portfolio_path, profile.limits) as pf:
        by_name, costs, ladder = measure_variants(pf, profile)
        saved = device_ladder(pf, profile)
        source = "measured now"
        if saved.source.startswith("bench"):  # what the runtime would step along here
            ladder, source = list(saved.steps), saved.source
            by_name = {
                n: dataclasses.replace(v, latency_ms=saved.p95_ms.get(n, v.latency_ms)) for n, v in by_name.items()
            }
        order = ladder if pol.uses_ladder else pf.names
    views = [dataclasses.replace(by_name[n], index=i) for i, n in enumerate(order)]
    start = order.index(ladder[(len(ladder) - 1) // 2])  # the ladder's middle step, as the runtime starts
    res = simulate(
        points, views, costs, pol, start=start, latency_target_ms=profile.serving.latency_target_ms, step=step
    )
    lines = [
        (f"ladder on this device ({source}; fastest first): " if pol.uses_ladder else "variants (smallest first): ")
        + ", ".join(f"{v.name} p95 {v.latency_ms:.2f} ms, switch {costs[v.name]:.0f} ms" for v in views)
    ]
    lines.append(
        f"start on {views[start].name}; policy {policy_name}; target p95 {profile.serving.latency_target_ms:g} ms"
    )
    for s in res.switches:
        lines.append(f"t={s.time_s:7.1f}s  {s.source} -> {s.target}  cost {s.cost_ms:.0f} ms  ({s.reason})")
    share = ", ".join(f"{k} {v:.0f}s" for k, v in res.seconds_per_variant.items() if v)
    acc = "" if res.mean_top1 is None else f", request-weighted top-1 {100 * res.mean_top1:.2f}%"
    lines.append(
        f"{len(res.switches)} switches; time per variant: {share}; {res.slo_violations_s:.0f}s above target{acc}"
    )
    return res, lines
