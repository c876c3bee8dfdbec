"""Every switch policy moves the right way: replayed against a rising, a steady and a falling load on given variant
latencies (no clock involved), each switch's direction is asserted, steady load does not flip a policy, and load no
variant can meet ends on the fastest variant."""

from __future__ import annotations

import json

import pytest
from device_helpers import given_bench
from onnx_helpers import speed_portfolio
from typer.testing import CliRunner

from edgeshift.cli import app
from edgeshift.runtime import policies
from edgeshift.runtime.ladder import bench_path_for
from edgeshift.runtime.policies import VariantView
from edgeshift.runtime.simulate import TracePoint, simulate

# The ladder, fastest first: batch-1 p95 1, 2 and 4 ms, more accurate at every step, bigger sessions.
VIEWS = [
    VariantView("fast", 0, 0.80, 1.0, 10),
    VariantView("mid", 1, 0.85, 2.0, 20),
    VariantView("accurate", 2, 0.90, 4.0, 40),
]
COSTS = {v.name: 1.0 for v in VIEWS}
TARGET_MS = 10.0


def ramp(start: float, end: float, seconds: int = 120, field: str = "rps") -> list[TracePoint]:
    points = []
    for t in range(0, seconds, 5):
        value = start + (end - start) * t / (seconds - 5)
        points.append(
            TracePoint(float(t), value, 1.0, 1e9) if field == "rps" else TracePoint(float(t), 50.0, 1.0, value)
        )
    return points


def replay(name: str, trace: list[TracePoint], start: int):
    policy = policies.get(name, latency_target_ms=TARGET_MS, memory_budget_mb=1e6, switch_every_windows=5)
    return simulate(trace, VIEWS, COSTS, policy, start=start, latency_target_ms=TARGET_MS)


def directions(result) -> list[int]:
    index = {v.name: v.index for v in VIEWS}
    return [1 if index[s.target] > index[s.source] else -1 for s in result.switches]


@pytest.mark.parametrize("name", ["qps-trend", "latency-slo"])
def test_speed_policies_step_only_faster_as_load_rises_and_only_slower_as_it_falls(name):
    rising = replay(name, ramp(50, 3000), start=2)
    assert directions(rising) and set(directions(rising)) == {-1}, rising.switches
    falling = replay(name, ramp(3000, 50), start=0)
    assert directions(falling) and set(directions(falling)) == {1}, falling.switches


@pytest.mark.parametrize("name", ["qps-trend", "latency-slo", "memory", "manual"])
@pytest.mark.parametrize("rps", [100.0, 450.0, 5000.0], ids=["light", "near-capacity", "saturated"])
def test_steady_load_does_not_flip_a_policy(name, rps):
    """Steady load, from light to more than any variant serves: at most one direction, never back and forth."""
    for start in range(len(VIEWS)):
        result = replay(name, [TracePoint(float(t), rps, 1.0, 1e9) for t in range(0, 300, 10)], start)
        moves = directions(result)
        assert len(set(moves)) <= 1 and len(moves) <= len(VIEWS) - 1, (start, result.switches)


@pytest.mark.parametrize("name", ["qps-trend", "latency-slo"])
def test_load_no_variant_can_meet_ends_on_the_fastest_variant(name):
    result = replay(name, [TracePoint(float(t), 50_000.0, 1.0, 1e9) for t in range(0, 120, 10)], start=2)
    assert result.switches and result.switches[-1].target == "fast" and set(directions(result)) == {-1}


def test_latency_slo_on_a_miss_never_moves_to_a_slower_variant():
    """A miss means what was predicted ran low: a slower step 'predicted to fit' would miss worse (what happened:
    moved to the slowest variant on a miss, and stayed). It goes to a faster step predicted to meet the target, or
    the fastest."""
    policy = policies.get("latency-slo", latency_target_ms=TARGET_MS)
    for active in range(len(VIEWS)):
        obs = policies.Observation(0.0, 10.0, 10.0, 25.0, 1.0, 1e9)  # measured p95 25 ms: a miss, whatever predicted
        decision = policy.decide(obs, VIEWS, active)
        if active == 0:
            assert decision is None  # already the fastest
        else:
            assert decision is not None and decision.target < active, (active, decision)


def test_qps_trend_switches_at_most_once_per_window_count_from_the_profile():
    flapping = [TracePoint(float(t), 500.0 if (t // 2) % 2 else 100.0, 1.0, 1e9) for t in range(0, 120)]
    for every in (2, 10):
        policy = policies.get("qps-trend", latency_target_ms=TARGET_MS, switch_every_windows=every)
        result = simulate(flapping, VIEWS, COSTS, policy, start=1, latency_target_ms=TARGET_MS)
        times = [s.time_s for s in result.switches]
        assert all(b - a >= every for a, b in zip(times, times[1:])), times


@pytest.mark.parametrize(
    "start,trace,expected",
    [
        (2, ramp(1000, 40, field="available_mb"), -1),  # memory running out: smaller sessions only
        (0, ramp(40, 1000, field="available_mb"), 1),  # memory coming back: larger only
    ],
)
def test_memory_policy_moves_with_the_memory_available(start, trace, expected):
    result = replay("memory", trace, start)
    assert directions(result) and set(directions(result)) == {expected}, result.switches


def test_simulate_ends_on_the_fastest_variant_when_no_variant_meets_the_load(tmp_path):
    """Through the command, on this device's timings given as a saved bench (no clock involved in the choice)."""
    speed_portfolio(tmp_path / "pf.zip")
    bench_path_for(tmp_path / "pf.zip").write_text(json.dumps(given_bench(tmp_path / "pf.zip", "host")))
    (tmp_path / "t.csv").write_text("time_s,rps\n0,10\n20,1000000\n60,1000000\n")
    result = CliRunner().invoke(
        app,
        [
            "simulate",
            str(tmp_path / "pf.zip"),
            "--trace",
            str(tmp_path / "t.csv"),
            "--policy",
            "latency-slo",
            "--json",
            str(tmp_path / "s.json"),
        ],
    )
    assert result.exit_code == 0, result.output
    switches = json.loads((tmp_path / "s.json").read_text())["switches"]
    assert switches and switches[-1]["target"] == "big_fast"  # the fastest of the given ladder
