"""What background work does to the requests of a small, fast variant: the experiment behind switch pacing.

8 client threads issue batch-1 requests on one variant (answers verified, as in runtime_switching.py) while one
background thread repeats one job; each job runs for --seconds and the clients' p99 is printed with its ratio
to no job at all, measured in the same run. Jobs:
  none          nothing (the baseline)
  sha           a sha256 of the larger variant's bytes in one call (holds no GIL)
  sha-paced:K   the same in 1 MB pieces, resting K times each piece's time after it
  build         the runtime's own build of the larger variant (inflate, create, warm), back to back
  build-paced   the same, paced as a switch up while serving is (the profile's switch_cpu_share)
--priority sets the background thread's scheduling: normal, nice10, nice19 or idle (Linux SCHED_IDLE).

    python benchmarks/switch_interference.py [--portfolio PATH] [--variant c64x] [--other c4x]
        [--jobs none sha sha-paced:0 sha-paced:3 build build-paced] [--priority normal] [--seconds 8]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import threading
import time

import numpy as np
from _common import ensure_vgg16_portfolio

from edgeshift.runtime.engine import Runtime
from edgeshift.runtime.measure import machine_label

PIECE = 1 << 20


def set_priority(kind: str) -> None:
    if kind.startswith("nice"):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), int(kind[4:]))
    elif kind == "idle":
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))


def job_fn(job: str, rt: Runtime, other: str, raw: bytes):
    if job == "none":
        return lambda: time.sleep(0.05)
    if job == "sha":
        return lambda: hashlib.sha256(raw).digest()
    if job.startswith("sha-paced:"):
        rest = float(job.split(":")[1])
        view = memoryview(raw)

        def paced():
            h = hashlib.sha256()
            for i in range(0, len(raw), PIECE):
                t = time.perf_counter()
                h.update(view[i : i + PIECE])
                time.sleep((time.perf_counter() - t) * rest)

        return paced
    if job in ("build", "build-paced"):
        pace = job == "build-paced"
        return lambda: rt._build(other, paced=pace)
    raise SystemExit(f"unknown job {job!r}; known: none, sha, sha-paced:K, build, build-paced")


def run(rt: Runtime, inputs, refs, job, priority: str, seconds: float) -> tuple[np.ndarray, int, int]:
    stop = threading.Event()
    lat, wrong, rounds = [], [0], [0]

    def client(i):
        while not stop.is_set():
            t = time.perf_counter()
            out = rt.predict(inputs[i])
            lat.append(time.perf_counter() - t)
            wrong[0] += not np.allclose(out, refs[i], rtol=1e-5, atol=1e-5)

    def background():
        set_priority(priority)
        while not stop.is_set():
            job()
            rounds[0] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(inputs))]
    threads.append(threading.Thread(target=background))
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    return np.asarray(lat) * 1e3, wrong[0], rounds[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--portfolio")
    ap.add_argument("--profile", default=str(os.path.join(os.path.dirname(__file__), "host-serving.toml")))
    ap.add_argument("--variant", default="c64x", help="the variant serving requests")
    ap.add_argument("--other", default="c4x", help="the variant the background jobs hash or build")
    ap.add_argument("--jobs", nargs="+", default=["none", "sha", "sha-paced:0", "sha-paced:3", "build", "build-paced"])
    ap.add_argument("--priority", default="normal", choices=["normal", "nice10", "nice19", "idle"])
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=8.0)
    args = ap.parse_args()
    path = ensure_vgg16_portfolio(args.portfolio)
    rng = np.random.default_rng(0)
    with Runtime(path, profile=args.profile, start=args.variant) as rt:
        shape = [1 if d is None else d for d in rt.portfolio.input_spec.shape]
        inputs = [rng.standard_normal(shape).astype(np.float32) for _ in range(args.threads)]
        refs = [rt.predict(x) for x in inputs]
        raw = rt.portfolio.inflate(args.other)
        jobs = ["none"] + [j for j in args.jobs if j != "none"]
        print(
            f"machine: {machine_label()}; {args.threads} clients on {args.variant}; background jobs on "
            f"{args.other} ({len(raw) / 2**20:.1f} MB) at priority {args.priority}; {args.seconds:g} s each"
        )
        print(f"{'job':<14} {'requests':>9} {'p50 ms':>7} {'p99 ms':>7} {'p99 vs none':>11} {'job rounds':>10}")
        base = None
        for job in jobs:
            lat, wrong, rounds = run(rt, inputs, refs, job_fn(job, rt, args.other, raw), args.priority, args.seconds)
            p50, p99 = np.percentile(lat, [50, 99])
            base = p99 if base is None else base
            assert wrong == 0, f"{wrong} answers differ from the variant's"
            print(f"{job:<14} {lat.size:9d} {p50:7.2f} {p99:7.2f} {p99 / base:11.2f} {rounds:10d}")


if __name__ == "__main__":
    main()
