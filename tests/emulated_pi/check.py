"""The emulated-Pi check: the device side, installed from a wheel as a Pi user gets it, run on a Raspberry Pi's CPU.

What it does (``make pi-check``; every download goes into ``--cache``, nothing into the repository):

1. QEMU's user-mode emulator, statically linked, from Debian trixie's ``qemu-user`` (10.x emulates
   ``/proc/cpuinfo``; bookworm's 7.2 passes the host's x86 one through, on which onnxruntime's CPU detection
   crashes).
2. Pi OS userlands without installing anything on the host: Debian's arm64 ``python3.11`` (bookworm, what Pi OS
   bookworm ships) and ``python3.13`` (trixie), their dependency closure fetched by apt into a private apt
   directory and unpacked with ``dpkg -x``.
3. The wheel, built from a clean copy of this working tree, installed with PyPI's aarch64 wheels of its
   dependencies (``pip install --target --platform ... --only-binary=:all:``): the device install, no build side.
4. On ``cortex-a72`` (Pi 4) and ``cortex-a76`` (Pi 5), under each userland: ``edgeshift --help``, ``inspect``,
   ``bench --profile rpi4|rpi5 --json``, ``run`` on ``.npy`` inputs, ``simulate``, and the ``Runtime`` API with
   switches through every variant (``on_device.py``), each answer compared with the x86 host's for the same
   portfolio (FP32 logits to 1e-4, the INT8 variant's to a few quantisation steps, with the same top-1); and
   ``bench --save`` of the same portfolio as built on x86 for the Pi, whose INT8 variant waits for the device's
   timing: the device keeps or drops it, saying why (which, emulation cannot say: its speed is not a Pi's).

It fails on a crash (SIGILL, segfault), a wrong answer, or any import of torch or onnx on the device. What
emulation cannot show: speed (emulated timings say nothing about a real Pi), the core count (QEMU reports the
host's), and CPU features QEMU's models have but a real Pi 4 lacks (its Cortex-A72 model has AES/SHA).

usage: python tests/emulated_pi/check.py [--onnxruntime 1.21.0] [--cpu cortex-a72] [--userland bookworm]
       [--cache build/emulated-pi] [--matrix 1.16.3,1.20.1,...]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT / "tests"))

KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
MIRROR = "http://deb.debian.org/debian"
USERLANDS = {"bookworm": "3.11", "trixie": "3.13"}  # Pi OS bookworm's Python; trixie's
CPUS = {"cortex-a72": "rpi4", "cortex-a76": "rpi5"}  # the CPU QEMU emulates -> the profile of that Pi
PLATFORMS = ["manylinux_2_36_aarch64", "manylinux_2_28_aarch64", "manylinux_2_17_aarch64", "manylinux2014_aarch64"]
RUNTIME_DEPS = ["numpy>=1.23", "typer>=0.12", "psutil>=5.9"]  # the wheel's own, less onnxruntime (see install_site)
MARKER = "EDGESHIFT-PI-CHECK"
COMMAND_TIMEOUT_S = 600


class CheckFailed(Exception):
    """One step of the check went wrong: the message says which and why."""


def say(message: str) -> None:
    print(f"[pi-check {time.strftime('%H:%M:%S')}] {message}", flush=True)


def sh(cmd: list[str], *, cwd: Path | None = None, env: dict | None = None, timeout: float = COMMAND_TIMEOUT_S):
    """Run a host command; a failure is a CheckFailed naming it, with the end of its output."""
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise CheckFailed(f"`{' '.join(map(str, cmd))}` exited {proc.returncode}:\n{tail}")
    return proc


# -- downloads (cached) --------------------------------------------------------------------------------------


def apt_download(cache: Path, suite: str, arch: str, packages: list[str], *, closure: bool) -> list[Path]:
    """Debian packages of ``arch`` from ``suite`` into a private apt directory (the host's apt is not touched);
    ``closure``: with every package they depend on, as an empty system would need them."""
    root = cache / f"apt-{suite}-{arch}"
    for sub in (
        "etc/apt/apt.conf.d",
        "etc/apt/preferences.d",
        "etc/apt/sources.list.d",
        "var/lib/apt/lists/partial",
        "var/cache/apt/archives/partial",
        "var/lib/dpkg",
    ):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "var/lib/dpkg/status").touch()
    (root / "etc/apt/sources.list").write_text(f"deb [arch={arch} signed-by={KEYRING}] {MIRROR} {suite} main\n")
    opts = [
        "-o",
        f"Dir={root}",
        "-o",
        f"Dir::State::status={root}/var/lib/dpkg/status",
        "-o",
        f"APT::Architecture={arch}",
        "-o",
        f"APT::Architectures::={arch}",
        "-o",
        "Debug::NoLocking=1",
        "-o",
        "Acquire::Languages=none",
        "-o",
        "APT::Sandbox::User=root",
        "-q",
    ]
    archives = root / "var/cache/apt/archives"
    sh(["apt-get", *opts, "update"])
    if closure:
        sh(["apt-get", *opts, "-y", "--download-only", "install", *packages])
    else:
        sh(["apt-get", *opts, "download", *packages], cwd=archives)
    return sorted(archives.glob("*.deb"))


def fetch_qemu(cache: Path) -> Path:
    qemu = cache / "qemu" / "usr/bin/qemu-aarch64"
    if not qemu.is_file():
        say("fetching QEMU (Debian trixie's qemu-user, statically linked)")
        for deb in apt_download(cache, "trixie", "amd64", ["qemu-user"], closure=False):
            sh(["dpkg", "-x", str(deb), str(cache / "qemu")])
    version = sh([str(qemu), "--version"]).stdout.splitlines()[0]
    say(version)
    return qemu


def fetch_userland(cache: Path, suite: str) -> Path:
    """A Pi OS-like arm64 root with ``python3.X``: Debian's packages unpacked, nothing installed."""
    rootfs = cache / f"rootfs-{suite}"
    done = rootfs / ".complete"
    if not done.is_file():
        say(f"fetching Debian {suite}'s arm64 python{USERLANDS[suite]} and what it needs")
        shutil.rmtree(rootfs, ignore_errors=True)
        for deb in apt_download(cache, suite, "arm64", [f"python{USERLANDS[suite]}"], closure=True):
            sh(["dpkg", "-x", str(deb), str(rootfs)])
        for top in ("bin", "lib", "sbin"):  # merged /usr (trixie): the links base-files would have made
            if (rootfs / "usr" / top).is_dir() and not (rootfs / top).exists():
                (rootfs / top).symlink_to(f"usr/{top}")
        done.touch()
    return rootfs


def build_wheel(out: Path) -> Path:
    """The wheel, from a clean copy of this working tree (tracked and untracked files git does not ignore)."""
    files = sh(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT).stdout.split("\0")
    with tempfile.TemporaryDirectory(prefix="edgeshift-src-") as tmp:
        for name in filter(None, files):
            if (ROOT / name).is_file():
                (Path(tmp) / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / name, Path(tmp) / name)
        out.mkdir(parents=True, exist_ok=True)
        for old in out.glob("edgeshift-*.whl"):
            old.unlink()
        sh([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), tmp])
    (wheel,) = out.glob("edgeshift-*.whl")
    return wheel


