"""Prune time of VGG-16 (CIFAR shape) at 16x compression vs copy.deepcopy of the same model, in one run.

The sparse model: global magnitude pruning to 1/16 of the conv+linear weights, after giving each filter a
log-normal scale so whole filters die as in trained sparse models (a trained IMP checkpoint can be passed with
--checkpoint instead). Prints medians over --repeats runs; the target is plan+prune <= 2x deepcopy.

    python benchmarks/prune_speed.py [--checkpoint PATH] [--repeats 15]
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time

import torch
from torch import nn

from edgeshift.pruner.models import get
from edgeshift.pruner.structured import STRUCTURE_CACHE, prune_zero_channels


@torch.no_grad()
def synthetic_sparse_vgg16(compression: float = 16.0, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = get("vgg16").eval()
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    for m in layers:
        m.weight.mul_(torch.exp(torch.randn(m.weight.shape[0]) * 1.0).reshape(-1, *[1] * (m.weight.dim() - 1)))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert (
                m.running_mean is not None and m.running_var is not None and m.weight is not None and m.bias is not None
            )
            m.running_var.uniform_(0.5, 1.5)
            m.bias.normal_(0, 0.1)
    scores = torch.cat([m.weight.abs().flatten() for m in layers])
    threshold = torch.kthvalue(scores, int(scores.numel() * (1 - 1 / compression))).values
    for m in layers:
        m.weight.mul_(m.weight.abs() > threshold)
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", help="a sparse VGG-16 edgeshift checkpoint instead of the synthetic one")
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    if args.checkpoint:
        from edgeshift.pruner.checkpoint import load_checkpoint

        model, _ = load_checkpoint(args.checkpoint)
    else:
        model = synthetic_sparse_vgg16()
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    nonzero = sum(int(torch.count_nonzero(m.weight)) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    total = sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))

    STRUCTURE_CACHE.clear()
    t = time.perf_counter()
    _, cold = prune_zero_channels(model, x)
    cold_total = time.perf_counter() - t

    copies, steps, fuses, totals = [], [], [], []
    for _ in range(args.repeats):
        t = time.perf_counter()
        copy.deepcopy(model)
        copies.append(time.perf_counter() - t)
        t = time.perf_counter()
        pruned, report = prune_zero_channels(model, x)
        totals.append(time.perf_counter() - t)
        steps.append(report.plan_seconds + report.prune_seconds)
        fuses.append(report.fuse_seconds)
    dc, step = statistics.median(copies), statistics.median(steps)
    print(
        f"machine: {platform.machine()} {platform.processor() or ''} torch {torch.__version__} "
        f"threads {torch.get_num_threads()}"
    )
    print(f"VGG-16 weights: {total:,} -> {nonzero:,} nonzero (compression {total / nonzero:.1f}x)")
    print(
        f"pruned params: {report.params_before:,} -> {report.params_after:,} "
        f"({report.params_before / report.params_after:.1f}x), channels removed {report.channels_removed}, "
        f"max|diff| {report.max_abs_diff:.2g} (rel {report.rel_diff:.2g})"
    )
    print(f"copy.deepcopy median          {dc * 1e3:8.2f} ms")
    print(f"plan+prune median             {step * 1e3:8.2f} ms   ratio {step / dc:.2f}x deepcopy (target <= 2x)")
    print(f"  plan / prune (last run)     {report.plan_seconds * 1e3:8.2f} / {report.prune_seconds * 1e3:.2f} ms")
    print(f"fuse (incl. its deepcopy)     {statistics.median(fuses) * 1e3:8.2f} ms")
    print(f"whole call incl. verification {statistics.median(totals) * 1e3:8.2f} ms")
    print(
        f"first call (no cached structure, process warm-up) plan+prune "
        f"{(cold.plan_seconds + cold.prune_seconds) * 1e3:.1f} ms, whole call {cold_total * 1e3:.1f} ms"
    )


if __name__ == "__main__":
    main()
