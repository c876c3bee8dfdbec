"""Layer pruning on real data: remove 1..4 blocks of a trained CIFAR ResNet with two criteria, fine-tune briefly,
and compare with width (L1 filter) pruning of the same model to a similar ONNX Runtime latency, same fine-tuning.

Every figure is measured: top-1 through ONNX Runtime on the whole test split; latency p50 under the device profile,
all models re-measured together at the end (interleaved rounds, median), so they are compared under the same
conditions. Resumable: finished runs (their JSON reports) are skipped.

    python benchmarks/layerprune_cifar.py --checkpoint /tmp/edgeshift-bench/resnet20-dense.pt \
        --data ../shared/datasets/cifar10 --out /tmp/edgeshift-bench/layerprune [--criteria imprint bn-scale] \
        [--max-remove 4] [--epochs 2] [--train-samples 20000] [--profile host]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from _common import width_pruned

from edgeshift.pruner.models.record import record_of


def edgeshift(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "edgeshift", *args], check=True)


def interleaved_p50(models: dict, profile, rounds: int) -> dict:
    """Median over ``rounds`` of each model's ORT p50 under ``profile``, the models measured in turn each round."""
    import statistics

    from edgeshift.exporter.profile import OrtMeasurer
    from edgeshift.pruner.layers.layerprune import measure_latency

    measure = OrtMeasurer(profile)
    seen: dict[Any, list[float]] = {k: [] for k in models}
    for _ in range(rounds):
        for k, m in models.items():
            seen[k].append(measure_latency(m, measure)["p50_ms"])
    return {k: statistics.median(v) for k, v in seen.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--criteria", nargs="+", default=["imprint", "bn-scale"])
    ap.add_argument("--max-remove", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--train-samples", type=int, default=20000)
    ap.add_argument("--profile", default="host")
    ap.add_argument("--rounds", type=int, default=3, help="Latency: median over this many interleaved rounds.")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    common = [
        "--data",
        args.data,
        "--epochs",
        str(args.epochs),
        "--lr",
        str(args.lr),
        "--train-samples",
        str(args.train_samples),
        "--profile",
        args.profile,
    ]
    reports = {}
    for criterion in args.criteria:
        for n in range(1, args.max_remove + 1):
            stem = args.out / f"{criterion}-remove{n}"
            if not Path(f"{stem}.json").exists():
                edgeshift(
                    "layerprune",
                    str(args.checkpoint),
                    "--criterion",
                    criterion,
                    "--remove",
                    str(n),
                    *common,
                    "-o",
                    f"{stem}.pt",
                    "--json",
                    f"{stem}.json",
                    "--force",
                )
            reports[(criterion, n)] = json.loads(Path(f"{stem}.json").read_text())

    import torch

    from edgeshift import device_profiles
    from edgeshift.exporter.profile import OrtMeasurer
    from edgeshift.pruner.checkpoint import load_checkpoint, save_checkpoint
    from edgeshift.pruner.data import load_dataset
    from edgeshift.pruner.layers.layerprune import onnx_top1
    from edgeshift.pruner.metrics import count_macs, count_params
    from edgeshift.pruner.train import TrainConfig, train

    profile = device_profiles.load_profile(args.profile)
    dense, _ = load_checkpoint(args.checkpoint)
    record = record_of(dense)
    train_ds = load_dataset(args.data, "train", num_classes=record.classes, size=record.input_size)
    train_ds = train_ds.subset(args.train_samples, 0)
    test_ds = load_dataset(args.data, "test", num_classes=record.classes, size=record.input_size)
    dense_acc = reports[(args.criteria[0], 1)]["accuracy_before"]
    layer_models = {key: load_checkpoint(args.out / f"{key[0]}-remove{key[1]}.pt")[0] for key in reports}
    ratios = [round(0.05 * i, 2) for i in range(1, 15)]
    # every latency in one pass, interleaved, median of rounds: models compared under the same conditions
    candidates: dict[Any, Any] = {
        "dense": dense,
        **{k: m for k, m in layer_models.items()},
        **{("width", r): width_pruned(dense, r) for r in ratios},
    }
    lat = interleaved_p50(candidates, profile, args.rounds)
    width_docs = {}
    for n in range(1, args.max_remove + 1):
        target = lat[(args.criteria[0], n)]
        r = min(ratios, key=lambda x: abs(lat[("width", x)] - target))
        path = args.out / f"width-l1-{r:g}.json"
        if not path.exists():
            model = width_pruned(dense, r)
            before = onnx_top1(model, test_ds, OrtMeasurer(profile))
            train(model, train_ds, test_ds, TrainConfig(epochs=args.epochs, lr=args.lr), label=f"width {r:g}")
            model.eval()
            doc = {
                "ratio": r,
                "params": count_params(model),
                "macs": count_macs(model, torch.randn(1, 3, 32, 32)),
                "accuracy_removed": before,
                "accuracy_after": onnx_top1(model, test_ds, OrtMeasurer(profile)),
            }
            save_checkpoint(model, args.out / f"width-l1-{r:g}.pt", meta={"test_accuracy": doc["accuracy_after"]})
            path.write_text(json.dumps(doc))
        width_docs[r] = json.loads(path.read_text())
    final: dict[Any, Any] = {
        "dense": dense,
        **layer_models,
        **{("width", r): load_checkpoint(args.out / f"width-l1-{r:g}.pt")[0] for r in width_docs},
    }
    lat = interleaved_p50(final, profile, args.rounds)  # the figures in the table
    dense_lat = lat["dense"]
    rows = []
    for (criterion, n), rep in reports.items():
        rows.append(
            (
                f"layerprune {criterion}",
                f"{n} blocks ({', '.join(rep['removed'])})",
                rep["params_after"],
                rep["macs_after"],
                lat[(criterion, n)],
                rep["accuracy_removed"],
                rep["accuracy_after"],
            )
        )
    for r, doc in sorted(width_docs.items()):
        rows.append(
            (
                "width L1 (uniform)",
                f"ratio {r:g}",
                doc["params"],
                doc["macs"],
                lat[("width", r)],
                doc["accuracy_removed"],
                doc["accuracy_after"],
            )
        )
    print(
        f"\n{record.name} from {args.checkpoint} (ONNX Runtime top-1 {100 * dense_acc:.2f}%, p50 {dense_lat:.3f} ms "
        f"under profile {args.profile}); fine-tuning {args.epochs} epochs x {args.train_samples} images, lr "
        f"{args.lr}, cosine\n"
    )
    print("| method | removed | params | MACs | p50 ms | latency reduction | top-1 before FT | top-1 after FT |")
    print("|---|---|---|---|---|---|---|---|")
    for method, what, params, macs, p50, acc0, acc1 in rows:
        print(
            f"| {method} | {what} | {params:,} | {macs / 1e6:.1f}M | {p50:.3f} | {100 * (1 - p50 / dense_lat):.1f}% | "
            f"{100 * acc0:.2f}% | {100 * acc1:.2f}% |"
        )


if __name__ == "__main__":
    main()
