"""Accuracy of pruning at initialisation on real data: Reconvene vs unstructured PaI vs --all-layers vs --inverted.

For each sparsity, each mode gets the same freshly initialised model (same seed), the same scorer and the same
training budget (``edgeshift train --init``: epochs, subset, schedule); the table reports test top-1 (PyTorch,
the full test split), compression, ORT CPU speedup at batch 1 from the pai report, and training seconds. Resumable:
finished steps (their output files) are skipped.

    python benchmarks/pai_cifar.py --data ../shared/datasets/cifar10 --out /tmp/edgeshift-bench/pai \
        [--arch resnet20] [--sparsities 0.8 0.95] [--epochs 5] [--train-samples 20000]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

MODES = {
    "reconvene": [],
    "unstructured": ["--unstructured"],
    "all-layers": ["--all-layers"],
    "inverted": ["--inverted"],
}


def edgeshift(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "edgeshift", *args], check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--arch", default="resnet20")
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.8, 0.95])
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--train-samples", type=int, default=20000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for p in args.sparsities:
        for mode, flags in MODES.items():
            stem = args.out / f"{args.arch}-p{p:g}-{mode}"
            init, report, trained = Path(f"{stem}-init.pt"), Path(f"{stem}-pai.json"), Path(f"{stem}-trained.pt")
            if not report.exists():
                edgeshift(
                    "pai",
                    "--arch",
                    args.arch,
                    "--sparsity",
                    str(p),
                    "--seed",
                    str(args.seed),
                    *flags,
                    "-o",
                    str(init),
                    "--json",
                    str(report),
                    "--force",
                )
            if not trained.exists():
                edgeshift(
                    "train",
                    "--init",
                    str(init),
                    "--data",
                    args.data,
                    "--epochs",
                    str(args.epochs),
                    "--train-samples",
                    str(args.train_samples),
                    "--seed",
                    str(args.seed),
                    "-o",
                    str(trained),
                )
            import torch

            meta = torch.load(trained, map_location="cpu", weights_only=True)["meta"]
            doc = json.loads(report.read_text())
            rows.append(
                (
                    p,
                    mode,
                    meta["test_accuracy"],
                    doc["compression"],
                    doc["cpu_speedup"],
                    doc["nonzero_after"],
                    meta["seconds"],
                )
            )
    print(f"\n{args.arch}, {args.train_samples} training images x {args.epochs} epochs per model, seed {args.seed}\n")
    print("| P | method | top-1 | compression | ORT CPU speedup | nonzero params | train s |")
    print("|---|---|---|---|---|---|---|")
    for p, mode, acc, comp, speed, nnz, secs in rows:
        print(f"| {p:g} | {mode} | {100 * acc:.2f}% | {comp:.2f}x | {speed:.2f}x | {nnz:,} | {secs:.0f} |")


if __name__ == "__main__":
    main()
