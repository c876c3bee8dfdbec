"""Can a decision head predict its block's targets per input? ("Neural Networks Model Compression" (Elkerdawy),
ch. 6, FTWT.) On a trained CIFAR VGG, frozen, with every gate's mask set to its Algorithm 1 target at ratio r (the
ideal heads of the one-shot estimate, sec. 6.3.3), a linear head per block is fitted to the targets from its pooled
input in two forms, softmaxed (the thesis's head) and standardised per channel (the kit's), and scored on test
images against the best per-filter constant (the same mask for every input). Prints, per block, the share of
(input, filter) decisions each gets right, the share of filters each keeps and how much that count varies per
input; and the top-1 of the frozen model under the ideal masks.

    python benchmarks/gate_heads_probe.py /tmp/gate-bench/vgg16-dense.pt --data ../shared/datasets/cifar10 --ratio 0.87
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from edgeshift.pruner.checkpoint import load_checkpoint
from edgeshift.pruner.data import Dataset, load_dataset
from edgeshift.pruner.gating import GatedNetwork, mass_targets
from edgeshift.runtime.measure import machine_label

Pairs = dict[int, tuple[torch.Tensor, torch.Tensor]]  # block -> (pooled inputs, targets)


def collect(gated: GatedNetwork, ds: Dataset, ratio: float) -> tuple[Pairs, float]:
    """Each block's pooled inputs and targets over ``ds`` with the ideal masks applied, and the top-1."""
    seen: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    hooks = [
        g.register_forward_hook(
            lambda m, args, out, i=i: seen.setdefault(i, []).append(
                (args[0].amax(dim=(2, 3)), mass_targets(args[1], ratio))
            )
        )
        for i, g in enumerate(gated.gate_list())
    ]
    x, y = torch.from_numpy(ds.normalised()), torch.from_numpy(ds.labels)
    with torch.no_grad():
        out = torch.cat([gated(x[i : i + 250]) for i in range(0, len(x), 250)])
    for h in hooks:
        h.remove()
    pairs = {i: (torch.cat([a for a, _ in v]), torch.cat([b for _, b in v])) for i, v in seen.items()}
    return pairs, float((out.argmax(1) == y).float().mean())


def fit(inputs: torch.Tensor, targets: torch.Tensor, form: Callable[[torch.Tensor], torch.Tensor]) -> nn.Linear:
    """A linear head on ``form(inputs)`` fitted to the targets (full batch, Adam, 300 steps: converged here)."""
    torch.manual_seed(0)
    head = nn.Linear(inputs.shape[1], targets.shape[1])
    optimiser = torch.optim.Adam(head.parameters(), 1e-2)
    features = form(inputs)
    for _ in range(300):
        loss = F.binary_cross_entropy_with_logits(head(features), targets)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return head


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dense", type=Path, help="A trained CIFAR checkpoint with conv-BN-ReLU blocks.")
    ap.add_argument("--data", required=True)
    ap.add_argument("--ratio", type=float, default=0.87)
    ap.add_argument("--train-samples", type=int, default=3000)
    ap.add_argument("--test-samples", type=int, default=1000)
    args = ap.parse_args()
    model, _ = load_checkpoint(args.dense)
    model.eval()
    train = load_dataset(args.data, "train", num_classes=10, size=32).subset(args.train_samples)
    test = load_dataset(args.data, "test", num_classes=10, size=32).subset(args.test_samples)
    gated = GatedNetwork(model, torch.zeros(2, 3, 32, 32), args.ratio).eval()
    for g in gated.gate_list():
        g.forced = True  # the targets are the masks
    fitted, _ = collect(gated, train, args.ratio)
    scored, top1 = collect(gated, test, args.ratio)
    print(f"machine: {machine_label()}; {time.strftime('%Y-%m-%d %H:%M')}; {args.dense}, r = {args.ratio}")
    print(f"top-1 of the frozen model under the ideal masks: {top1:.2%} on {len(test.labels)} test images")
    print(
        "| block | filters | target keep (cv) | constant right | softmax right (keep, cv) "
        "| standardised right (keep, cv) |"
    )
    print("|---|---|---|---|---|---|")
    for i, (inputs, targets) in fitted.items():
        test_inputs, test_targets = scored[i]
        constant = ((targets.mean(0) > 0.5).float() == test_targets).float().mean()
        mean, std = inputs.mean(0), inputs.std(0) + 1e-6
        cells = []
        forms: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
            "softmax": lambda z: torch.softmax(z, dim=1),
            "standardised": lambda z: (z - mean) / std,
        }
        for form in forms.values():
            head = fit(inputs, targets, form)
            with torch.no_grad():
                masks = (head(form(test_inputs)) > 0).float()
            counts = masks.sum(1)
            cells.append(
                f"{float((masks == test_targets).float().mean()):.3f} ({float(masks.mean()):.2f}, "
                f"{float(counts.std() / counts.mean().clamp_min(1)):.2f})"
            )
        kept = test_targets.sum(1)
        print(
            f"| {i} | {targets.shape[1]} | {float(test_targets.mean()):.2f} ({float(kept.std() / kept.mean()):.2f}) "
            f"| {float(constant):.3f} | {cells[0]} | {cells[1]} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