def install_site(cache: Path, suite: str, wheel: Path, onnxruntime: str | None) -> Path:
    """The device install for ``suite``'s Python into a folder: the wheel with PyPI's aarch64 wheels of its
    dependencies. ``onnxruntime``: a version to pin, even one the wheel's range excludes (to show why it does)."""
    py = USERLANDS[suite]
    site = cache / f"site-{suite}-{onnxruntime or 'resolved'}"
    shutil.rmtree(site, ignore_errors=True)
    base = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "-q",
        "--target",
        str(site),
        "--python-version",
        py,
        "--implementation",
        "cp",
        "--abi",
        f"cp{py.replace('.', '')}",
        "--only-binary=:all:",
    ]
    base += [arg for p in PLATFORMS for arg in ("--platform", p)]
    if onnxruntime is None:
        sh([*base, str(wheel)])
    else:
        sh([*base, "--no-deps", str(wheel)])
        sh([*base, *RUNTIME_DEPS, f"onnxruntime=={onnxruntime}"])
    return site


# -- the portfolio and the host's answers ----------------------------------------------------------------------


def make_portfolio(work: Path) -> tuple[Path, Path, Path, Path, Path]:
    """A portfolio of three FP32 variants and a QDQ INT8 one (the Pi's scheme), .npy images, a batch for the API,
    a load trace, and the same portfolio as built on x86 for the Pi (its INT8 variant untimed for the device):
    (portfolio, images folder, inputs.npy, trace.csv, cross-built portfolio)."""
    from onnx_helpers import manifest_for, tiny_classifier, write_zip

    from edgeshift.exporter.quantize import Calibration, Int8Scheme, quantize_onnx
    from edgeshift.runtime.manifest import variant_file

    rng = np.random.default_rng(0)
    blobs = {f"w{w}": tiny_classifier(w, depth=3) for w in (8, 16, 32)}
    calibration = Calibration(rng.standard_normal((16, 3, 8, 8)).astype(np.float32))
    blobs["w32-int8"] = quantize_onnx(blobs["w32"], calibration, Int8Scheme("qdq", "int8"), name="w32")
    path = work / "pi.zip"
    write_zip(path, manifest_for(blobs), {variant_file(n): d for n, d in blobs.items()})
    cross = manifest_for(blobs)
    for v in cross["variants"]:
        if v["name"] == "w32-int8":
            v.update(
                precision="int8",
                device_timing="pending",
                quantization={
                    "source": "w32",
                    "format": "qdq",
                    "activations": "int8",
                    "calibration_samples": 16,
                    "calibration_method": "minmax",
                },
            )
    write_zip(work / "pi-cross.zip", cross, {variant_file(n): d for n, d in blobs.items()})
    images = work / "images"
    images.mkdir()
    for i in range(4):
        np.save(images / f"img{i}.npy", rng.integers(0, 255, (8, 8, 3), dtype=np.uint8))
    inputs = work / "inputs.npy"
    np.save(inputs, rng.standard_normal((2, 3, 8, 8)).astype(np.float32))
    trace = work / "trace.csv"
    trace.write_text("time_s,rps,cpu_share\n0,5,1\n2,50,1\n4,5,1\n")
    return path, images, inputs, trace, work / "pi-cross.zip"


