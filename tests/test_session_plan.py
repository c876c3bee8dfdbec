"""What a session really gets: providers present, threads per provider, and TensorRT engines cached per variant."""

import json
from pathlib import Path

import onnxruntime as ort
import pytest
from onnx_helpers import tiny_portfolio
from typer.testing import CliRunner

from edgeshift.cli import app
from edgeshift.device_profiles import load_profile
from edgeshift.runtime.engine import Runtime
from edgeshift.runtime.portfolio import Portfolio

TRT = "TensorrtExecutionProvider"


def test_bench_and_runtime_report_the_provider_and_threads_in_effect(tmp_path):
    """rpi4 asks for XNNPACK first; this onnxruntime has none, so the CPU provider runs with the Pi's 4 cores, and
    both bench and the runtime say so (the session's own providers, not the profile's wish)."""
    assert "XnnpackExecutionProvider" not in ort.get_available_providers()
    tiny_portfolio(tmp_path / "pf.zip")
    result = CliRunner().invoke(
        app, ["bench", str(tmp_path / "pf.zip"), "--profile", "rpi4", "--json", str(tmp_path / "b.json")]
    )
    assert result.exit_code == 0, result.output
    assert "profile rpi4 (batch 1, CPUExecutionProvider, 4 intra-op threads," in result.output
    execution = json.loads((tmp_path / "b.json").read_text())["execution"]
    assert execution["lead"] == "CPUExecutionProvider" and execution["intra_op_threads"] == 4
    assert execution["missing"] == ["XnnpackExecutionProvider"] and execution["provider_threads"] == {}
    with Runtime(tmp_path / "pf.zip", profile="rpi4", policy="manual") as rt:
        ex = rt.stats()["execution"]
        assert (ex["lead"], ex["intra_op_threads"], ex["session_config"]) == ("CPUExecutionProvider", 4, {})


@pytest.fixture
def tensorrt_here(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """This machine has no GPU: make ONNX Runtime report TensorRT, record what each session is given, and write a
    file where TensorRT would write its engine. The session itself is a real CPU session. What a test on this can
    show is the paths each session is given and the kit's reading of those folders; not that TensorRT builds,
    writes or loads an engine there (that needs a Jetson, and is unmeasured: README, "On a Jetson")."""
    real = ort.InferenceSession
    given: list[dict] = []

    def session(model, options, providers, provider_options):
        trt = provider_options[providers.index(TRT)]
        given.append(trt)
        (Path(trt["trt_engine_cache_path"]) / "engine.trt").write_bytes(b"engine")
        return real(model, options, providers=["CPUExecutionProvider"])

    monkeypatch.setattr(ort, "get_available_providers", lambda: [TRT, "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "InferenceSession", session)
    return given


def test_without_a_gpu_each_variant_is_given_its_own_engine_folder_and_switches_say_if_it_held_one(
    tmp_path, tensorrt_here
):
    cache = tmp_path / "engines"
    (tmp_path / "jetson.toml").write_text(
        '[execution]\nproviders = ["TensorrtExecutionProvider", "CPUExecutionProvider"]\n'
        f'engine_cache = "{cache}"\n[benchmark]\nwarmup = 1\niterations = 5\nrounds = 1\n'
    )
    tiny_portfolio(tmp_path / "pf.zip")
    with Portfolio.open(tmp_path / "pf.zip") as pf:
        sha = {n: pf.info(n).sha256 for n in pf.names}
    profile = load_profile(tmp_path / "jetson.toml")
    with Runtime(tmp_path / "pf.zip", profile=profile, policy="manual", start="w8") as rt:
        rt.switch_to("w32")
        rt.switch_to("w8")
        log = rt.stats()["switch_log"]
    assert [(r["target"], r["engine_cached"]) for r in log] == [("w8", False), ("w32", False), ("w8", True)]
    assert [t["trt_engine_cache_path"] for t in tensorrt_here] == [str(cache / sha[n]) for n in ("w8", "w32", "w8")]
    assert {t["trt_timing_cache_path"] for t in tensorrt_here} == {str(cache)}

    # bench builds every variant's engine ahead of time; a second bench loads them all
    runner = CliRunner()
    for expected in ("2 loaded from the cache, 2 built now", "4 loaded from the cache, 0 built now"):
        result = runner.invoke(app, ["bench", str(tmp_path / "pf.zip"), "--profile", str(tmp_path / "jetson.toml")])
        assert result.exit_code == 0 and expected in result.output, result.output
    assert sorted(p.name for p in cache.iterdir()) == sorted(sha.values())
