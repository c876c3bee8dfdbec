"""Phase 2 on every level of sparse-training runs: exact structured pruning, then params, MACs and batch-1
ONNX Runtime latency (1 thread, p50/p95, warm-up excluded) of each pruned variant, next to the level's accuracy.

    python benchmarks/phase2_table.py RUN_ROOT        # RUN_ROOT/<method>/level_<k>/ (benchmarks/imp_cifar.sh)
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from edgeshift.device_profiles import cpu_profile
from edgeshift.exporter.onnx_export import export_onnx
from edgeshift.pruner.checkpoint import load_checkpoint
from edgeshift.pruner.models.zoo import input_shape
from edgeshift.pruner.structured import prune_zero_channels
from edgeshift.runtime.measure import machine_label, time_calls
from edgeshift.runtime.session import create_session


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root")
    ap.add_argument("--iterations", type=int, default=200)
    args = ap.parse_args()
    root = Path(args.root)
    print(f"machine: {machine_label()}; latency at batch 1, 1 ORT thread, {args.iterations} timed calls")
    print(
        "| method | level | compression | top-1 | wall s | params dense -> pruned | MACs | p50 ms | p95 ms | "
        "prune max rel diff |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    with tempfile.TemporaryDirectory() as tmp:
        for method_dir in sorted(p for p in root.iterdir() if p.is_dir()):
            for level in sorted(method_dir.glob("level_*"), key=lambda p: int(p.name.split("_")[1])):
                if not (level / "metrics.json").is_file():
                    continue
                metrics = json.loads((level / "metrics.json").read_text())
                model, _ = load_checkpoint(level / "checkpoint.pt")
                x = torch.randn(input_shape(model, 2), generator=torch.Generator().manual_seed(0))
                pruned, rep = prune_zero_channels(model, x)
                path = Path(tmp) / f"{method_dir.name}-{level.name}.onnx"
                exp = export_onnx(pruned, x, path, random_batches=0)
                sess = create_session(path.read_bytes(), cpu_profile(1))
                x1 = x[:1].numpy()
                lat = time_calls(lambda: sess.run(None, {"input": x1}), warmup=20, iterations=args.iterations)
                print(
                    f"| {method_dir.name} | {metrics['level']} | {metrics['compression']:.1f}x | "
                    f"{100 * metrics['test_accuracy']:.2f}% | {metrics['seconds']:.0f} | "
                    f"{rep.params_before:,} -> {rep.params_after:,} | {exp.macs:,} | {lat.p50_ms:.3f} | "
                    f"{lat.p95_ms:.3f} | {rep.rel_diff:.1e} |"
                )


if __name__ == "__main__":
    main()
