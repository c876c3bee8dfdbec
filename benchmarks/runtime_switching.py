"""Switching under load: 8 client threads issue batch-1 requests while the runtime switches 50 times.

Reports failed requests, whether every answer came from one complete variant, and, per variant, the p99 of
the requests it served while switching against two baselines measured in the same run with the same clients:
  steady   - that variant alone, no switches;
  instant  - the same switch schedule replayed with every session already open (swaps cost nothing), so the
             ratio isolates what inflating, creating and warming sessions in the background costs requests.
Target: zero failures, p99 while switching <= 1.5x steady. Also prints how long switches took under this load
and how much of it they spent resting (switches to a larger variant are paced while serving: the profile's
switch_cpu_share, or --switch-cpu-share; 1 turns pacing off).

    python benchmarks/runtime_switching.py [--portfolio PATH] [--profile host] [--threads 8] [--switches 50]
                                           [--switch-cpu-share 0.25] [--preload]
"""

from __future__ import annotations

import argparse
import threading
import time

import numpy as np
from _common import ensure_vgg16_portfolio

from edgeshift.runtime.engine import Runtime
from edgeshift.runtime.measure import machine_label


def run_phase(rt: Runtime, inputs, refs, seconds: float | None, switcher=None):
    lat, bad, errors = [], [0], []  # lat: (variant, seconds)
    stop = threading.Event()
    lock = threading.Lock()

    def client(i):
        x = inputs[i]
        while not stop.is_set():
            t = time.perf_counter()
            try:
                out, name = rt.predict_with_variant(x)
            except Exception as exc:
                errors.append(exc)
                continue
            dt = time.perf_counter() - t
            ok = np.allclose(out, refs[name][i], rtol=1e-5, atol=1e-5)
            with lock:
                lat.append((name, dt))
                bad[0] += not ok

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(inputs))]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    if switcher is not None:
        switcher()
    else:
        assert seconds is not None  # a phase without a switcher runs for a set time
        time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    return lat, bad[0], errors, time.perf_counter() - t0


