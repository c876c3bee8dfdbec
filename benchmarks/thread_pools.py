"""Interleaved timing and ONNX Runtime's thread pools: why copies of one graph can time a third apart in one run.

Every comparison the kit makes times several sessions against each other (``time_interleaved``). Each session has
its own intra-op thread pool; while one is timed, the others' worker threads sleep. This times one ONNX graph six
ways, each mode in a fresh process (ORT's global pool belongs to the process), under the device profile:

- ``alone``: one session, timed without a break (the reference);
- ``per-session``: four sessions of the same graph, interleaved, each on its own pool (how the kit timed variants
  before ``edgeshift.runtime.timing_process``);
- ``force-stop``: the same with ``session.force_spinning_stop = 1`` (workers stop spinning after each run);
- ``shared``: the same four on one process-wide pool (``set_global_thread_pool_sizes``,
  ``use_per_session_threads = False``);
- ``kit``: the four through ``edgeshift.runtime.timing_process.time_graphs``, the kit's way now (``shared``, in a
  timing process the measuring one starts);
- ``idle``: one session, timed in chunks with 1 s of sleep between them.

It prints each session's p50 per repeat and the spread (slowest / fastest copy of the same graph), and each mode's
median p50 over the ``alone`` p50 measured in the same invocation.

Given a portfolio instead, it times the portfolio's variants as ``edgeshift bench`` does, both ways, ``--repeats``
times, alternating: ``per-session`` (all variants in one process, a pool each: the kit before) and ``shared`` (the
kit now), and each variant ``alone`` in a process of its own; per variant the median p50 of each, its ratio to
alone, and the ladder each way of timing gives.

    python benchmarks/thread_pools.py MODEL.onnx [--profile host] [--repeats 3]
    python benchmarks/thread_pools.py PORTFOLIO.zip [--profile host] [--repeats 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

MODES = ("alone", "per-session", "force-stop", "shared", "kit", "idle")
COPIES = 4


def _feed(session) -> dict:
    inp = session.get_inputs()[0]
    shape = [1 if not isinstance(d, int) else d for d in inp.shape]
    return {inp.name: np.random.default_rng(0).standard_normal(shape).astype(np.float32)}


def _measure(model: bytes, mode: str, profile_name: str, repeats: int) -> list[list[float]]:
    """p50 ms of each session, per repeat, for one mode (run in its own process)."""
    import onnxruntime as ort

    from edgeshift.device_profiles import load_profile
    from edgeshift.runtime.measure import percentile_stats, time_interleaved
    from edgeshift.runtime.session import create_session, session_options, session_plan
    from edgeshift.runtime.timing_process import Graph, TimingSettings, time_graphs

    profile = load_profile(profile_name)
    settings = TimingSettings.of_profile(profile, 1)
    if mode == "kit":  # what the kit does since: time_graphs, in a timing process of its own
        feed = _feed(create_session(model, profile))
        graphs = {f"copy{i}": Graph(model, feed) for i in range(COPIES)}
        return [[s.p50_ms for s in time_graphs(graphs, profile, settings).values()] for _ in range(repeats)]
    if mode == "force-stop":
        config = {**profile.execution.session_config, "session.force_spinning_stop": "1"}
        profile = dataclasses.replace(profile, execution=dataclasses.replace(profile.execution, session_config=config))
    if mode == "shared":
        plan = session_plan(profile)
        ort.set_global_thread_pool_sizes(plan.intra_op_threads, plan.inter_op_threads)
        opts = session_options(profile, plan)  # the profile's settings, on the process's pool
        opts.use_per_session_threads = False
        sessions = {
            f"copy{i}": ort.InferenceSession(model, opts, providers=list(plan.providers)) for i in range(COPIES)
        }
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
            calls: dict[str, Callable[[], object]] = {
                name: functools.partial(s.run, None, feed) for name, s in sessions.items()
            }
            stats = time_interleaved(
                calls,
                warmup=settings.warmup,
                iterations=settings.iterations,
                rounds=settings.rounds,
                max_seconds=settings.max_seconds,
            )
            out.append([s.p50_ms for s in stats.values()])
    return out


def _portfolio(path: str, profile_name: str, repeats: int) -> None:
    """The portfolio's variants timed per-session, shared and alone (see the module's docstring)."""
    import warnings

    from edgeshift.device_profiles import load_profile
    from edgeshift.runtime.ladder import LadderPoint, build_ladder, ladder_accuracy
    from edgeshift.runtime.measure import machine_label
    from edgeshift.runtime.portfolio import Portfolio
    from edgeshift.runtime.timing_process import Graph, TimingSettings, time_graphs

    profile = load_profile(profile_name)
    portfolio = Portfolio.open(path)
    shape = [profile.serving.batch_size if d is None else d for d in portfolio.input_spec.shape]
    feed = {portfolio.input_spec.name: np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
    graphs = {n: Graph(portfolio.inflate(n), feed, portfolio.info(n).sha256) for n in portfolio.names}
    settings = TimingSettings.of_profile(profile, profile.serving.batch_size)
    runs: dict[str, list[dict]] = {"per-session": [], "shared": [], "alone": []}
    warnings.simplefilter("ignore", RuntimeWarning)  # the fallback's warning: here it is what is asked for
    for r in range(repeats):
        print(f"repeat {r + 1}/{repeats}: per-session, shared, each alone ...", flush=True)
        runs["per-session"].append(time_graphs(graphs, profile, settings, python=["/nonexistent/per-session"]))
        runs["shared"].append(time_graphs(graphs, profile, settings))
        runs["alone"].append({n: time_graphs({n: g}, profile, settings)[n] for n, g in graphs.items()})
    p50 = {mode: {n: float(np.median([run[n].p50_ms for run in rs])) for n in graphs} for mode, rs in runs.items()}
    print(f"\n{path} under {profile.name}, {machine_label()}, {time.strftime('%Y-%m-%d')}; median of {repeats}")
    print("| variant | alone p50 ms | per-session p50 ms (/ alone) | shared p50 ms (/ alone) |")
    print("|---|---|---|---|")
    for n in sorted(graphs, key=lambda n: p50["alone"][n]):
        a = p50["alone"][n]
        print(
            f"| {n} | {a:.4f} | {p50['per-session'][n]:.4f} ({p50['per-session'][n] / a:.2f}) | "
            f"{p50['shared'][n]:.4f} ({p50['shared'][n] / a:.2f}) |"
        )
    for mode in ("per-session", "shared"):
        worst = [max(p50[mode][n] / p50["alone"][n], p50["alone"][n] / p50[mode][n]) for n in graphs]
        ladders = []
        for run in runs[mode]:
            points = [
                LadderPoint(
                    n, ladder_accuracy(portfolio.info(n).top1, portfolio.info(n).reference), s.p50_ms, s.round_p50_ms
                )
                for n, s in run.items()
            ]
            ladders.append(" > ".join(build_ladder(points, profile.benchmark.ladder_min_gain)))
        print(f"\n{mode}: furthest from alone {max(worst):.2f}x; ladder per repeat:")
        for ladder in ladders:
            print(f"  {ladder}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="an ONNX file with one float input, or a portfolio (.zip)")
    ap.add_argument("--profile", default="host")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)  # one mode, in a child process
    args = ap.parse_args()
    if not Path(args.model).is_file():
        ap.error(f"model not found: {args.model} (pass an ONNX file or a portfolio, e.g. ones the exporter wrote)")
    if args.model.endswith(".zip"):
        _portfolio(args.model, args.profile, args.repeats)
        return
    with open(args.model, "rb") as f:
        model = f.read()
    if args.mode:
        print(json.dumps(_measure(model, args.mode, args.profile, args.repeats)))
        return
    results = {}
    for mode in MODES:
        print(f"timing {mode} ...", flush=True)
        proc = subprocess.run(
            [
                sys.executable,
                __file__,
                args.model,
                "--profile",
                args.profile,
                "--repeats",
                str(args.repeats),
                "--mode",
                mode,
            ],
            capture_output=True,
            text=True,
        )
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
