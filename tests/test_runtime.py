"""The runtime: serving, input checks, switching under concurrent load, standby neighbours, policies."""

import os
import threading
import time

import numpy as np
import pytest
from onnx_helpers import reference_outputs, tiny_portfolio

from edgeshift.core.errors import InputShapeError, UnknownNameError
from edgeshift.runtime import policies
from edgeshift.runtime.building import Pacer
from edgeshift.runtime.engine import Runtime
from edgeshift.runtime.policies import Observation, VariantView

HANG_GUARD_S = 120  # a wait that never ends fails here; no test asserts how fast anything is


@pytest.fixture
def portfolio(tmp_path):
    path = tmp_path / "pf.zip"
    blobs = tiny_portfolio(path, top1={"w4": 0.6, "w8": 0.7, "w16": 0.8, "w32": 0.9})
    return path, blobs


def batch(n=2, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 3, 8, 8)).astype(np.float32)


def test_starts_on_the_median_and_predicts_what_the_variant_computes(portfolio):
    path, blobs = portfolio
    x = batch()
    ref = reference_outputs(blobs, x)
    with Runtime(path) as rt:
        assert rt.active == "w8" and rt.variants == ["w4", "w8", "w16", "w32"]
        np.testing.assert_allclose(rt.predict(x), ref["w8"], rtol=1e-6, atol=1e-6)
        record = rt.switch_to("w32")
        assert rt.active == "w32" and record.source == "w8" and not record.standby
        assert record.inflate_ms >= 0 and record.create_ms > 0 and record.total_ms > 0
        np.testing.assert_allclose(rt.predict(x), ref["w32"], rtol=1e-6, atol=1e-6)
        s = rt.stats()
        assert s["requests"] == 2 and s["switches"] == 1 and s["failures"] == 0
        assert s["per_variant"] == {"w8": 1, "w32": 1} and s["p50_ms"] > 0


@pytest.mark.parametrize(
    "bad,match",
    [
        (np.zeros((2, 3, 9, 8), np.float32), r"\(2, 3, 9, 8\) float32; expected \(N, 3, 8, 8\) float32"),
        (np.zeros((2, 3, 8, 8), np.float64), "float64; expected"),
        (np.zeros((3, 8, 8), np.float32), "expected"),
        ([[1.0]], "numpy array"),
    ],
)
def test_wrong_input_names_the_expected_shape_and_dtype(portfolio, bad, match):
    with Runtime(portfolio[0]) as rt:
        with pytest.raises(InputShapeError, match=match):
            rt.predict(bad)


def test_unknown_names_list_the_known_ones(portfolio):
    path, _ = portfolio
    with pytest.raises(UnknownNameError, match="host"):
        Runtime(path, profile="raspberry")
    with pytest.raises(UnknownNameError, match="latency-slo"):
        Runtime(path, policy="fastest")
    with pytest.raises(UnknownNameError, match="w16"):
        Runtime(path, start="w5")
    with Runtime(path) as rt:
        with pytest.raises(UnknownNameError, match="w32"):
            rt.switch_to("w64")


def test_eight_threads_and_fifty_switches_lose_no_request(portfolio):
    path, blobs = portfolio
    inputs = [batch(1, seed=i) for i in range(8)]
    refs = [reference_outputs(blobs, x) for x in inputs]
    errors, results = [], []
    stop = threading.Event()
    lock = threading.Lock()

    def client(i):
        while not stop.is_set():
            try:
                out, name = rt.predict_with_variant(inputs[i])
                with lock:
                    results.append((i, name, out))
            except Exception as exc:  # any failure is a test failure
                errors.append(exc)

    with Runtime(path) as rt:
        threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        order = ["w4", "w16", "w32", "w8"]
        for k in range(50):
            rt.switch_to(order[k % 4], reason="test")
        stop.set()
        for t in threads:
            t.join()
        stats = rt.stats()
    assert not errors
    assert stats["switches"] == 50 and stats["failures"] == 0
    assert len({name for _, name, _ in results}) == 4
    for i, name, out in results:  # every answer is exactly what one complete variant computes
        np.testing.assert_allclose(out, refs[i][name], rtol=1e-6, atol=1e-6)


