"""The ladder: ordered by latency measured under the profile, never by bytes; policies step along it."""

from __future__ import annotations

import dataclasses
import json

import pytest
from device_helpers import given_bench
from onnx_helpers import speed_portfolio, tiny_portfolio
from typer.testing import CliRunner

from edgeshift import Runtime
from edgeshift.cli import app
from edgeshift.core.errors import EdgeshiftError
from edgeshift.device_profiles import cpu_profile
from edgeshift.device_profiles.profile import BenchmarkSettings
from edgeshift.runtime import policies
from edgeshift.runtime.bench import bench_file
from edgeshift.runtime.ladder import LadderPoint, bench_path_for, build_ladder, is_faster
from edgeshift.runtime.portfolio import Portfolio

runner = CliRunner()
PROFILE = dataclasses.replace(cpu_profile(1, name="test-1t"), benchmark=BenchmarkSettings(5, 60, 5.0, 3, 0.10))


def test_a_step_must_beat_the_margin_in_every_interleaved_round():
    slow = LadderPoint("slow", 0.9, 1.0, (0.98, 1.0, 1.02))
    assert is_faster(LadderPoint("a", 0.8, 0.85, (0.84, 0.85, 0.86)), slow, 0.10)
    assert not is_faster(LadderPoint("b", 0.8, 0.95, (0.94, 0.95, 0.96)), slow, 0.10)  # 5% < the 10% margin
    assert is_faster(LadderPoint("b", 0.8, 0.95, (0.94, 0.95, 0.96)), slow, 0.0)
    # a lower median that loses one of the rounds it was timed in against the slower one is noise, not speed
    assert not is_faster(LadderPoint("c", 0.8, 0.85, (0.85, 0.85, 1.05)), slow, 0.10)
    assert not is_faster(slow, slow, 0.0)
    # from 4 rounds on, one round hit by a neighbour's burst is left out, two are not
    five = LadderPoint("five", 0.9, 1.0, (0.98, 0.99, 1.0, 1.01, 1.02))
    assert is_faster(LadderPoint("d", 0.8, 0.8, (0.79, 0.8, 0.8, 0.81, 3.0)), five, 0.10)
    assert not is_faster(LadderPoint("e", 0.8, 0.8, (0.79, 0.8, 0.8, 2.5, 3.0)), five, 0.10)


def test_rounds_are_compared_pairwise_so_a_device_slowing_down_for_a_while_hides_nothing():
    """Measured (bench of the trained ResNet-20 portfolio, 2026-11-22): the machine ran slower in the first two
    rounds, for every variant alike. Round by round lp3-int8 was faster each time; the spreads overlap."""
    lp3 = LadderPoint("lp3-int8", 0.8225, 0.225, (0.323, 0.393, 0.213, 0.215, 0.217))
    lp2 = LadderPoint("lp2-int8", 0.8299, 0.283, (0.330, 0.553, 0.274, 0.259, 0.260))
    assert is_faster(lp3, lp2, 0.10)
    assert build_ladder([lp3, lp2], 0.10) == ["lp3-int8", "lp2-int8"]
    # rounds from different runs cannot be paired: then the spreads must not overlap
    assert not is_faster(LadderPoint("x", 0.8, 0.225, (0.323, 0.393, 0.213, 0.215)), lp2, 0.10)


def test_the_ladder_follows_latency_and_accuracy_not_bytes():
    points = [
        LadderPoint("dense", 0.92, 1.00),
        LadderPoint("level2", 0.91, 0.80),
        LadderPoint("level4", 0.85, 1.05),  # the smallest file, slower than dense: off the ladder
        LadderPoint("dense-int8", 0.915, 0.40),  # faster and about as accurate as level2: level2 is skipped
        LadderPoint("level2-int8", 0.90, 0.30),
        LadderPoint("twin", 0.89, 0.29),  # within 10% of level2-int8 and less accurate: no step of its own
    ]
    assert build_ladder(points, 0.10) == ["level2-int8", "dense-int8", "dense"]
    assert build_ladder(points, 0.0)[-1] == "dense" and "level4" not in build_ladder(points, 0.0)
    assert build_ladder([], 0.1) == []


