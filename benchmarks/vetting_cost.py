"""What loading an untrusted portfolio safely costs: ``Runtime`` opened with every variant first made and run once
in a process of its own under the profile's limits (``vet=True``, the default) against ``vet=False``, interleaved,
and the predict path's latency after each (it is the same code either way: this shows it did not move).

    python benchmarks/vetting_cost.py [--portfolio PATH] [--profile host] [--repeats 7] [--calls 2000]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from _common import ensure_vgg16_portfolio

from edgeshift import device_profiles
from edgeshift.runtime import vetting
from edgeshift.runtime.engine import Runtime
from edgeshift.runtime.measure import machine_label


def open_and_predict(path, profile, vet: bool, calls: int) -> tuple[float, float]:
    """(ms to open the runtime, p50 ms of ``calls`` batch-1 predictions on its first variant)."""
    vetting._vetted.clear()  # a fresh process's state: nothing vetted yet
    t = time.perf_counter()
    rt = Runtime(path, profile=profile, vet=vet)
    opened = (time.perf_counter() - t) * 1e3
    with rt:
        shape = [1 if d is None else d for d in rt.portfolio.input_spec.shape]
        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        for _ in range(20):
            rt.predict(x)
        samples = []
        for _ in range(calls):
            t = time.perf_counter()
            rt.predict(x)
            samples.append(time.perf_counter() - t)
    return opened, float(np.median(samples)) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--portfolio")
    ap.add_argument("--profile", default="host")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--calls", type=int, default=2000)
    args = ap.parse_args()
    path = ensure_vgg16_portfolio(args.portfolio)
    profile = device_profiles.load_profile(args.profile)
    results: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
    for r in range(args.repeats):
        for vet in (True, False) if r % 2 == 0 else (False, True):
            results[vet].append(open_and_predict(path, profile, vet, args.calls))
    med = statistics.median
    print(f"machine: {machine_label()}; profile {profile.name}; portfolio {path}; medians of {args.repeats}")
    base_open, base_p50 = (med(x[i] for x in results[False]) for i in (0, 1))
    for vet in (False, True):
        opened, p50 = (med(x[i] for x in results[vet]) for i in (0, 1))
        print(
            f"vet={vet!s:<5}  open {opened:8.1f} ms ({opened / base_open:.2f}x)   predict p50 {p50:.4f} ms "
            f"({p50 / base_p50:.2f}x)"
        )


if __name__ == "__main__":
    main()
