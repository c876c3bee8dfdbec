from pathlib import Path

import pytest

from edgeshift import device_profiles
from edgeshift.core.errors import ProfileError, UnknownNameError


def test_every_builtin_profile_loads():
    assert set(device_profiles.names()) >= {"rpi4", "rpi5", "jetson-nano", "jetson-orin-nano", "x86-edge", "host"}
    for name in device_profiles.names():
        p = device_profiles.load_profile(name)
        assert p.execution.providers[-1] == "CPUExecutionProvider"
        assert p.execution.intra_op_threads >= 1 and p.serving.memory_budget_mb > 0
        assert p.benchmark.iterations >= 1


CPU, XNNPACK, TRT = "CPUExecutionProvider", "XnnpackExecutionProvider", "TensorrtExecutionProvider"


@pytest.mark.parametrize("name", ["rpi4", "rpi5"])
def test_pi_threads_go_to_the_provider_that_really_runs(name):
    """PyPI's aarch64 onnxruntime has no XNNPACK: the CPU provider must get the Pi's 4 cores. Where XNNPACK is
    present it gets them, and ORT's own pool stays at 1 without spinning (ORT's XNNPACK advice)."""
    p = device_profiles.load_profile(name)
    cpu_only = device_profiles.plan_session(p, [CPU, "AzureExecutionProvider"])
    assert (cpu_only.lead, cpu_only.intra_op_threads, cpu_only.session_config) == (CPU, 4, {})
    assert cpu_only.missing == (XNNPACK,) and cpu_only.provider_threads == {}
    assert cpu_only.summary() == "CPUExecutionProvider, 4 intra-op threads"
    xnn = device_profiles.plan_session(p, [XNNPACK, CPU])
    assert (xnn.lead, xnn.intra_op_threads, xnn.provider_threads) == (XNNPACK, 1, {XNNPACK: 4})
    assert xnn.session_config == {"session.intra_op.allow_spinning": "0"} and xnn.missing == ()


def test_overrides_apply_only_to_the_provider_that_leads(tmp_path):
    text = (
        '[execution]\nproviders = ["XnnpackExecutionProvider", "CPUExecutionProvider"]\nintra_op_threads = 3\n'
        'session_config = { "session.intra_op.allow_spinning" = "0" }\n'
        "[execution.when.CPUExecutionProvider]\ninter_op_threads = 2\n"
        'session_config = { "session.set_denormal_as_zero" = "1" }\n'
        "[execution.when.XnnpackExecutionProvider]\nintra_op_threads = 1\n"
    )
    p = device_profiles.load_profile(write(tmp_path, text))
    cpu = device_profiles.plan_session(p, [CPU])
    spin, denormal = {"session.intra_op.allow_spinning": "0"}, {"session.set_denormal_as_zero": "1"}
    assert (cpu.intra_op_threads, cpu.inter_op_threads, cpu.session_config) == (3, 2, {**spin, **denormal})
    xnn = device_profiles.plan_session(p, [XNNPACK, CPU])
    assert (xnn.intra_op_threads, xnn.inter_op_threads, xnn.session_config) == (1, 1, spin)


def test_jetson_engines_are_cached_per_variant():
    """A TensorRT engine is built once per variant, into a folder named by its sha256, with one shared timing
    cache; without TensorRT, or without a variant, no engine options are set."""
    p = device_profiles.load_profile("jetson-orin-nano")
    sha_a, sha_b = "a" * 64, "b" * 64
    plans = [device_profiles.plan_session(p, [TRT, "CUDAExecutionProvider", CPU], sha) for sha in (sha_a, sha_b)]
    for plan, sha in zip(plans, (sha_a, sha_b)):
        trt = plan.provider_options[plan.providers.index(TRT)]
        assert plan.lead == TRT and plan.engine_dir == trt["trt_engine_cache_path"]
        assert trt["trt_engine_cache_path"].endswith(f".cache/edgeshift/tensorrt/{sha}")
        assert trt["trt_engine_cache_enable"] == trt["trt_timing_cache_enable"] == "True"
        assert trt["trt_timing_cache_path"] == str(Path(trt["trt_engine_cache_path"]).parent)
        assert trt["trt_fp16_enable"] == "True"  # the profile's own options are kept
    assert device_profiles.plan_session(p, [CPU], sha_a).engine_dir is None
    assert device_profiles.plan_session(p, [TRT, CPU]).engine_dir is None


def test_host_profile_is_detected_from_this_machine():
    import os

    import psutil

    p = device_profiles.load_profile("host")
    assert p.execution.intra_op_threads == os.cpu_count()
    assert 0 < p.serving.memory_budget_mb <= psutil.virtual_memory().total / 2**20


def test_unknown_profile_lists_the_known_ones():
    with pytest.raises(UnknownNameError, match="jetson-nano, jetson-orin-nano, rpi4"):
        device_profiles.load_profile("pi4")


def write(tmp_path, text):
    path = tmp_path / "mine.toml"
    path.write_text(text)
    return path


def test_a_users_own_profile_file(tmp_path):
    p = device_profiles.load_profile(write(tmp_path, 'name = "mine"\n[serving]\nlatency_target_ms = 7\n'))
    assert p.name == "mine" and p.serving.latency_target_ms == 7.0
    assert p.serving.switch_cpu_share == 0.25  # default: a switch paces itself while requests are served
    assert p.execution.providers == ("CPUExecutionProvider",)


@pytest.mark.parametrize(
    "text,match",
    [
        ("[serving]\nlatency_target = 5\n", r"mine.toml: unknown key 'serving.latency_target'"),
        ('[serving]\nbatch_size = "four"\n', r"mine.toml: serving.batch_size must be int"),
        ("[execution]\nintra_op_threads = true\n", r"execution.intra_op_threads must be int or 'auto'"),
        ('[execution]\ngraph_optimization = "max"\n', r"graph_optimization = 'max'; expected one of"),
        ("[execution]\nproviders = []\n", "non-empty list"),
        (
            "[execution.when.XnnpackProvider]\nintra_op_threads = 1\n",
            r"\[execution.when.XnnpackProvider\] names a provider not in execution.providers \(CPUExecutionProvider\)",
        ),
        ('colour = "red"\n', "unknown key 'colour'"),
        ("[serving\n", "not valid TOML"),
        ("[benchmark]\niterations = 0\n", "iterations must be >= 1"),
        ("[serving]\nswitch_cpu_share = 0\n", r"serving.switch_cpu_share must be in \(0, 1\]"),
        ("[serving]\nswitch_cpu_share = 1.5\n", r"serving.switch_cpu_share must be in \(0, 1\]"),
        ('[serving]\nswitch_cpu_share = "half"\n', r"serving.switch_cpu_share must be int or float"),
    ],
)
def test_bad_profiles_name_the_file_and_the_key(tmp_path, text, match):
    with pytest.raises(ProfileError, match=match):
        device_profiles.load_profile(write(tmp_path, text))


def test_missing_profile_file(tmp_path):
    with pytest.raises(ProfileError, match="not found"):
        device_profiles.load_profile(tmp_path / "nope.toml")
