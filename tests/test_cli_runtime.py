"""Device-side commands through the CLI, including in a process where torch cannot be imported."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
from device_helpers import BLOCK_TORCH, given_bench, npy_images
from onnx_helpers import speed_portfolio, tiny_portfolio, write_zip
from typer.testing import CliRunner

from edgeshift.cli import app
from edgeshift.runtime.ladder import bench_path_for

runner = CliRunner()


def test_bench_writes_json_and_csv(tmp_path):
    tiny_portfolio(tmp_path / "pf.zip")
    result = runner.invoke(
        app,
        [
            "bench",
            str(tmp_path / "pf.zip"),
            "--profile",
            "host",
            "--json",
            str(tmp_path / "b.json"),
            "--csv",
            str(tmp_path / "b.csv"),
        ],
    )
    assert result.exit_code == 0, result.output
    doc = json.loads((tmp_path / "b.json").read_text())
    assert [v["name"] for v in doc["variants"]] == ["w4", "w8", "w16", "w32"]
    assert doc["fingerprint"]["onnxruntime"] and doc["profile"] == "host"
    for v in doc["variants"]:
        assert 0 < v["p50_ms"] <= v["p95_ms"] <= v["p99_ms"] and v["create_ms"] > 0 and v["throughput"] > 0
        assert v["thread_pool"] == "shared"  # timed in a process of its own, on one pool
    rows = list(csv.DictReader((tmp_path / "b.csv").read_text().splitlines()))
    assert [r["name"] for r in rows] == ["w4", "w8", "w16", "w32"]


def test_run_classifies_a_folder(tmp_path):
    tiny_portfolio(tmp_path / "pf.zip")
    images = npy_images(tmp_path / "imgs")
    result = runner.invoke(app, ["run", str(tmp_path / "pf.zip"), "--images", str(images), "--top", "2"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.startswith(str(images))]
    assert len(lines) == 3 and all(len(line.split("\t")) == 3 for line in lines)
    assert "3 images with w8" in result.output


def test_simulate_prints_every_switch(tmp_path):
    speed_portfolio(tmp_path / "pf.zip")
    # this device's timings are the test's (a saved bench), so which switches happen does not hang on a clock
    bench_path_for(tmp_path / "pf.zip").write_text(json.dumps(given_bench(tmp_path / "pf.zip", "host")))
    trace = tmp_path / "t.csv"
    trace.write_text("time_s,rps,cpu_share\n0,10,1\n5,10,0.05\n10,10,1\n")
    result = runner.invoke(
        app,
        [
            "simulate",
            str(tmp_path / "pf.zip"),
            "--trace",
            str(trace),
            "--policy",
            "qps-trend",
            "--json",
            str(tmp_path / "s.json"),
        ],
    )
    assert result.exit_code == 0, result.output
    doc = json.loads((tmp_path / "s.json").read_text())
    assert len(doc["switches"]) >= 2 and f"{len(doc['switches'])} switches" in result.output
    assert all(f"-> {s['target']}" in result.output for s in doc["switches"])


def one_error_line(result):
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def test_broken_portfolio_is_one_line(tmp_path):
    (tmp_path / "bad.zip").write_bytes(b"PK\x03\x04 definitely not a zip")
    (tmp_path / "t.csv").write_text("time_s,rps\n0,10\n1,10\n")  # a sound trace: simulate must open the portfolio
    images = npy_images(tmp_path / "imgs")
    trace = str(tmp_path / "t.csv")
    for cmd in (["inspect"], ["bench"], ["run", "--images", str(images)], ["simulate", "--trace", trace]):
        result = runner.invoke(app, [cmd[0], str(tmp_path / "bad.zip"), *cmd[1:]])
        assert result.exit_code == 2
        assert "bad.zip is not a portfolio: corrupt or truncated ZIP" in one_error_line(result)


def test_deeply_nested_inputs_are_one_line(tmp_path):
    """Python's JSON and TOML parsers recurse per level: a hostile file must not reach them as a RecursionError."""
    write_zip(tmp_path / "deep.zip", b"[" * 200_000 + b"]" * 200_000, {})
    for cmd in (["inspect"], ["bench"], ["run", "--images", str(tmp_path)]):
        result = runner.invoke(app, [cmd[0], str(tmp_path / "deep.zip"), *cmd[1:]])
        assert result.exit_code == 2 and "nested deeper than 32 levels" in one_error_line(result)
    tiny_portfolio(tmp_path / "pf.zip")
    (tmp_path / "trace.json").write_text("[" * 100_000)
    result = runner.invoke(app, ["simulate", str(tmp_path / "pf.zip"), "--trace", str(tmp_path / "trace.json")])
    assert result.exit_code == 2 and "nested deeper than 32 levels" in one_error_line(result)
    (tmp_path / "pi.toml").write_text("a = " + "[" * 100_000)
    result = runner.invoke(app, ["bench", str(tmp_path / "pf.zip"), "--profile", str(tmp_path / "pi.toml")])
    assert result.exit_code == 2 and "nested too deeply" in one_error_line(result)
    (tmp_path / "pf.bench.json").write_text("{" * 100_000)  # a saved bench beside the portfolio
    (tmp_path / "trace.csv").write_text("time_s,rps\n0,10\n1,10\n")
    result = runner.invoke(app, ["simulate", str(tmp_path / "pf.zip"), "--trace", str(tmp_path / "trace.csv")])
    assert result.exit_code == 2 and "nested deeper than 32 levels" in one_error_line(result)


