"""Learned filter masks on CIFAR-10: `edgeshift slim` at several targets, priced by latency or MACs.

For each (pricing, target): gates learn with the model, closed channels become exact zeros, a short fine-tune,
an exact prune; then the table: the price model's predicted ratio, the MACs ratio and the p50 ratio measured under
the profile (which of the two prices predicts latency better), top-1 after gating and after fine-tuning, the
deviation of the pruned model from the gated one. Resumable: finished runs (their JSON reports) are skipped.

    python benchmarks/slim_cifar.py --checkpoint /tmp/edgeshift-bench/resnet20-dense.pt \\
        --data ../shared/datasets/cifar10 --out /tmp/edgeshift-bench/slim [--targets 0.75 0.5] \\
        [--pricings latency macs] [--gate-epochs 1] [--epochs 1] [--train-samples N] [--test-samples N]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--targets", type=float, nargs="+", default=[0.75, 0.5])
    ap.add_argument("--pricings", nargs="+", default=["latency", "macs"])
    ap.add_argument("--gate-epochs", type=float, default=1.0)
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--train-samples", type=int)
    ap.add_argument("--test-samples", type=int)
    ap.add_argument("--profile", default="host")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for pricing in args.pricings:
        for target in args.targets:
            stem = args.out / f"{pricing}-{target:g}"
            if not Path(f"{stem}.json").exists():
                cmd = [
                    sys.executable,
                    "-m",
                    "edgeshift",
                    "slim",
                    str(args.checkpoint),
                    "--target",
                    str(target),
                    "--pricing",
                    pricing,
                    "--data",
                    args.data,
                    "--profile",
                    args.profile,
                    "--gate-epochs",
                    str(args.gate_epochs),
                    "--epochs",
                    str(args.epochs),
                    "-o",
                    f"{stem}.pt",
                    "--json",
                    f"{stem}.json",
                    "--force",
                ]
                for flag, value in (("--train-samples", args.train_samples), ("--test-samples", args.test_samples)):
                    if value:
                        cmd += [flag, str(value)]
                subprocess.run(cmd, check=True)
            rows.append(json.loads(Path(f"{stem}.json").read_text()))
    print(
        "| pricing | target | predicted | MACs ratio | measured p50 (dense -> slim) | p50 ratio | top-1 dense | "
        "gated | fine-tuned | deviation |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['pricing']} | {r['target']:g} | {r['predicted_ratio']:.3f} | {r['macs_ratio']:.3f} | "
            f"{r['p50_dense_ms']:.3f} -> {r['p50_slim_ms']:.3f} ms | {r['measured_ratio']:.3f} | "
            f"{100 * r['accuracy_dense']:.2f}% | {100 * r['accuracy_gated']:.2f}% | "
            f"{100 * r['accuracy_after']:.2f}% | {r['max_rel_deviation']:.1e} |"
        )
    for r in rows:
        print(
            f"{r['pricing']} {r['target']:g}: kept per group "
            + ", ".join(f"{k.split(',')[0]} {100 * v:.0f}%" for k, v in r["shares"].items())
        )


if __name__ == "__main__":
    main()
