"""Peak memory of one ONNX Runtime session, measured in a fresh process (so nothing else muddies it).

    python -m edgeshift.runtime.memprobe MODEL.onnx [--threads 1] [--runs 5]

prints JSON: baseline RSS after imports and reading the file, and the peak RSS growth while creating the
session and running it on zeros. Torch-free.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys


def _rss_bytes() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def probe(path: str, threads: int = 1, runs: int = 5) -> dict:
    import numpy as np

    from edgeshift.device_profiles import cpu_profile

    from .session import create_session

    data = open(path, "rb").read()
    base_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    base = _rss_bytes()
    sess = create_session(data, cpu_profile(threads))
    after_create = _rss_bytes()
    inp = sess.get_inputs()[0]
    shape = [1 if not isinstance(d, int) else d for d in inp.shape]
    x = np.zeros(shape, dtype=np.float32)
    for _ in range(runs):
        sess.run(None, {inp.name: x})
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "baseline_rss": base,
        "create_growth": after_create - base,
        "peak_growth": max(peak - max(base_peak, base), _rss_bytes() - base, 0),
    }


def measure_session_memory(path: str, threads: int = 1, runs: int = 5, timeout: float = 300) -> dict:
    """Run ``probe`` in a fresh interpreter and return its figures."""
    import subprocess

    proc = subprocess.run(
        [sys.executable, "-m", "edgeshift.runtime.memprobe", str(path), "--threads", str(threads), "--runs", str(runs)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("path")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=5)
    a = ap.parse_args()
    print(json.dumps(probe(a.path, a.threads, a.runs)))


if __name__ == "__main__":
    main()
