"""Self-distilled exits against separately trained depths on CIFAR-10 (Table 7.1 of "Neural Networks Model
Compression" (Elkerdawy), redone small): one `edgeshift exits` run of the zoo's vit_cifar with C classifiers, and C
plain vit_cifar models of the exits' depths, each trained by `edgeshift train` with the same recipe and epochs.
Prints top-1 of each on the whole test split (PyTorch) and the training time of each, then exports the exits'
depth variants (FP32 and INT8, with a calibrated cascade) and times them with benchmarks/cascade_cifar.py.
Resumable: a checkpoint or portfolio that exists is reused.

    python benchmarks/exits_cifar.py --data ../shared/datasets/cifar10 --out /tmp/exits-bench \\
        [--exits 3] [--depth 6] [--epochs 8] [--exits-epochs 15] [--train-samples 20000]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from edgeshift.pruner.checkpoint import load_checkpoint
from edgeshift.pruner.data import load_dataset
from edgeshift.pruner.exits import exit_depths
from edgeshift.pruner.train import evaluate
from edgeshift.runtime.measure import machine_label


def run(cmd: list[str]) -> float:
    """Run ``cmd`` with this Python's scripts first on the PATH (cascade_cifar.py calls `edgeshift`); its wall
    seconds."""
    print("+", " ".join(cmd), flush=True)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--exits", type=int, default=3)
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--epochs", type=int, default=8, help="Epochs of each separately trained model.")
    ap.add_argument(
        "--exits-epochs",
        type=int,
        default=None,
        help="Epochs of the one exits run (default: --epochs). The separate models' summed time is the total "
        "budget; give the exits run the epochs that fill it to compare on the same total budget.",
    )
    ap.add_argument("--train-samples", type=int, default=20000)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=150, help="Linear warm-up steps (both trainings).")
    ap.add_argument("--no-export", action="store_true", help="Top-1 only: skip the portfolio and the cascade.")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    timings_path = args.out / "seconds.json"
    seconds: dict[str, float] = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    exits_epochs = args.exits_epochs or args.epochs
    recipe = [
        *("--data", args.data, "--train-samples", str(args.train_samples)),
        *("--test-samples", "1000", "--lr", str(args.lr), "--optimizer", "adamw", "--weight-decay", "0.05"),
        *("--warmup", str(args.warmup), "--batch-size", "128"),
    ]
    edgeshift = str(Path(sys.executable).parent / "edgeshift")
    depths = exit_depths(args.depth, args.exits)
    folder = args.out / "exits" / "variants"
    exits = [folder / f"exit{c + 1}of{args.exits}-depth{d}-scratch.pt" for c, d in enumerate(depths)]
    if not all(p.exists() for p in exits):
        kwargs = json.dumps({"depth": args.depth})
        seconds["exits"] = run(
            [
                *(edgeshift, "exits", "--arch", "vit_cifar", "--arch-kwargs", kwargs, "-o", str(args.out / "exits")),
                *("--exits", str(args.exits), "--epochs", str(exits_epochs), *recipe),
            ]
        )
        timings_path.write_text(json.dumps(seconds))
    separate = []
    for d in depths:
        path = args.out / f"separate-depth{d}.pt"
        if not path.exists():
            seconds[f"depth{d}"] = run(
                [
                    *(edgeshift, "train", "--arch", "vit_cifar", "--arch-kwargs", json.dumps({"depth": d})),
                    *("-o", str(path), "--epochs", str(args.epochs), *recipe),
                ]
            )
            timings_path.write_text(json.dumps(seconds))
        separate.append(path)

    test = load_dataset(args.data, "test", num_classes=10, size=32)
    x, y = torch.from_numpy(test.normalised()), torch.from_numpy(test.labels)
    print(f"machine: {machine_label()}; {time.strftime('%Y-%m-%d %H:%M')}; {len(y)} test images", flush=True)
    print(
        f"vit_cifar depth {args.depth}, {args.exits} classifiers; the exits run {exits_epochs} epochs, each "
        f"separate model {args.epochs} epochs, on {args.train_samples} images, AdamW lr {args.lr:g} wd 0.05, "
        f"{args.warmup} warm-up steps, cosine"
    )
    print("| classifier | depth | self-distilled top-1 | separately trained top-1 | difference |")
    print("|---|---|---|---|---|")
    for c, (mine, theirs) in enumerate(zip(exits, separate)):
        a = evaluate(load_checkpoint(mine)[0], x, y)
        b = evaluate(load_checkpoint(theirs)[0], x, y)
        print(f"| {c + 1}/{args.exits} | {depths[c]} | {a:.2%} | {b:.2%} | {100 * (a - b):+.2f} |", flush=True)
    total_separate = sum(seconds.get(f"depth{d}", float("nan")) for d in depths)
    print(
        f"training: one exits run {seconds.get('exits', float('nan')):.0f} s; the {args.exits} separate "
        f"models {total_separate:.0f} s in all"
    )
    if not args.no_export:
        cascade = Path(__file__).with_name("cascade_cifar.py")
        run([sys.executable, str(cascade), *map(str, exits), "--int8", "--data", args.data, "--out", str(args.out)])


if __name__ == "__main__":
    main()
