"""Nested widths on CIFAR-10: one network whose widths slice each other, against independently pruned widths.

From one trained dense checkpoint, ``edgeshift nest`` three times on the same budget per width: ``--training
rebuild`` (nested, "Self-adaptive neural network for edge devices", sec. 4.2), ``--training joint`` (nested, every
width at once with batch norms of its own: Slimmable Networks) and ``--training independent`` (each width cut by
the same ranking and fine-tuned alone, all its weights). Both exported (top-1 through ONNX Runtime on the test split),
then, in this one run: every width of both timed against each other (interleaved, under the profile); each
portfolio's bytes against its widest variant's; the median of ``--repeats`` switches between two widths, nested
(sliced from the widest weights in memory) against independent (inflated), interleaved; and the resident memory of
a fresh process with one and with two widths live. Resumable: finished steps are skipped.

    python benchmarks/nested_cifar.py --dense /tmp/nest-bench/resnet20-dense.pt --data ../shared/datasets/cifar10 \\
        --out /tmp/nest-bench/resnet20 [--widths 0.75 0.5 0.25] [--finetune-epochs 1] [--train-samples 0] \\
        [--joint-weights 2,1,0.5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from edgeshift import device_profiles
from edgeshift.exporter.profile import time_interleaved_models
from edgeshift.runtime.engine import Runtime
from edgeshift.runtime.measure import machine_label
from edgeshift.runtime.portfolio import Portfolio

TRAININGS = {"rebuild": "nest", "joint": "nest", "independent": "independent"}  # --training -> checkpoint prefix
SWITCHED = ("rebuild", "independent")  # sliced against inflated

RSS_PROBE = """
import gc, json, sys, psutil
from edgeshift import device_profiles
from edgeshift.runtime.portfolio import Portfolio
from edgeshift.runtime.building import build_slot
import numpy as np
path, first, second, profile = sys.argv[1:5]
prof = device_profiles.load_profile(profile)
rss = lambda: psutil.Process().memory_info().rss / 2**20
out = {"start_mb": rss()}
with Portfolio.open(path, prof.limits) as pf:
    one = build_slot(pf, first, prof, dtype=np.dtype("float32"))
    gc.collect(); out["one_mb"] = rss()
    two = build_slot(pf, second, prof, dtype=np.dtype("float32"))
    gc.collect(); out["two_mb"] = rss()
