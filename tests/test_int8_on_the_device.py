"""INT8 right on the CPU it runs on: VNNI detected from the CPU flags, an agreement floor at export (made again with
the other reduce_range, else dropped with its figures), and INT8 built on x86 for an ARM device kept untimed until
the device's own bench keeps or drops it."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from helpers import inputs_for, make
from torch import nn
from typer.testing import CliRunner

from edgeshift import device_profiles
from edgeshift.cli import app
from edgeshift.core.errors import EdgeshiftError
from edgeshift.device_profiles.profile import cpu_flags, cross_built, needs_reduce_range
from edgeshift.exporter.portfolio import BuildSettings, build_portfolio
from edgeshift.exporter.profile import TestData
from edgeshift.exporter.quantize import Calibration
from edgeshift.runtime.engine import Runtime
from edgeshift.runtime.ladder import bench_path_for
from edgeshift.runtime.portfolio import Portfolio

EPYC_ROME = (
    "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B12\nflags\t\t: fpu sse2 avx avx2 fma bmi2\n"
)
SAPPHIRE = "processor\t: 0\nmodel name\t: Intel Xeon\nflags\t\t: fpu sse2 avx avx2 avx512f avx512bw avx512_vnni\n"
ALDER = "processor\t: 0\nmodel name\t: 12th Gen Intel Core\nflags\t\t: fpu avx avx2 avx_vnni\n"
PI = "processor\t: 0\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\nCPU part\t: 0xd08\n"


@pytest.mark.parametrize(
    "cpuinfo,machine,reduce",
    [
        (EPYC_ROME, "x86_64", True),  # AVX2, no VNNI: u8 x s8 pairs saturate in int16
        (SAPPHIRE, "x86_64", False),  # AVX-512 VNNI
        (ALDER, "x86_64", False),  # AVX-VNNI
        (PI, "aarch64", False),  # ARM's dot products do not saturate that way
        ("", "x86_64", True),  # flags unknown on x86: the safe setting
    ],
)
def test_reduce_range_follows_the_cpu_flags(cpuinfo, machine, reduce):
    assert needs_reduce_range(machine, cpu_flags(cpuinfo)) is reduce


def test_host_resolves_reduce_range_on_this_machine_and_x86_profiles_say_what_they_assume():
    with open("/proc/cpuinfo") as f:
        flags = cpu_flags(f.read())
    import platform

    assert device_profiles.load_profile("host").quantization.reduce_range is needs_reduce_range(
        platform.machine(), flags
    )
    assert device_profiles.load_profile("x86-edge").quantization.reduce_range is True  # AVX2 without VNNI
    assert device_profiles.load_profile("x86-edge").machine == "x86_64"


def test_a_profile_for_another_cpu_is_cross_built():
    assert cross_built(device_profiles.load_profile("rpi4"), here="x86_64")
    assert not cross_built(device_profiles.load_profile("rpi4"), here="aarch64")
    assert not cross_built(device_profiles.load_profile("host"), here="x86_64")
    assert not cross_built(device_profiles.load_profile("x86-edge"), here="AMD64")


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    test = TestData(rng.standard_normal((200, 3, 32, 32)).astype(np.float32), rng.integers(0, 10, 200))
    return test, Calibration(rng.standard_normal((32, 3, 32, 32)).astype(np.float32), "minmax", "noise")


class OneLoudClass(nn.Module):
    """Class 0's logit spans +-1000, the others +-1: per-tensor INT8 activations give the quiet ones one step or
    none, so wherever class 0 is negative INT8 cannot tell the others apart and its top-1 disagrees."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 10)
        with torch.no_grad():
            self.fc.weight[0] *= 1000

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def test_an_int8_variant_under_the_agreement_floor_is_made_again_then_dropped_with_its_figures(tmp_path, data):
    test, calibration = data
    profile = device_profiles.load_profile("host")
    strict = dataclasses.replace(
        profile, quantization=dataclasses.replace(profile.quantization, format="qdq", activations="int8")
    )
    said = []
    path = build_portfolio(
        {"dense": OneLoudClass()},
        inputs_for(32),
        tmp_path / "pf.zip",
        test_data=test,
        say=said.append,
        settings=BuildSettings(profile=strict, latency_iterations=20, int8=calibration, measure_memory=False),
    )
    with Portfolio.open(path) as pf:
        assert pf.names == ["dense"]
        reason = next(d.reason for d in pf.manifest.dropped if d.name == "dense-int8")
    assert "with reduce_range False" in reason and "with reduce_range True" in reason, reason
    assert "of 200 test images, under the profile's quantization.min_agreement 97%" in reason
    assert any("trying the other setting" in line for line in said)


