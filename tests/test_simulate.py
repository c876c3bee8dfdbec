import pytest

from edgeshift.core.errors import InputFileError
from edgeshift.runtime import policies
from edgeshift.runtime.policies import VariantView
from edgeshift.runtime.simulate import read_trace, simulate

VIEWS = [VariantView("s", 0, 0.80, 1.0, 10), VariantView("m", 1, 0.85, 2.0, 20), VariantView("l", 2, 0.90, 4.0, 40)]
COSTS = {"s": 5.0, "m": 10.0, "l": 20.0}


def test_rising_then_falling_load_switches_down_then_up(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("time_s,rps\n0,100\n10,450\n20,900\n30,450\n40,100\n50,60\n")
    pol = policies.get("qps-trend", latency_target_ms=20)
    res = simulate(read_trace(path), VIEWS, COSTS, pol, start=1, latency_target_ms=20)
    moves = [(s.source, s.target) for s in res.switches]
    assert ("m", "s") in moves and moves.index(("m", "s")) < len(moves) - 1
    assert moves[-1][1] in ("m", "l") and all(s.reason for s in res.switches)
    assert res.switches[0].cost_ms == COSTS[res.switches[0].target]
    assert sum(res.seconds_per_variant.values()) == pytest.approx(51)  # the last row holds one step
    served = res.requests_per_variant
    assert sum(v > 0 for v in served.values()) >= 2  # a real mix of variants served
    # request-weighted, not time-weighted: the test's own sum over what each variant served
    expected = sum(served[v.name] * v.top1 for v in VIEWS) / sum(served.values())
    assert res.mean_top1 == pytest.approx(expected, rel=1e-12)
    time_weighted = sum(res.seconds_per_variant[v.name] * v.top1 for v in VIEWS) / 51
    assert expected != pytest.approx(time_weighted, rel=1e-6)  # so the check above can tell them apart


def test_cpu_contention_in_the_trace_moves_latency_slo(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(
        '[{"time_s": 0, "rps": 10}, {"time_s": 10, "rps": 10, "cpu_share": 0.2}, '
        '{"time_s": 20, "rps": 10}, {"time_s": 25, "rps": 10}]'
    )
    pol = policies.get("latency-slo", latency_target_ms=10, patience=2)
    res = simulate(read_trace(path), VIEWS, COSTS, pol, start=2, latency_target_ms=10)
    assert [s.target for s in res.switches] == ["s", "l"]


@pytest.mark.parametrize(
    "text,match",
    [
        ("", "empty trace"),
        ("t,rps\n0,1\n", "lacks time_s and rps"),
        ("time_s,rps\n0,x\n", "not a finite number"),
        ("time_s,rps\n5,1\n2,1\n", "increasing time_s"),
        ("time_s,rps,cpu_share\n0,1,2\n", "cpu_share"),
    ],
)
def test_bad_traces(tmp_path, text, match):
    path = tmp_path / "t.csv"
    path.write_text(text)
    with pytest.raises(InputFileError, match=match):
        read_trace(path)
