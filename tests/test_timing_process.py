"""Interleaved timing in a process of its own on one ONNX Runtime thread pool (edgeshift.runtime.timing_process)."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from onnx_helpers import SIZE, tiny_classifier

from edgeshift.device_profiles import cpu_profile
from edgeshift.runtime.session import create_session
from edgeshift.runtime.timing_process import PER_SESSION, SHARED, Graph, TimingError, TimingSettings, time_graphs

SETTINGS = TimingSettings(warmup=2, iterations=20, rounds=4, batch=1)


def two_input_graph() -> bytes:
    """Inputs a: float32 [2,5] and b: int64 [3], each passed through: a graph that runs only on exactly that feed."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["a"], ["x"]), helper.make_node("Identity", ["b"], ["y"])],
        "two",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, [2, 5]),
            helper.make_tensor_value_info("b", TensorProto.INT64, [3]),
        ],
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5]),
            helper.make_tensor_value_info("y", TensorProto.INT64, [3]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def graphs() -> dict[str, Graph]:
    image = {"input": np.random.default_rng(0).standard_normal((1, 3, SIZE, SIZE)).astype(np.float32)}
    pair: dict[str, np.ndarray] = {"a": np.ones((2, 5), np.float32), "b": np.arange(3, dtype=np.int64)}
    return {
        "w4": Graph(tiny_classifier(4), image),
        "w16": Graph(tiny_classifier(16), image),
        "pair": Graph(two_input_graph(), pair),
    }


def test_graphs_are_timed_in_a_process_of_their_own_on_one_pool():
    stats = time_graphs(graphs(), cpu_profile(2), SETTINGS)
    assert list(stats) == ["w4", "w16", "pair"]  # every graph, on its own feed (a wrong one would fail to run)
    for s in stats.values():
        assert s.thread_pool == SHARED
        assert s.calls == SETTINGS.iterations and len(s.round_p50_ms) == SETTINGS.rounds
        assert 0 < s.p50_ms <= s.p95_ms <= s.p99_ms and s.batch == 1


def test_the_callers_process_keeps_its_own_thread_counts():
    """ORT refuses sessions with pools of their own once a process has its one pool; the timing never makes it
    here, so sessions of any thread count still open in this process, and timings at 1 and 2 threads alternate."""
    for threads in (1, 2, 1):
        assert time_graphs(graphs(), cpu_profile(threads), SETTINGS)["w4"].thread_pool == SHARED
        session = create_session(tiny_classifier(4), cpu_profile(threads))
        assert session.run(None, {"input": np.zeros((1, 3, SIZE, SIZE), np.float32)})[0].shape == (1, 4)


def test_a_profiles_benchmark_settings_are_what_is_timed():
    profile = cpu_profile(1)
    profile = dataclasses.replace(profile, benchmark=dataclasses.replace(profile.benchmark, iterations=12, rounds=3))
    stats = time_graphs(graphs(), profile, TimingSettings.of_profile(profile, batch=1))
    assert {(s.calls, len(s.round_p50_ms)) for s in stats.values()} == {(12, 3)}


def test_a_graph_onnx_runtime_cannot_load_is_one_line_naming_it():
    bad = {**graphs(), "broken": Graph(b"not an onnx model", {"input": np.zeros((1, 3, SIZE, SIZE), np.float32)})}
    with pytest.raises(TimingError, match=r"^graph 'broken': ONNX Runtime cannot load or run it: ") as e:
        time_graphs(bad, cpu_profile(1), SETTINGS)
    assert "\n" not in str(e.value)


def test_a_feed_that_does_not_fit_its_graph_is_one_line_naming_it():
    wrong = {"pair": Graph(two_input_graph(), {"a": np.ones((2, 4), np.float32), "b": np.arange(3)})}
    named = r"^graph 'pair': ONNX Runtime cannot load or run it: .*invalid dimensions for input: a"
    with pytest.raises(TimingError, match=named) as e:
        time_graphs(wrong, cpu_profile(1), SETTINGS)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "python", [["/nonexistent/edgeshift-test/python"], ["sh", "-c", "exit 127", "sh"]], ids=["missing", "exits-127"]
)
def test_where_no_timing_process_starts_the_graphs_are_timed_here_with_one_warning(python):
    """What an emulator without binfmt does (qemu-user: the child exits 127) and a missing interpreter: timed in
    this process on per-session pools, said once, and recorded in every result."""
    with pytest.warns(RuntimeWarning, match="could not start a timing process") as caught:
        stats = time_graphs(graphs(), cpu_profile(1), SETTINGS, python=python)
        again = time_graphs(graphs(), cpu_profile(1), SETTINGS, python=python)
    assert len([w for w in caught if "timing process" in str(w.message)]) == 1
    for s in [*stats.values(), *again.values()]:
        assert s.thread_pool == PER_SESSION and s.calls == SETTINGS.iterations


def test_nothing_to_time_starts_nothing():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert time_graphs({}, cpu_profile(1), SETTINGS, python=["/nonexistent/python"]) == {}