def test_int8_built_for_an_arm_device_on_x86_waits_for_the_devices_bench(tmp_path, data, monkeypatch):
    """On x86 the rpi4 profile's INT8 variant is kept untimed (no 'not faster' verdict from the wrong CPU), off the
    ladder; the runtime will not run it; the device's `bench --save` keeps or drops it, with the reason, by its own
    figures, and the runtime then follows that."""
    test, calibration = data
    monkeypatch.setattr("platform.machine", lambda: "x86_64")
    rpi4 = device_profiles.load_profile("rpi4")
    quick = dataclasses.replace(rpi4, benchmark=dataclasses.replace(rpi4.benchmark, warmup=2, iterations=40))
    path = build_portfolio(
        {"dense": make("resnet20", {}, 32)},
        inputs_for(32),
        tmp_path / "pf.zip",
        test_data=test,
        say=lambda line: None,
        settings=BuildSettings(profile=quick, int8=calibration, measure_memory=False),
    )
    with Portfolio.open(path) as pf:
        record = pf.info("dense-int8").record
        assert record.device_timing == "pending" and pf.pending == {"dense-int8"}
        assert "dense-int8" not in pf.manifest.ladder.steps
    with Runtime(path, profile=quick) as rt:
        assert rt.ladder.usable == ("dense",) and "wait for this device's bench" in rt.ladder.source
        with pytest.raises(EdgeshiftError, match="waits for this device's timing"):
            rt.switch_to("dense-int8")
    result = CliRunner().invoke(app, ["bench", str(path), "--profile", "rpi4", "--save"])
    assert result.exit_code == 0, result.output
    saved = json.loads(bench_path_for(path).read_text())
    check = saved["device_checks"]["dense-int8"]
    line = next(x for x in result.output.splitlines() if x.startswith("dense-int8: "))
    assert line.startswith("dense-int8: kept" if check["kept"] else "dense-int8: dropped") and check["reason"] in line
    rows = {r["name"]: r for r in saved["variants"]}
    faster = rows["dense-int8"]["p50_ms"] < rows["dense"]["p50_ms"]
    assert check["kept"] is False or faster  # kept only where this run measured it faster
    with Runtime(path, profile="rpi4") as rt:  # the bench beside it, measured here under this profile
        assert ("dense-int8" in rt.ladder.usable) is check["kept"]


def test_bench_refuses_an_int8_variant_this_device_computes_differently(tmp_path, data, monkeypatch):
    """The portfolio ships a few preprocessed inputs (checks.npy); on the device, bench runs each INT8 variant and its
    FP32 source on them and refuses one whose top-1 agrees less than the profile's floor. Here the floor at export
    is set to 0, so a variant that disagrees reaches the device, which must catch it."""
    test, calibration = data
    monkeypatch.setattr("platform.machine", lambda: "x86_64")  # built on x86 for the Pi: kept untimed at export
    rpi4 = device_profiles.load_profile("rpi4")
    lax = dataclasses.replace(
        rpi4,
        benchmark=dataclasses.replace(rpi4.benchmark, warmup=2, iterations=40),
        quantization=dataclasses.replace(rpi4.quantization, min_agreement=0.0),
    )
    path = build_portfolio(
        {"dense": OneLoudClass()},
        inputs_for(32),
        tmp_path / "pf.zip",
        test_data=test,
        say=lambda line: None,
        settings=BuildSettings(profile=lax, int8=calibration, measure_memory=False),
    )
    with Portfolio.open(path) as pf:
        shipped = pf.check_inputs()
        assert pf.manifest.checks.count == 8 and np.array_equal(shipped, calibration.x[:8])  # what was calibrated on
    result = CliRunner().invoke(app, ["bench", str(path), "--profile", "rpi4", "--save"])
    assert result.exit_code == 0, result.output
    saved = json.loads(bench_path_for(path).read_text())
    agreement = next(r["agreement"] for r in saved["variants"] if r["name"] == "dense-int8")
    assert agreement < 0.97 and saved["device_checks"]["dense-int8"]["kept"] is False
    assert (
        f"this device computes it differently: its top-1 agrees with its FP32 source on {100 * agreement:.0f}% "
        "of the 8 check inputs" in result.output
    )
    with Runtime(path, profile="rpi4") as rt:
        assert "dense-int8" not in rt.ladder.usable
