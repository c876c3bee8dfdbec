"""The confidence cascade on CIFAR-10: mean and p95 time per input against the dense model, at its top-1.

Exports the given checkpoints (or run folders) with ``--cascade``: its thresholds are calibrated on
``--cascade-samples`` test-split images, and every figure here comes from the other ``--test-samples`` test images.
Then, in one process under the profile, every measured image goes through the dense model alone, through the best
static variant (the fastest by the export's timing whose top-1 there is within the cascade's loss budget of the
dense model's), and through the cascade (the runtime's cascade mode), one image per call, warm-up excluded: top-1 of
each, per-input latency (mean, p50, p95), where the inputs left, and the MACs per input. Interleaved in rounds as the
kit's timing is (``runtime.measure.time_interleaved``): each takes ``--round-images`` consecutive images in turn, the
order rotating per round, so a drift of the machine lands on all alike while each serves as it would alone on a
device; rotating per image instead (``--round-images 1``) makes every call start with the other models' weights in
the caches (the ResNet-20's INT8 steps then cost twice their time in rounds).
Resumable: an existing portfolio is reused.

    python benchmarks/cascade_cifar.py /tmp/nest-bench/resnet20/joint/variants/nest-*.pt --data \\
        ../shared/datasets/cifar10 --out /tmp/cascade-bench/resnet20 [--int8] [--test-samples 5000]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

import numpy as np

from edgeshift import device_profiles
from edgeshift.exporter.profile import time_interleaved_models
from edgeshift.pruner.data import load_dataset
from edgeshift.runtime.cascade import expected_latency, spin_stopping
from edgeshift.runtime.engine import Runtime
from edgeshift.runtime.measure import machine_label
from edgeshift.runtime.portfolio import Portfolio

WARMUP = 50


def best_static(variants, loss_points: float) -> str | None:
    """The fastest variant by the export's timing (p50) whose export-time top-1 is within ``loss_points`` of the
    reference's: the one a static deployment under the same budget would ship. None when none is."""
    ref = next(v for v in variants if v.reference)
    if ref.top1 is None:
        return None
    fits = [
        v
        for v in variants
        if not v.reference and v.top1 is not None and v.record.latency and v.top1 >= ref.top1 - loss_points / 100
    ]
    return min(fits, key=lambda v: v.record.latency.p50_ms).name if fits else None