@dataclass
class Commands:
    """The device commands the check runs, each as ``python -m edgeshift ...`` arguments (or a script)."""

    portfolio: Path
    images: Path
    inputs: Path
    trace: Path
    out: Path
    cross: Path

    def for_profile(self, profile: str, tag: str) -> dict[str, list[str]]:
        return {
            "help": ["-m", "edgeshift", "--help"],
            "inspect": ["-m", "edgeshift", "inspect", str(self.portfolio)],
            "bench": [
                "-m",
                "edgeshift",
                "bench",
                str(self.portfolio),
                "--profile",
                profile,
                "--json",
                str(self.out / f"bench-{tag}.json"),
            ],
            "run": [
                "-m",
                "edgeshift",
                "run",
                str(self.portfolio),
                "--images",
                str(self.images),
                "--profile",
                profile,
                "--variant",
                "w16",
                "--top",
                "2",
            ],
            "run-int8": [
                "-m",
                "edgeshift",
                "run",
                str(self.portfolio),
                "--images",
                str(self.images),
                "--profile",
                profile,
                "--variant",
                "w32-int8",
                "--top",
                "2",
            ],
            "simulate": [
                "-m",
                "edgeshift",
                "simulate",
                str(self.portfolio),
                "--trace",
                str(self.trace),
                "--profile",
                profile,
                "--policy",
                "qps-trend",
            ],
            "api": [str(HERE / "on_device.py"), str(self.portfolio), str(self.inputs), profile],
            "bench-save": ["-m", "edgeshift", "bench", str(self.cross), "--profile", profile, "--save"],
        }


@dataclass
class Outcome:
    userland: str
    cpu: str
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0


