"""Interleaved timing and ONNX Runtime's thread pools: why copies of one graph can time a third apart in one run.

Every comparison the kit makes times several sessions against each other (``time_interleaved``). Each session has
its own intra-op thread pool; while one is timed, the others' worker threads sleep. This times one ONNX graph four
ways, each mode in a fresh process (ORT's global pool belongs to the process), under the device profile:

- ``alone``: one session, timed without a break (the reference);
- ``per-session``: four sessions of the same graph, interleaved as the kit times variants (what it does today);
- ``force-stop``: the same with ``session.force_spinning_stop = 1`` (workers stop spinning after each run);
- ``shared``: the same four on one process-wide pool (``set_global_thread_pool_sizes``,
  ``use_per_session_threads = False``);
- ``idle``: one session, timed in chunks with 1 s of sleep between them.

It prints each session's p50 per repeat and the spread (slowest / fastest copy of the same graph), and each mode's
median p50 over the ``alone`` p50 measured in the same invocation.

    python benchmarks/thread_pools.py MODEL.onnx [--profile host] [--repeats 3]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

MODES = ("alone", "per-session", "force-stop", "shared", "idle")
COPIES = 4


def _feed(session) -> dict:
    inp = session.get_inputs()[0]
    shape = [1 if not isinstance(d, int) else d for d in inp.shape]
    return {inp.name: np.random.default_rng(0).standard_normal(shape).astype(np.float32)}


def _measure(model: bytes, mode: str, profile_name: str, repeats: int) -> list[list[float]]:
    """p50 ms of each session, per repeat, for one mode (run in its own process)."""
    import onnxruntime as ort

    from edgeshift.device_profiles import load_profile
    from edgeshift.exporter.profile import time_interleaved_sessions
    from edgeshift.runtime.measure import percentile_stats
    from edgeshift.runtime.session import create_session, session_options, session_plan

    profile = load_profile(profile_name)
    if mode == "force-stop":
        config = {**profile.execution.session_config, "session.force_spinning_stop": "1"}
        profile = dataclasses.replace(profile, execution=dataclasses.replace(profile.execution, session_config=config))
    if mode == "shared":
        plan = session_plan(profile)
        ort.set_global_thread_pool_sizes(plan.intra_op_threads, plan.inter_op_threads)
        opts = session_options(profile, plan)  # the profile's settings, on the process's pool
        opts.use_per_session_threads = False
        sessions = {f"copy{i}": ort.InferenceSession(model, opts, providers=list(plan.providers))
                    for i in range(COPIES)}
    else:
        copies = 1 if mode in ("alone", "idle") else COPIES
        sessions = {f"copy{i}": create_session(model, profile) for i in range(copies)}
    feed = _feed(next(iter(sessions.values())))
    out = []
    for _ in range(repeats):
        if mode == "idle":
            session, samples = sessions["copy0"], []
            for _ in range(5):
                time.sleep(1.0)
                for _ in range(200):
                    t = time.perf_counter()
                    session.run(None, feed)
                    samples.append(time.perf_counter() - t)
            out.append([percentile_stats(samples, 1).p50_ms])
        else:
            stats = time_interleaved_sessions(sessions, feed, profile, batch=1)
            out.append([s.p50_ms for s in stats.values()])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="an ONNX file with one float input")
    ap.add_argument("--profile", default="host")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)  # one mode, in a child process
    args = ap.parse_args()
    if not Path(args.model).is_file():
        ap.error(f"model not found: {args.model} (pass an ONNX file, e.g. one the exporter wrote)")
    with open(args.model, "rb") as f:
        model = f.read()
    if args.mode:
        print(json.dumps(_measure(model, args.mode, args.profile, args.repeats)))
        return
    results = {}
    for mode in MODES:
        print(f"timing {mode} ...", flush=True)
        proc = subprocess.run([sys.executable, __file__, args.model, "--profile", args.profile, "--repeats",
                               str(args.repeats), "--mode", mode], capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"{mode}: " + (proc.stderr.strip().splitlines() or ["failed"])[-1])
        results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    alone = float(np.median([p for rep in results["alone"] for p in rep]))
    print(f"\n{args.model} under {args.profile}, {time.strftime('%Y-%m-%d')}; alone p50 {alone:.4f} ms")
    print("| mode | p50 per copy, per repeat (ms) | spread (slowest / fastest copy) | median p50 / alone |")
    print("|---|---|---|---|")
    for mode, reps in results.items():
        flat = [p for rep in reps for p in rep]
        spread = max(max(rep) / min(rep) for rep in reps)
        cells = "; ".join(" ".join(f"{p:.4f}" for p in rep) for rep in reps)
        print(f"| {mode} | {cells} | {spread:.2f} | {float(np.median(flat)) / alone:.2f} |")


if __name__ == "__main__":
    main()