def by_variant(lat) -> dict[str, np.ndarray]:
    out: dict[str, list[float]] = {}
    for name, dt in lat:
        out.setdefault(name, []).append(dt * 1e3)
    return {k: np.asarray(v) for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--portfolio")
    ap.add_argument("--profile", default="host")
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--switches", type=int, default=50)
    ap.add_argument("--preload", action="store_true", help="keep neighbours warm (standby sessions)")
    ap.add_argument(
        "--switch-cpu-share",
        type=float,
        help="share of the time a switch up works while serving (default: the profile's; 1 = no pacing)",
    )
    args = ap.parse_args()
    path = ensure_vgg16_portfolio(args.portfolio)
    rng = np.random.default_rng(0)
    inputs = None
    with Runtime(
        path, profile=args.profile, preload_neighbours=args.preload, switch_cpu_share=args.switch_cpu_share
    ) as rt:
        shape = [1 if d is None else d for d in rt.portfolio.input_spec.shape]
        inputs = [rng.standard_normal(shape).astype(np.float32) for _ in range(args.threads)]
        refs = {}
        for name in rt.variants:  # reference answers of every complete variant, computed up front
            rt.switch_to(name, reason="reference")
            refs[name] = [rt.predict(x) for x in inputs]
        start = rt.portfolio.median_variant
        rt.switch_to(start, reason="start")
        names = rt.variants
        order = [n for n in names if n != start] + [start]

        def switch_many():
            for k in range(args.switches):
                rt.switch_to(order[k % len(order)], reason="benchmark")

        switching, bad_s, err_s, dur = run_phase(rt, inputs, refs, None, switch_many)
        t_start = rt._t0 + min(s["at"] for s in rt.stats()["switch_log"] if s["reason"] == "benchmark")
        schedule = [
            (s["at"] + s["total_ms"] / 1e3 - (t_start - rt._t0), s["target"])
            for s in rt.stats()["switch_log"]
            if s["reason"] == "benchmark"
        ]
        # every session open at once (benchmark only: reaches into the runtime to swap prebuilt slots)
        slots = {n: rt._build(n).slot for n in names}
        rt._active = slots[start]

        def replay():
            t0 = time.perf_counter()
            for at, target in schedule:
                time.sleep(max(0.0, at - (time.perf_counter() - t0)))
                rt._active = slots[target]

        instant, bad_i, err_i, _ = run_phase(rt, inputs, refs, None, replay)
        slots.clear()  # release every prebuilt session
        steady, bad0, err0 = [], 0, []
        for name in names:  # each variant alone, for as long as it was active on average while switching
            rt.switch_to(name, reason="steady")
            lat, b, e, _ = run_phase(rt, inputs, refs, max(dur / len(names), 3.0))
            steady += lat
            bad0 += b
            err0 += e
        st = rt.stats()
        share = rt.switch_cpu_share
    sw = [s for s in st["switch_log"] if s["reason"] == "benchmark"]
    print(
        f"machine: {machine_label()}; profile {args.profile}; {args.threads} client threads; "
        f"portfolio {path.name} ({', '.join(names)}); preload neighbours: {args.preload}; "
        f"switch CPU share while serving: {share}"
    )
    print(
        f"switching phase: {len(sw)} switches in {dur:.1f} s, {len(switching)} requests, "
        f"{len(err_s)} failed, {bad_s} answers not from a complete variant"
    )
    print(
        f"steady phases: {len(steady)} requests, {len(err0)} failed, {bad0} wrong; instant-swap replay: "
        f"{len(instant)} requests, {len(err_i)} failed, {bad_i} wrong"
    )
    sv, st_v, in_v = by_variant(switching), by_variant(steady), by_variant(instant)
    worst_steady = worst_instant = 0.0
    print(
        f"{'variant':<8} {'steady p99':>10} {'instant p99':>11} {'switching p50':>13} {'p99':>7} "
        f"{'vs steady':>9} {'vs instant':>10} {'requests':>9}"
    )
    for name in names:
        if name not in sv or len(sv[name]) < 100 or name not in in_v:
            continue
        a, i, b = np.percentile(st_v[name], 99), np.percentile(in_v[name], 99), np.percentile(sv[name], [50, 99])
        worst_steady, worst_instant = max(worst_steady, b[1] / a), max(worst_instant, b[1] / i)
        print(
            f"{name:<8} {a:10.2f} {i:11.2f} {b[0]:13.2f} {b[1]:7.2f} {b[1] / a:9.2f} {b[1] / i:10.2f} "
            f"{len(sv[name]):9d}"
        )
    print(
        f"worst p99 ratio while switching: {worst_steady:.2f}x vs steady, {worst_instant:.2f}x vs the instant-swap "
        "replay (target <= 1.5x)"
    )
    print(
        f"{'switch':<12} {'n':>3} {'total':>8} {'inflate':>8} {'rested':>8} {'create':>8} {'warm':>6}   "
        "(medians under load, ms; rested is part of inflate)"
    )
    for src, dst in sorted(
        {(s["source"], s["target"]) for s in sw}, key=lambda p: (names.index(p[0]), names.index(p[1]))
    ):
        rec = [s for s in sw if (s["source"], s["target"]) == (src, dst)]
        m = {
            k: np.median([s[k] for s in rec]) for k in ("total_ms", "inflate_ms", "yielded_ms", "create_ms", "warm_ms")
        }
        print(
            f"{src + '>' + dst:<12} {len(rec):3d} {m['total_ms']:8.1f} {m['inflate_ms']:8.1f} "
            f"{m['yielded_ms']:8.1f} {m['create_ms']:8.1f} {m['warm_ms']:6.1f}"
        )
    print(
        f"switch time under load (request to swap) median {np.median([s['total_ms'] for s in sw]):.1f} ms, max "
        f"{max(s['total_ms'] for s in sw):.1f} ms; of which paced (slept to leave the CPU to requests) median "
        f"{np.median([s['yielded_ms'] for s in sw]):.1f} ms"
    )


if __name__ == "__main__":
    main()