def test_unknown_profile_and_missing_file(tmp_path):
    tiny_portfolio(tmp_path / "pf.zip")
    result = runner.invoke(app, ["bench", str(tmp_path / "pf.zip"), "--profile", "pi9"])
    assert result.exit_code == 2 and "known: host, jetson-nano" in one_error_line(result)
    result = runner.invoke(app, ["inspect", str(tmp_path / "none.zip")])
    assert result.exit_code == 2 and "portfolio not found" in one_error_line(result)


def test_unknown_policy_is_refused(tmp_path):
    tiny_portfolio(tmp_path / "pf.zip")
    result = runner.invoke(app, ["simulate", str(tmp_path / "pf.zip"), "--trace", "t.csv", "--policy", "greedy"])
    assert result.exit_code == 2 and "qps-trend" in result.output


def test_device_commands_run_with_torch_unimportable(tmp_path):
    tiny_portfolio(tmp_path / "pf.zip")
    images = npy_images(tmp_path / "imgs")
    trace = tmp_path / "t.csv"
    trace.write_text("time_s,rps\n0,10\n3,2000\n6,10\n")
    env = dict(os.environ)
    pf = str(tmp_path / "pf.zip")
    for args in (
        ["inspect", pf],
        ["bench", pf, "--profile", "host", "--json", str(tmp_path / "b.json")],
        ["run", pf, "--images", str(images)],
        ["simulate", pf, "--trace", str(trace)],
    ):
        proc = subprocess.run(
            [sys.executable, "-c", BLOCK_TORCH, *args],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
            timeout=120,
        )
        assert proc.returncode == 0, (args, proc.stdout, proc.stderr)
    assert json.loads((tmp_path / "b.json").read_text())["variants"]
    proc = subprocess.run(
        [sys.executable, "-c", BLOCK_TORCH, "prune", "x.pt", "-o", "y.pt"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
    )
    assert proc.returncode == 2 and "pip install 'edgeshift[build]'" in proc.stderr


BLOCK_BUILD_SIDE = BLOCK_TORCH.replace(
    "if name.split('.')[0] in ('torch', 'onnx', 'onnxsim', 'torch_pruning', 'torchvision'):",
    "if name.split('.')[0] in ('torch', 'onnx') or name.startswith(('edgeshift.pruner', 'edgeshift.exporter')):",
)


def test_device_install_without_the_build_side_still_runs_its_commands(tmp_path):
    """A device install holding only the runtime and profiles: the build commands are absent, the device ones work."""
    assert BLOCK_BUILD_SIDE != BLOCK_TORCH
    tiny_portfolio(tmp_path / "pf.zip")

    def run(*args):
        return subprocess.run(
            [sys.executable, "-c", BLOCK_BUILD_SIDE, *args], capture_output=True, text=True, cwd=tmp_path, timeout=120
        )

    help_ = run("--help")
    assert help_.returncode == 0 and "inspect" in help_.stdout and "prune" not in help_.stdout, help_.stderr
    assert run("inspect", "pf.zip").returncode == 0
    assert run("prune", "x.pt", "-o", "y.pt").returncode == 2


def test_run_says_once_when_it_resizes_or_converts_and_refuses_what_it_cannot(tmp_path):
    from PIL import Image

    tiny_portfolio(tmp_path / "pf.zip")  # 8 x 8 RGB input
    images = tmp_path / "imgs"
    images.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(images / "a.png")  # fits as it is
    for name in ("b.png", "c.png"):  # grayscale, 20 x 12: converted and resized, each said once
        Image.fromarray(rng.integers(0, 255, (12, 20), dtype=np.uint8)).save(images / name)
    result = runner.invoke(app, ["run", str(tmp_path / "pf.zip"), "--images", str(images)])
    assert result.exit_code == 0, result.output
    notes = [line for line in result.stderr.splitlines() if line.startswith("note: ")]
    assert len(notes) == 2 and all("b.png" in n for n in notes), notes
    assert any("converted from L to RGB" in n for n in notes) and any("resized from 20x12 to 8x8" in n for n in notes)
    assert len([line for line in result.stdout.splitlines() if line.startswith(str(images))]) == 3
    Image.fromarray(rng.integers(0, 60000, (8, 8), dtype=np.uint16)).save(images / "d.png")  # 16-bit gray
    refused = runner.invoke(app, ["run", str(tmp_path / "pf.zip"), "--images", str(images)])
    errors = [line for line in refused.output.splitlines() if line.startswith("error: ")]
    assert (
        refused.exit_code == 2
        and len(errors) == 1
        and "d.png: image mode I;16 has no plain 8-bit RGB form" in errors[0]
        and "Traceback" not in refused.output
    )