def test_bench_orders_the_ladder_by_its_own_figures_and_the_runtime_uses_them(tmp_path):
    pf = tmp_path / "pf.zip"
    speed_portfolio(pf)
    doc, results = bench_file(pf, PROFILE)
    assert all(len(r.round_p50_ms) == 3 for r in results)
    with Portfolio.open(pf) as opened:  # the ladder it reports is the one its own figures give, whatever they are
        top1 = {v.name: v.top1 for v in opened.variants}
    points = [LadderPoint(r.name, top1[r.name], r.p50_ms, r.round_p50_ms) for r in results]
    assert doc["ladder"] == build_ladder(points, PROFILE.benchmark.ladder_min_gain)
    given = given_bench(pf, PROFILE.name)
    with Runtime(pf, profile=PROFILE, policy="qps-trend", bench=given, start="dense", decide_every=0) as rt:
        assert rt.ladder.steps == ("big_fast", "dense") and "bench" in rt.ladder.source
        obs, views, active = rt.observe(1.0)
        assert [v.name for v in views] == ["big_fast", "dense"] and views[active].name == "dense"
        overloaded = dataclasses.replace(obs, offered_qps=1e6, served_qps=1e4)
        decision = rt.policy.decide(overloaded, views, active)
        assert decision is not None and views[decision.target].name == "big_fast"
        # the size order would have stepped from dense to the smaller, slower variant
        assert rt.portfolio.names == ["small_slow", "dense", "big_fast"]


def test_latency_slo_never_steps_down_to_a_slower_variant(tmp_path):
    pf = tmp_path / "pf.zip"
    speed_portfolio(pf)
    doc = given_bench(pf, PROFILE.name)
    with Runtime(pf, profile=PROFILE, policy="latency-slo", bench=doc, start="dense", decide_every=0) as rt:
        obs, views, active = rt.observe(1.0)
        slo = policies.get("latency-slo", latency_target_ms=views[active].latency_ms / 2)
        decision = slo.decide(dataclasses.replace(obs, p95_ms=views[active].latency_ms), views, active)
        assert decision is not None and views[decision.target].name == "big_fast"


def test_a_saved_bench_beside_the_portfolio_is_used_only_where_it_was_measured(tmp_path):
    pf = tmp_path / "pf.zip"
    speed_portfolio(pf)
    result = runner.invoke(app, ["bench", str(pf), "--save"])
    assert result.exit_code == 0, result.output
    saved = json.loads(bench_path_for(pf).read_text())
    assert saved["profile"] == "host" and "ladder on this device, profile host" in result.output
    assert " -> ".join(saved["ladder"]) in result.output  # what it printed is what it saved
    saved["variants"] = given_bench(pf, "host")["variants"]  # from here on, this device's timings are the test's
    bench_path_for(pf).write_text(json.dumps(saved))
    with Runtime(pf, profile="host") as rt:
        assert "bench" in rt.ladder.source and rt.ladder.steps == ("big_fast", "dense")
    with Runtime(pf, profile=PROFILE) as rt:  # measured under another profile: passed over, and said so
        assert "not used" in rt.ladder.source and "profile" in rt.ladder.source
    saved["fingerprint"]["cpu"] = "some other CPU"
    with pytest.raises(EdgeshiftError, match="another machine"):
        Runtime(pf, profile="host", bench=saved)


def test_simulated_overload_steps_to_the_faster_variant_not_the_smaller(tmp_path):
    pf = tmp_path / "pf.zip"
    speed_portfolio(pf)
    bench_path_for(pf).write_text(json.dumps(given_bench(pf, "host")))  # this device's timings: the test's
    trace = tmp_path / "t.csv"
    trace.write_text("time_s,rps,cpu_share\n0,100,1\n3,100000,1\n8,100000,1\n")
    result = runner.invoke(
        app, ["simulate", str(pf), "--trace", str(trace), "--policy", "qps-trend", "--json", str(tmp_path / "s.json")]
    )
    assert result.exit_code == 0, result.output
    switches = json.loads((tmp_path / "s.json").read_text())["switches"]
    # mid-ladder start (big_fast), up to dense while load is light, then overload: down to the faster variant
    assert [s["target"] for s in switches][:2] == ["dense", "big_fast"], result.output
    assert switches[1]["time_s"] >= 3 and all(s["target"] != "small_slow" for s in switches)


def test_a_manifest_without_a_ladder_gets_one_from_its_latencies(tmp_path):
    tiny_portfolio(tmp_path / "pf.zip")  # as version 1 wrote them: latencies recorded, no ladder
    with Runtime(tmp_path / "pf.zip", profile=PROFILE) as rt:
        assert rt.ladder.source == "manifest latencies" and rt.ladder.steps == ("w4", "w8", "w16", "w32")