def test_standby_neighbours_make_switches_a_reference_swap(portfolio):
    path, _ = portfolio
    with Runtime(path, preload_neighbours=True) as rt:
        rt.switch_to("w8", reason="settle")  # waits for the standby build queued at start
        assert rt.stats()["standby"] == ["w16", "w4"]
        record = rt.switch_to("w16")
        assert record.standby and record.inflate_ms == 0 and record.create_ms == 0
        rt.switch_to("w16")
        assert sorted(rt.stats()["standby"]) == ["w32", "w8"]  # follows the active variant


def views():
    return [VariantView("s", 0, 0.80, 1.0, 10), VariantView("m", 1, 0.85, 2.0, 20), VariantView("l", 2, 0.90, 4.0, 40)]


def obs(rps=10.0, share=1.0, mem=1000.0, p95=None):
    return Observation(0.0, rps, rps, p95, share, mem)


def test_qps_trend_steps_down_when_throughput_falls_and_up_when_it_rises():
    v = views()
    # on m (500 qps at full speed) at 200 rps: neither overloaded nor idle, so only the trend can move it
    p = policies.get("qps-trend", latency_target_ms=50)
    for _ in range(3):
        assert p.decide(obs(rps=200, share=1.0), v, 1) is None
    down = p.decide(obs(rps=200, share=0.5), v, 1)
    assert down.target == 0 and "falling" in down.reason
    # on s at half speed (500 qps) with 160 rps; the speed comes back: one step up, not two
    p = policies.get("qps-trend", latency_target_ms=50)
    for _ in range(3):
        assert p.decide(obs(rps=160, share=0.5), v, 0) is None
    up = p.decide(obs(rps=160, share=1.0), v, 0)
    assert up.target == 1 and "rising" in up.reason
    assert p.decide(obs(rps=160, share=1.0), v, 1) is None  # cooldown after a switch


def test_qps_trend_steps_down_when_demand_exceeds_capacity():
    p = policies.get("qps-trend")
    d = p.decide(obs(rps=480), views(), 1)  # m sustains 500 qps
    assert d.target == 0 and "demand" in d.reason


def test_latency_slo_picks_the_most_accurate_variant_that_meets_the_target_with_hysteresis():
    p = policies.get("latency-slo", latency_target_ms=6.0, patience=2)
    v = views()
    d = p.decide(obs(share=0.5), v, 2)  # l: 8 ms at half speed misses 6 ms -> m (4 ms)
    assert d.target == 1 and "misses" in d.reason
    assert p.decide(obs(share=1.0), v, 1) is None  # l predicts 4.2 ms <= 4.8 ms (20% margin): first window
    d = p.decide(obs(share=1.0), v, 1)
    assert d is not None and d.target == 2  # second window in a row


def test_memory_policy_takes_the_largest_variant_that_fits():
    p = policies.get("memory", memory_budget_mb=1000, reserve_mb=30)
    assert p.decide(obs(mem=55), views(), 0).target == 1  # 55 - 30 + 10 (its own session) = 35 MB room
    assert p.decide(obs(mem=5), views(), 2).target == 0  # 5 - 30 + 40 = 15 MB: only s fits
    assert p.decide(obs(mem=1000), views(), 2) is None
    assert policies.get("memory", memory_budget_mb=30, reserve_mb=0).decide(obs(mem=1000), views(), 2).target == 1


def test_manual_policy_never_switches():
    assert policies.get("manual").decide(obs(rps=1e6, share=0.01), views(), 2) is None


def test_unknown_policy_lists_the_known_ones():
    with pytest.raises(UnknownNameError, match="latency-slo, manual, memory, qps-trend"):
        policies.get("greedy")