def run_python(python: list[str], args: list[str], env: dict, cwd: Path) -> subprocess.CompletedProcess:
    """Run in ``cwd`` (not the checkout, whose ``edgeshift/`` folder ``-m`` would otherwise pick up)."""
    return subprocess.run([*python, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)


def crash_name(returncode: int) -> str:
    if returncode < 0:
        import signal

        return f"killed by {signal.Signals(-returncode).name}"
    return f"exit {returncode}"


# -- comparing answers -------------------------------------------------------------------------------------------


def parse_run(stdout: str) -> list[tuple[str, list[tuple[str, float]]]]:
    rows = []
    for line in stdout.splitlines():
        parts = line.split("\t")
        if len(parts) > 1:
            rows.append((Path(parts[0]).name, [(p.rsplit(" ", 1)[0], float(p.rsplit(" ", 1)[1])) for p in parts[1:]]))
    return rows


def compare(
    name: str, device: subprocess.CompletedProcess, host: subprocess.CompletedProcess, out: Path, tag: str
) -> str | None:
    """What is wrong with the device's answer to command ``name`` (None: it matches the host's)."""
    if device.returncode != 0:
        tail = "\n    ".join((device.stdout + device.stderr).strip().splitlines()[-6:])
        return f"{name}: {crash_name(device.returncode)}\n    {tail}"
    if MARKER in device.stderr:
        return f"{name}: " + "; ".join(line for line in device.stderr.splitlines() if MARKER in line)
    if name in ("help", "inspect") and device.stdout != host.stdout:
        return f"{name}: output differs from the host's"
    if name.startswith("run"):
        d, h = parse_run(device.stdout), parse_run(host.stdout)
        if [(f, [lab for lab, _ in best]) for f, best in d] != [(f, [lab for lab, _ in best]) for f, best in h]:
            return f"{name}: labels differ from the host's: {d} vs {h}"
        worst = max(abs(p - q) for (_, a), (_, b) in zip(d, h) for (_, p), (_, q) in zip(a, b))
        if worst > 0.002:
            return f"{name}: probabilities differ from the host's by {worst:.4f}"
    if name == "bench":
        doc = json.loads((out / f"bench-{tag}.json").read_text())
        ex = doc["execution"]
        if (ex["lead"], ex["intra_op_threads"]) != ("CPUExecutionProvider", 4):
            return f"bench: ran {ex['lead']} on {ex['intra_op_threads']} intra-op threads, not the CPU provider on 4"
        rows = {r["name"]: r["sha256"] for r in doc["variants"]}
        host_rows = {r["name"]: r["sha256"] for r in json.loads((out / "bench-host.json").read_text())["variants"]}
        if rows != host_rows:
            return "bench: measured other variants than the host"
    if name == "bench-save":  # the device keeps or drops the INT8 variant built for it elsewhere, saying why
        starts = tuple(f"w32-int8: {verdict} (built on another CPU" for verdict in ("kept", "dropped"))
        decided = [line for line in device.stdout.splitlines() if line.startswith(starts)]
        if len(decided) != 1 or "; " not in decided[0]:
            return "bench-save: no keep-or-drop line with its reason for the cross-built w32-int8"
    if name == "api":
        d, h = json.loads(device.stdout), json.loads(host.stdout)
        if d["torch_or_onnx_loaded"]:
            return f"api: loaded {d['torch_or_onnx_loaded']}"
        if d["switches"] != h["switches"]:
            return f"api: switched {d['switches']}, the host {h['switches']}"
        for variant, logits in h["logits"].items():
            a, b = np.asarray(d["logits"][variant]), np.asarray(logits)
            tol = 0.25 if variant.endswith("int8") else 1e-4 * max(1.0, float(np.abs(b).max()))
            if (a.argmax(1) != b.argmax(1)).any() or np.abs(a - b).max() > tol:
                worst = np.abs(a - b).max()
                return f"api: {variant}'s logits differ from the host's by {worst:.3g} (allowed {tol:.3g})"
    return None


# -- the check ---------------------------------------------------------------------------------------------------


def check(cache: Path, onnxruntime: str | None, userlands: list[str], cpus: list[str]) -> list[Outcome]:
    started = time.perf_counter()
    cache.mkdir(parents=True, exist_ok=True)
    qemu = fetch_qemu(cache)
    rootfs = {suite: fetch_userland(cache, suite) for suite in userlands}
    say("building the wheel from a clean copy of the working tree")
    wheel = build_wheel(cache / "dist")
    work = Path(tempfile.mkdtemp(prefix="edgeshift-pi-"))
    try:
        portfolio, images, inputs, trace, cross = make_portfolio(work)
        commands = Commands(portfolio, images, inputs, trace, work, cross)
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
        say("the host's answers (x86, this checkout)")
        host = {}
        for cpu, profile in CPUS.items():
            for name, args in commands.for_profile(profile, "host").items():
                host[profile, name] = run_python([sys.executable], args, env, work)
                if host[profile, name].returncode != 0:
                    raise CheckFailed(f"the host itself fails `{name}`: {host[profile, name].stderr.strip()[-400:]}")
        outcomes = []
        for suite in userlands:
            say(
                f"installing the wheel for Python {USERLANDS[suite]} ({suite}) with aarch64 wheels, "
                f"onnxruntime {onnxruntime or '(resolved by pip)'}"
            )
            try:
                site = install_site(cache, suite, wheel, onnxruntime)
            except CheckFailed as exc:
                outcomes += [Outcome(suite, cpu, [f"install: {exc}"]) for cpu in cpus]
                say(f"  cannot install: {str(exc).splitlines()[-1]}")
                continue
            ort_version = next(site.glob("onnxruntime-*.dist-info")).name.removesuffix(".dist-info").split("-")[1]
            device_env = {**env, "PYTHONPATH": f"{HERE}{os.pathsep}{site}", "PYTHONDONTWRITEBYTECODE": "1"}
            python_exe = rootfs[suite] / f"usr/bin/python{USERLANDS[suite]}"
            for cpu in cpus:
                profile = CPUS[cpu]
                outcome, t0 = Outcome(suite, cpu), time.perf_counter()
                python = [str(qemu), "-cpu", cpu, "-L", str(rootfs[suite]), str(python_exe)]
                for name, args in commands.for_profile(profile, f"{suite}-{cpu}").items():
                    problem = compare(
                        name, run_python(python, args, device_env, work), host[profile, name], work, f"{suite}-{cpu}"
                    )
                    if problem:
                        outcome.failures.append(problem)
                        if "killed by" in problem:
                            break  # a crash at import ends every later command the same way
                outcome.seconds = time.perf_counter() - t0
                status = "ok" if not outcome.failures else "FAILED: " + outcome.failures[0]
                say(
                    f"  {suite} python{USERLANDS[suite]} on {cpu} ({profile}), onnxruntime {ort_version}: "
                    f"{status} ({outcome.seconds:.0f} s)"
                )
                outcomes.append(outcome)
        say(f"done in {time.perf_counter() - started:.0f} s")
        return outcomes
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--cache",
        type=Path,
        default=ROOT / "build" / "emulated-pi",
        help="where downloads and unpacked userlands are kept (reused by later runs)",
    )
    parser.add_argument("--onnxruntime", help="pin this onnxruntime version (default: what pip resolves)")
    parser.add_argument("--matrix", help="comma-separated onnxruntime versions: run the check for each, print a table")
    parser.add_argument("--userland", action="append", choices=sorted(USERLANDS), help="default: all")
    parser.add_argument("--cpu", action="append", choices=sorted(CPUS), help="default: all")
    args = parser.parse_args(argv)
    userlands, cpus = args.userland or list(USERLANDS), args.cpu or list(CPUS)
    try:
        if args.matrix:
            table = {}
            for version in args.matrix.split(","):
                for o in check(args.cache, version, userlands, cpus):
                    table[version, o.userland, o.cpu] = o
            print_matrix(table, userlands, cpus)
            return 0
        outcomes = check(args.cache, args.onnxruntime, userlands, cpus)
    except CheckFailed as exc:
        print(f"pi-check: {exc}", file=sys.stderr)
        return 2
    failed = [o for o in outcomes if o.failures]
    for o in failed:
        for f in o.failures:
            print(f"pi-check: {o.userland} on {o.cpu}: {f}", file=sys.stderr)
    return 1 if failed else 0


def print_matrix(table: dict, userlands: list[str], cpus: list[str]) -> None:
    columns = [(u, c) for u in userlands for c in cpus]
    print("| onnxruntime | " + " | ".join(f"py{USERLANDS[u]} {c}" for u, c in columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for version in dict.fromkeys(v for v, _, _ in table):
        cells = []
        for u, c in columns:
            o = table[version, u, c]
            if not o.failures:
                cells.append("ok")
            elif o.failures[0].startswith("install"):
                cells.append("no wheel")
            else:
                cells.append("**" + o.failures[0].split("\n")[0][:60] + "**")
        print(f"| {version} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    sys.exit(main())
