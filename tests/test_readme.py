"""Every command and code block in the README, run in order in an empty folder on the generated data.

The README's commands are parsed out, not copied here, so a README edit that breaks a command breaks this test.
What the test changes, and only that: the dataset (`path/to/cifar10` -> `generated`), training and profiling
lengths (a few steps on a small subset instead of the schedule shown; fewer timed calls at export), and
`my.toml` after `cp` is shrunk the way a user edits it. `make test` is not run (it is this suite; CI runs it);
`make demo` is, into a temporary folder.
"""

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from device_helpers import BLOCK_TORCH

HANG_GUARD_S = 3600  # a command that has not ended by then hung; no command here is held to a speed

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
BIN = Path(sys.executable).parent
FAST = {  # appended to training commands: a few steps on a small subset
    "train": ["--batch-size", "32", "--train-samples", "128", "--test-samples", "50"],
    "imp": ["--batch-size", "32", "--train-samples", "128", "--test-samples", "50"],
    "layerprune": ["--batch-size", "32", "--train-samples", "128", "--test-samples", "50", "--imprint-samples", "100"],
    "slim": ["--batch-size", "32", "--train-samples", "128", "--test-samples", "50"],
    "nest": ["--batch-size", "32", "--train-samples", "128", "--test-samples", "50"],
    "gate": ["--batch-size", "32", "--train-samples", "128", "--test-samples", "50"],
    "exits": ["--batch-size", "32", "--train-samples", "128", "--test-samples", "50"],
    # profiling length, not behaviour; the generated test split (500 images) holds 100 measured and 300 held out
    "export": ["--iterations", "5", "--no-memory", "--test-samples", "100", "--cascade-samples", "300"],
}


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def commands() -> list[str]:
    out = []
    for block in blocks("bash"):
        for line in block.splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                out.append(line)
    return out


def braces(arg: str) -> list[str]:
    """A shell's brace expansion of one word (``nest-{1,0.5}.pt``), as the README's reader's shell does it."""
    m = re.fullmatch(r"(.*)\{([^{}]*,[^{}]*)\}(.*)", arg)
    return [f"{m.group(1)}{part}{m.group(3)}" for part in m.group(2).split(",")] if m else [arg]


def concrete(line: str) -> list[str]:
    """The argv this test runs for one README line."""
    argv = [expanded for arg in shlex.split(line.replace("path/to/cifar10", "generated")) for expanded in braces(arg)]
    if argv[0] == "edgeshift":
        argv = [sys.executable, "-m", "edgeshift", *argv[1:]]
    elif argv[:3] == ["python", "-m", "edgeshift"]:
        argv = [sys.executable, *argv[1:]]
    elif argv[0] == "torchrun":
        argv = [sys.executable, "-m", "torch.distributed.run", *argv[1:]]
    runs_cli = any(a == "-m" and b == "edgeshift" for a, b in zip(argv, argv[1:]))
    sub = next((a for a in argv if a in FAST), None)
    if sub and runs_cli:
        if "--epochs" in argv:
            argv[argv.index("--epochs") + 1] = "1"
        argv += FAST[sub]
    return argv


def device_run(portfolio: Path, photos: Path, device: Path, env: dict) -> None:
    """The demo's portfolio copied alone to a new folder runs inspect, bench and run where torch cannot load."""
    device.mkdir()
    shutil.copy(portfolio, device / "portfolio.zip")
    for args in (
        ["inspect", "portfolio.zip"],
        ["bench", "portfolio.zip", "--profile", "host"],
        ["run", "portfolio.zip", "--images", str(photos)],
    ):
        proc = subprocess.run(
            [sys.executable, "-c", BLOCK_TORCH, *args],
            cwd=device,
            env=env,
            capture_output=True,
            text=True,
            timeout=HANG_GUARD_S,
        )
        assert proc.returncode == 0, (args, proc.stdout[-2000:], proc.stderr[-2000:])
    assert sorted(p.name for p in device.iterdir()) == ["portfolio.zip"]


def test_training_commands_are_shortened_wherever_the_cli_is_launched_from():
    for line in (
        "edgeshift imp --arch resnet20 --data path/to/cifar10 --epochs 10 --out r",
        "torchrun --standalone --nproc-per-node 2 -m edgeshift imp --arch resnet20 --epochs 10 --out r",
    ):
        argv = concrete(line)
        assert argv[argv.index("--epochs") + 1] == "1" and "--train-samples" in argv


def test_the_readme_lists_the_commands_this_test_runs():
    seen = {shlex.split(c)[1] for c in commands() if c.startswith("edgeshift ")}
    assert {
        "train",
        "imp",
        "prune",
        "pai",
        "layerprune",
        "slim",
        "pipeline",
        "export",
        "inspect",
        "report",
        "profiles",
        "bench",
        "run",
        "simulate",
    } <= seen
    assert "make demo" in " ".join(commands()) and "make test" in " ".join(commands())


def test_every_readme_command_and_snippet_runs(tmp_path):
    from PIL import Image

    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{BIN}:{os.environ['PATH']}"}
    # what the README says the user brings: photos, a load trace, their own device profile
    (work / "photos").mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(work / "photos" / f"p{i}.png")
    (work / "load.csv").write_text(blocks("csv")[0])
    (work / "my-device.toml").write_text(blocks("toml")[0])
    (work / "configs").mkdir()
    (work / "configs" / "demo.toml").write_text((ROOT / "configs" / "demo.toml").read_text())
    ran = []
    for line in commands():
        if line.startswith("make test"):
            continue  # this very suite
        if line.startswith("make demo"):
            argv = ["make", "-C", str(ROOT), "demo", f"OUT={tmp_path / 'demo'}"]
        else:
            argv = concrete(line)
        proc = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)
        assert proc.returncode == 0, (line, proc.stdout[-3000:], proc.stderr[-3000:])
        ran.append(line)
        if line.startswith("cp configs/demo.toml my.toml"):  # the user's edit: a short run into its own folder
            text = (work / "my.toml").read_text()
            text = re.sub(r"levels = \d+", "levels = 1", text)
            text = re.sub(r"epochs = \d+", "epochs = 1", text)
            (work / "my.toml").write_text(text.replace('dir = "out/demo"', 'dir = "out/mine"'))
        if line.startswith("make demo"):
            assert f"everything is in {tmp_path / 'demo'}" in proc.stdout
            assert (tmp_path / "demo" / "portfolio.zip").is_file() and (tmp_path / "demo" / "summary.md").is_file()
            device_run(tmp_path / "demo" / "portfolio.zip", work / "photos", tmp_path / "device", env)
    assert len(ran) == len(commands()) - 1
    for name in (
        "dense.pt",
        "pruned.pt",
        "prune.json",
        "pai.pt",
        "pai.json",
        "spai.pt",
        "pai-trained.pt",
        "lp2.pt",
        "lp2.json",
        "lp-rpi4.pt",
        "portfolio.zip",
        "portfolio-int8.zip",
        "cascade.zip",
        "bench.json",
        "bench.csv",
        "portfolio.bench.json",
        "reports/portfolio.md",
        "out/mine/summary.md",
    ):
        assert (work / name).is_file(), name
    for snippet in blocks("python"):
        proc = subprocess.run(
            [sys.executable, "-c", snippet], cwd=work, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S
        )
        assert proc.returncode == 0, (snippet, proc.stderr[-3000:])
    assert (work / "api-portfolio.zip").is_file()
