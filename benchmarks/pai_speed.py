"""Time and memory of one pruning-at-initialisation step (VGG-16, CIFAR shape, P=0.95), each in a fresh process.

The step is the whole of ``edgeshift.pruner.pai.pai``: build the dense initialised model, profile it through ONNX
Runtime, score, decide, rectify, profile the result. Each repeat runs in its own interpreter so first-call costs count;
``import torch`` is outside the step (reported apart). The baseline measured in the same run is the same step in
``unstructured`` mode (plain unstructured PaI: no sensitivity, no rectifier). Targets: under 3 s and 1 GB.

    python benchmarks/pai_speed.py [--arch vgg16] [--sparsity 0.95] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time
t0 = time.perf_counter()
from edgeshift.exporter.profile import cpu_measurer
from edgeshift.pruner.pai import PaiConfig, pai
import_seconds = time.perf_counter() - t0
rss_after_import = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
cfg = PaiConfig(sys.argv[1], float(sys.argv[2]), mode=sys.argv[3])
model, mask, report = pai(cfg, cpu_measurer(cfg.latency_threads, cfg.latency_iterations))
doc = report.to_dict()
doc.pop("layers")
doc.update(import_seconds=import_seconds, rss_after_import=rss_after_import)
print(json.dumps(doc))
"""


def run_once(arch: str, sparsity: float, mode: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, arch, str(sparsity), mode], check=True, capture_output=True, text=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="vgg16")
    ap.add_argument("--sparsity", type=float, default=0.95)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    results = {}
    for mode in ("reconvene", "unstructured"):
        runs = [run_once(args.arch, args.sparsity, mode) for _ in range(args.repeats)]
        results[mode] = runs
        secs = [r["seconds"] for r in runs]
        peak = max(r["peak_memory_bytes"] for r in runs)
        r = runs[0]
        print(
            f"{mode:>12}: step {statistics.median(secs):.2f} s median of {len(secs)} "
            f"({', '.join(f'{s:.2f}' for s in secs)}; pruning alone "
            f"{statistics.median(x['seconds_prune'] for x in runs):.2f} s), peak RSS {peak / 2**20:.0f} MiB "
            f"({(peak - r['rss_after_import']) / 2**20:.0f} MiB above the process after `import torch`), "
            f"import {statistics.median(x['import_seconds'] for x in runs):.2f} s"
        )
        print(
            f"{'':>12}  compression {r['compression']:.2f}x, ORT CPU speedup "
            f"{statistics.median(x['cpu_speedup'] for x in runs):.2f}x (dense p50 "
            f"{statistics.median(x['latency_dense']['p50_ms'] for x in runs):.2f} ms -> "
            f"{statistics.median(x['latency_after']['p50_ms'] for x in runs):.2f} ms), MACs "
            f"{r['macs_dense'] / r['macs_after']:.2f}x fewer"
        )
    rec = statistics.median(r["seconds"] for r in results["reconvene"])
    base = statistics.median(r["seconds"] for r in results["unstructured"])
    peak = max(r["peak_memory_bytes"] for r in results["reconvene"])
    print(
        f"reconvene / unstructured step time: {rec / base:.2f}x; target < 3 s: {'met' if rec < 3 else 'MISSED'} "
        f"({rec:.2f} s); target < 1 GB: {'met' if peak < 2**30 else 'MISSED'} ({peak / 2**30:.2f} GiB); "
        f"paper (Reconvene, Table IV): 1.37 s, 0.31 GB"
    )


if __name__ == "__main__":
    main()