print(json.dumps(out))
"""


def run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dense", type=Path, required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--widths", type=float, nargs="+", default=[0.75, 0.5, 0.25])
    ap.add_argument("--finetune-epochs", type=float, default=1.0)
    ap.add_argument("--train-samples", type=int, default=0)
    ap.add_argument("--joint-weights", default="", help="`edgeshift nest --joint-weights` for the joint training.")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--test-samples", type=int, default=10000)
    ap.add_argument("--profile", default="host")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--chart", type=Path, help="Also draw top-1 against p50 per training here (PNG).")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    widths = [1.0, *args.widths]
    portfolios = {}
    for training, prefix in TRAININGS.items():
        folder = args.out / training
        # the method runs in the folder's own output tree: --out's variants/ holds its checkpoints
        run(
            [
                *("edgeshift", "nest", str(args.dense), "-o", str(folder), "--data", args.data),
                *("--widths", ",".join(f"{w:g}" for w in args.widths), "--training", training),
                *("--finetune-epochs", str(args.finetune_epochs), "--train-samples", str(args.train_samples)),
                *("--test-samples", "2000", "--batch-size", str(args.batch_size)),
                *(["--joint-weights", args.joint_weights] if training == "joint" and args.joint_weights else []),
            ]
        )
        portfolio = args.out / f"{training}.zip"
        if not portfolio.exists():
            checkpoints = [str(folder / "variants" / f"{prefix}-{w:g}.pt") for w in widths]
            run(
                [
                    *("edgeshift", "export", *checkpoints, "-o", str(portfolio), "--data", args.data),
                    *("--test-samples", str(args.test_samples), "--profile", args.profile),
                ]
            )
        portfolios[training] = portfolio
    profile = device_profiles.load_profile(args.profile)
    print(f"machine: {machine_label()}; profile {profile.name}; {time.strftime('%Y-%m-%d')}", flush=True)

    # -- accuracy and bytes, from the manifests; latency: every width of both in one interleaved run -----------
    rows, graphs = {}, {}
    for training, path in portfolios.items():
        with Portfolio.open(path, profile.limits) as pf:
            widest = max(pf.variants, key=lambda v: v.params)
            rows[training] = {
                "file_bytes": path.stat().st_size,
                "widest_bytes": widest.bytes,
                "variants": {v.name: {"top1": v.top1, "bytes": v.bytes, "params": v.params} for v in pf.variants},
            }
            for v in pf.variants:
                graphs[f"{training}/{v.name}"] = pf.inflate(v.name)
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    print(f"timing {len(graphs)} models against each other ...", flush=True)
    stats = time_interleaved_models(graphs, {"input": x}, profile, batch=1)
    for key, st in stats.items():
        training, name = key.split("/")
        rows[training]["variants"][name]["p50_ms"] = st.p50_ms
        rows[training]["variants"][name]["p95_ms"] = st.p95_ms

    # -- switches between two widths: sliced (nested) against inflated (independent), interleaved -------------
    # the two narrowest widths both portfolios kept (the post-processor drops a width another beats)
    present = [
        f"{w:g}" for w in widths if all(f"{TRAININGS[t]}-{w:g}" in rows[t]["variants"] for t in SWITCHED) and w < 1.0
    ]
    pair = (present[-2], present[-1])
    switches: dict[str, dict[str, list[float]]] = {t: {"total": [], "inflate": [], "create": []} for t in SWITCHED}
    runtimes = {
        t: Runtime(
            portfolios[t],
            profile=profile,
            start=f"{TRAININGS[t]}-{pair[0]}",
            preload_neighbours=False,
            vet=False,
            warmup_runs=1,
        )
        for t in SWITCHED
    }
    try:
        for i in range(args.repeats):
            for training in SWITCHED:
                prefix = TRAININGS[training]
                rt = runtimes[training]
                target = f"{prefix}-{pair[(i + 1) % 2]}"
                record = rt.switch_to(target)
                switches[training]["total"].append(record.total_ms)
                switches[training]["inflate"].append(record.inflate_ms)
                switches[training]["create"].append(record.create_ms)
                assert record.sliced == (training == "rebuild"), record
        failures = {t: rt.stats()["failures"] for t, rt in runtimes.items()}
    finally:
        for rt in runtimes.values():
            rt.close()
    med = {t: {k: statistics.median(v) for k, v in s.items()} for t, s in switches.items()}

    # -- resident memory of a fresh process, one and two widths live ---------------------------------------
    memory = {}
    for training in SWITCHED:
        prefix = TRAININGS[training]
        out = subprocess.run(
            [sys.executable, "-c", RSS_PROBE, str(portfolios[training]), f"{prefix}-{pair[0]}", f"{prefix}-{pair[1]}"]
            + [args.profile],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        memory[training] = json.loads(out.strip().splitlines()[-1])

    result = {
        "machine": machine_label(),
        "profile": profile.name,
        "widths": widths,
        "finetune_epochs": args.finetune_epochs,
        "rows": rows,
        "switch_ms": med,
        "switch_pair": pair,
        "switch_failures": failures,
        "memory_mb": memory,
    }
    (args.out / "result.json").write_text(json.dumps(result, indent=1))
    print_table(result)
    if args.chart:
        draw(result, args.chart)


def print_table(r: dict) -> None:
    header = ["width", *(f"{t} top-1" for t in TRAININGS), *(f"{t} p50 ms" for t in TRAININGS)]
    print("\n| " + " | ".join([*header, "rebuild faster than next wider"]) + " |")
    print("|" + "---|" * (len(header) + 1))
    previous = None
    for w in r["widths"]:
        found = {t: r["rows"][t]["variants"].get(f"{p}-{w:g}") for t, p in TRAININGS.items()}
        n = found["rebuild"]
        faster = "-" if previous is None or n is None else ("yes" if n["p50_ms"] < previous else "NO")
        previous = n["p50_ms"] if n else previous
        top1 = [("dropped" if v is None else f"{100 * v['top1']:.2f}%") for v in found.values()]
        p50 = [("dropped" if v is None else f"{v['p50_ms']:.3f}") for v in found.values()]
        print(f"| {w:g} | " + " | ".join([*top1, *p50, faster]) + " |")
    for t in TRAININGS:
        if t not in r["switch_ms"]:
            row = r["rows"][t]
            print(f"{t}: portfolio {row['file_bytes']:,} bytes = {row['file_bytes'] / row['widest_bytes']:.3f}x")
            continue
        row = r["rows"][t]
        print(
            f"{t}: portfolio {row['file_bytes']:,} bytes = {row['file_bytes'] / row['widest_bytes']:.3f}x its widest "
            f"variant's {row['widest_bytes']:,}; switch {r['switch_pair'][0]} <-> {r['switch_pair'][1]} median "
            f"{r['switch_ms'][t]['total']:.1f} ms (slice/inflate {r['switch_ms'][t]['inflate']:.1f}, create "
            f"{r['switch_ms'][t]['create']:.1f}); RSS one width {r['memory_mb'][t]['one_mb']:.1f} MB, two "
            f"{r['memory_mb'][t]['two_mb']:.1f} MB (start {r['memory_mb'][t]['start_mb']:.1f})"
        )


def draw(r: dict, path: Path) -> None:
    """Top-1 against p50, one line per training, each point a width."""
    import matplotlib  # here: only the chart needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for training, prefix in TRAININGS.items():
        points = [
            (v["p50_ms"], 100 * v["top1"], w)
            for w in r["widths"]
            if (v := r["rows"][training]["variants"].get(f"{prefix}-{w:g}")) is not None
        ]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=training)
        for x, y, w in points:
            ax.annotate(f"{w:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel(f"p50 ms, batch 1, profile {r['profile']}")
    ax.set_ylabel("top-1 % (CIFAR-10 test)")
    ax.set_title("Nested widths (rebuild, joint) against independently pruned widths", fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
