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


def test_pi_profiles_follow_the_xnnpack_threading_advice():
    p = device_profiles.load_profile("rpi4")
    assert p.execution.providers[0] == "XnnpackExecutionProvider"
    assert p.execution.intra_op_threads == 1
    assert p.execution.session_config["session.intra_op.allow_spinning"] == "0"
    assert p.execution.provider_options["XnnpackExecutionProvider"]["intra_op_num_threads"] == "4"


def test_host_profile_is_detected_from_this_machine():
    import os

    import psutil

    p = device_profiles.load_profile("host")
    assert p.execution.intra_op_threads == os.cpu_count()
    assert 0 < p.serving.memory_budget_mb <= psutil.virtual_memory().total / 2 ** 20


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


@pytest.mark.parametrize("text,match", [
    ('[serving]\nlatency_target = 5\n', r"mine.toml: unknown key 'serving.latency_target'"),
    ('[serving]\nbatch_size = "four"\n', r"mine.toml: serving.batch_size must be int"),
    ('[execution]\nintra_op_threads = true\n', r"execution.intra_op_threads must be int or 'auto'"),
    ('[execution]\ngraph_optimization = "max"\n', r"graph_optimization = 'max'; expected one of"),
    ('[execution]\nproviders = []\n', "non-empty list"),
    ('colour = "red"\n', "unknown key 'colour'"),
    ('[serving\n', "not valid TOML"),
    ('[benchmark]\niterations = 0\n', "iterations must be >= 1"),
    ('[serving]\nswitch_cpu_share = 0\n', r"serving.switch_cpu_share must be in \(0, 1\]"),
    ('[serving]\nswitch_cpu_share = 1.5\n', r"serving.switch_cpu_share must be in \(0, 1\]"),
    ('[serving]\nswitch_cpu_share = "half"\n', r"serving.switch_cpu_share must be int or float"),
])
def test_bad_profiles_name_the_file_and_the_key(tmp_path, text, match):
    with pytest.raises(ProfileError, match=match):
        device_profiles.load_profile(write(tmp_path, text))


def test_missing_profile_file(tmp_path):
    with pytest.raises(ProfileError, match="not found"):
        device_profiles.load_profile(tmp_path / "nope.toml")