def test_a_live_policy_switches_the_runtime_on_its_own(portfolio):
    import dataclasses
    import time

    from edgeshift import device_profiles

    path, blobs = portfolio
    host = device_profiles.load_profile("host")
    strict = dataclasses.replace(host, serving=dataclasses.replace(host.serving, latency_target_ms=1e-6))
    x = batch(1)
    with Runtime(path, profile=strict, policy="latency-slo", decide_every=0.05) as rt:
        assert rt.active == "w8"
        guard = time.monotonic() + HANG_GUARD_S  # only so a broken monitor fails instead of hanging: no speed claim
        while rt.active != "w4":
            rt.predict(x)  # requests give the policy its observations
            if time.monotonic() > guard:
                pytest.fail(f"the policy never switched to w4 in {HANG_GUARD_S} s of requests")
        log = rt.stats()["switch_log"]
        assert log[-1]["target"] == "w4" and log[-1]["reason"].startswith("latency-slo: p95")
        obs, views, active = rt.observe(1.0)
        assert views[active].name == "w4" and obs.p95_ms > 0 and obs.served_qps > 0


def test_manual_policy_starts_no_monitor(portfolio):
    with Runtime(portfolio[0]) as rt:
        assert rt._monitor is None


def test_missing_providers_are_skipped_with_one_warning(portfolio):
    import warnings

    import onnxruntime as ort

    from edgeshift.runtime import session

    session._warned.clear()
    assert "XnnpackExecutionProvider" not in ort.get_available_providers()  # true of this CPU build
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Runtime(portfolio[0], profile="rpi4") as rt:
            rt.switch_to("w32")
            rt.predict(batch())
    msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    missing = [m for m in msgs if "not available" in m]
    assert len(missing) == 1 and "XnnpackExecutionProvider not available" in missing[0]
    assert "using CPUExecutionProvider" in missing[0]
    cores = os.cpu_count()
    crowded = [m for m in msgs if "threads on this machine" in m]
    if cores < 4:  # the rpi4 profile's 4 threads on fewer cores: said once, with both numbers
        assert crowded == [
            f"profile rpi4: 4 threads on this machine's {cores} cores; they will take turns (a "
            "profile for another device? its latencies here are not that device's)"
        ]
    assert len(msgs) == len(missing) + len(crowded)


@pytest.mark.parametrize("share", [0.1, 1.0])
def test_a_switch_up_paces_its_inflation_only_while_requests_are_served(portfolio, share):
    path, _ = portfolio
    x = batch(1)
    stop = threading.Event()
    with Runtime(path, start="w4", switch_cpu_share=share) as rt:
        idle = rt.switch_to("w16")

        def client():
            while not stop.is_set():
                rt.predict(x)

        t = threading.Thread(target=client)
        t.start()
        served = threading.Event()
        while not served.wait(0.001):
            if rt.stats()["requests"] >= 5:
                served.set()
            elif not t.is_alive():
                pytest.fail("the client thread died before serving 5 requests")
        up = rt.switch_to("w32")
        down = rt.switch_to("w8")
        stop.set()
        t.join()
        time.sleep(0.2)  # longer than the serving window: idle again
        idle_again = rt.switch_to("w32")
    assert idle.yielded_ms == 0 and idle_again.yielded_ms == 0  # nothing served: full speed
    assert down.yielded_ms == 0  # toward a smaller variant (the answer to overload): full speed
    if share == 1.0:
        assert up.yielded_ms == 0
    else:  # rested 9 ms for every ms of inflating (the share itself: test_a_pacer_rests_for_the_share_it_is_given)
        worked = up.inflate_ms - up.yielded_ms
        assert 0 < up.yielded_ms <= 9 * worked + 1e-6


def test_a_pacer_rests_for_the_share_it_is_given():
    """The arithmetic of pacing, on given piece times: at a share of 0.1 it rests 9 s for every second of work
    while serving, and not at all otherwise (how long a piece takes is the machine's business, not this test's)."""
    serving = [True]
    pace = Pacer(0.1, lambda: serving[0])
    for busy in (0.001, 0.002, 0.0005):
        pace(busy)
    assert pace.yielded_s == pytest.approx(9 * 0.0035, rel=1e-12)
    serving[0] = False
    pace(0.004)
    assert pace.yielded_s == pytest.approx(9 * 0.0035, rel=1e-12)
    full_speed = Pacer(1.0, lambda: True)
    full_speed(0.003)
    assert full_speed.yielded_s == 0


def test_switch_cpu_share_must_be_a_share(portfolio):
    with pytest.raises(ValueError, match=r"switch_cpu_share must be in \(0, 1\]"):
        Runtime(portfolio[0], switch_cpu_share=0)