def run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sources", nargs="+", help="Checkpoints or run folders for `edgeshift export`.")
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--test-samples", type=int, default=5000)
    ap.add_argument("--cascade-samples", type=int, default=5000)
    ap.add_argument("--cascade-loss", type=float, default=0.5, help="Points of top-1 the calibration may lose.")
    ap.add_argument("--int8", action="store_true", help="Export INT8 forms too (more candidate steps).")
    ap.add_argument("--profile", default="host")
    ap.add_argument("--round-images", type=int, default=250, help="Consecutive images each model takes per turn.")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    portfolio = args.out / "cascade.zip"
    if not portfolio.exists():
        run(
            [
                *("edgeshift", "export", *args.sources, "-o", str(portfolio), "--data", args.data),
                *("--test-samples", str(args.test_samples), "--profile", args.profile, "--no-memory", "--cascade"),
                *("--cascade-samples", str(args.cascade_samples), "--cascade-loss", str(args.cascade_loss)),
                *(["--int8"] if args.int8 else []),
            ]
        )
    profile = device_profiles.load_profile(args.profile)
    with Portfolio.open(portfolio, profile.limits) as pf:
        manifest = pf.manifest
        reference = next(v.name for v in pf.variants if v.reference)
        macs = {v.name: v.macs for v in pf.variants}
        static = best_static(pf.variants, args.cascade_loss)
    cascade = manifest.cascade
    assert cascade is not None, "the export calibrated no cascade (no variant measured faster than the reference)"
    size = manifest.preprocessing.size
    test = load_dataset(args.data, "test", num_classes=len(manifest.labels), size=size[0]).subset(args.test_samples)
    x, y = test.normalised(), test.labels
    print(f"machine: {machine_label()}; profile {profile.name}; {time.strftime('%Y-%m-%d')}", flush=True)
    print(f"{len(y)} measured images; cascade {' -> '.join(cascade.steps)}", flush=True)

    # the dense model served as the cascade's steps are (threads stop spinning when a run ends), so that neither
    # one's pool takes the cores from the other's next call
    alone = {"dense": reference, **({"static": static} if static else {})}
    runtimes = {
        which: Runtime(portfolio, profile=spin_stopping(profile), start=name, preload_neighbours=False, vet=False)
        for which, name in alone.items()
    }
    casc = Runtime(portfolio, profile=profile, cascade=True, vet=False)
    order = [*runtimes, "cascade"]
    try:
        for i in range(WARMUP):
            for rt in (*runtimes.values(), casc):
                rt.predict(x[i : i + 1])
        ms = {which: np.empty(len(y)) for which in order}
        predicted = {which: np.empty(len(y), int) for which in order}
        answered: list[str] = ["" for _ in range(len(y))]
        turn = max(1, args.round_images)
        for r, start in enumerate(range(0, len(y), turn)):
            for which in order[r % len(order) :] + order[: r % len(order)]:
                for i in range(start, min(start + turn, len(y))):
                    item = x[i : i + 1]
                    t = time.perf_counter()
                    if which == "cascade":
                        out, steps = casc.predict_cascade(item)
                        answered[i] = steps[0]
                    else:
                        out = runtimes[which].predict(item)
                    ms[which][i] = (time.perf_counter() - t) * 1e3
                    predicted[which][i] = int(out[0].argmax())
    finally:
        for rt in (*runtimes.values(), casc):
            rt.close()
    exits = {s: answered.count(s) / len(answered) for s in cascade.steps}
    # the same from the timing process (every step and the dense model interleaved, one shared pool, spinning as
    # the profile says): an input answered at step k costs the p50s of steps 0..k
    with Portfolio.open(portfolio, profile.limits) as pf:
        graphs = {n: pf.inflate(n) for n in {*cascade.steps, *alone.values()}}
    p50 = {n: st.p50_ms for n, st in time_interleaved_models(graphs, {"input": x[:1]}, profile, batch=1).items()}
    expected = expected_latency([exits[s] for s in cascade.steps], [p50[s] for s in cascade.steps])
    ran = np.cumsum([macs[s] for s in cascade.steps])
    macs_per_input = float(sum(exits[s] * ran[k] for k, s in enumerate(cascade.steps)))
    figures = {
        which: {
            "top1": float((predicted[which] == y).mean()),
            "mean_ms": float(ms[which].mean()),
            "p50_ms": float(np.percentile(ms[which], 50)),
            "p95_ms": float(np.percentile(ms[which], 95)),
        }
        for which in ms
    }
    result = {
        "machine": machine_label(),
        "profile": profile.name,
        "date": time.strftime("%Y-%m-%d"),
        "steps": list(cascade.steps),
        "thresholds": list(cascade.points[0].thresholds),
        "calibration": {"samples": cascade.samples, "top1": cascade.points[0].top1, "dense": cascade.reference_top1},
        "measured_images": len(y),
        "round_images": args.round_images,
        "exits": exits,
        "macs_per_input": macs_per_input,
        "dense_macs": macs[reference],
        "static_variant": static,
        "static_macs": macs[static] if static else None,
        **figures,
        "timing_process": {"p50_ms": p50, "expected_mean_ms": expected.mean_ms, "expected_p95_ms": expected.p95_ms},
    }
    (args.out / "result.json").write_text(json.dumps(result, indent=1))
    d, c = figures["dense"], figures["cascade"]
    print(
        f"\n| model | top-1 | mean ms | p50 ms | p95 ms | MACs per input |\n|---|---|---|---|---|---|\n"
        f"| dense ({reference}) | {100 * d['top1']:.2f}% | {d['mean_ms']:.3f} | {d['p50_ms']:.3f} | "
        f"{d['p95_ms']:.3f} | {macs[reference]:,} |\n"
        f"| cascade | {100 * c['top1']:.2f}% | {c['mean_ms']:.3f} | {c['p50_ms']:.3f} | {c['p95_ms']:.3f} | "
        f"{macs_per_input:,.0f} |"
        + (
            f"\n| static ({static}) | {100 * figures['static']['top1']:.2f}% | {figures['static']['mean_ms']:.3f} | "
            f"{figures['static']['p50_ms']:.3f} | {figures['static']['p95_ms']:.3f} | {macs[static]:,} |"
            if static
            else ""
        )
    )
    print(
        f"cascade / dense: mean {c['mean_ms'] / d['mean_ms']:.2f}x, p95 {c['p95_ms'] / d['p95_ms']:.2f}x, MACs "
        f"{macs_per_input / macs[reference]:.2f}x; top-1 {100 * (c['top1'] - d['top1']):+.2f} points; exits "
        + ", ".join(f"{s} {100 * v:.1f}%" for s, v in exits.items())
    )
    print(
        f"timing process (interleaved, shared pool): dense p50 {p50[reference]:.3f} ms; cascade expected from these "
        f"exits: mean {expected.mean_ms:.3f} ms ({expected.mean_ms / p50[reference]:.2f}x), p95 "
        f"{expected.p95_ms:.3f} ms; steps " + ", ".join(f"{s} {p50[s]:.3f}" for s in cascade.steps)
    )


if __name__ == "__main__":
    main()
