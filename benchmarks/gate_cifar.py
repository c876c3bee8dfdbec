"""Channel gating (FTWT) on a CIFAR-10 VGG: top-1 and MACs per input of `edgeshift gate`, and what its masks are
worth on ONNX Runtime, as the thesis's Table 6.7 (MACs reduction against latency reduction) but per form:

- ``masked``: what `edgeshift export` makes of a gated checkpoint: every filter computed, the heads' masks applied;
- ``gathered``: the thesis's own form (sec. 6.3.4): per input, each conv runs on the rows and columns of its
  weights its gates kept (``NonZero`` and ``Gather`` in the graph), so the MACs skipped are not computed;
- ``static``: a plain VGG whose every conv has, for all inputs, the mean count of filters the gates kept: what
  the same MACs buy when the widths are fixed before the session is made (untrained: latency only).

Every form and the dense model (conv-BN folded in each) are timed in one process under the profile, one test image
per call, the order rotating per image, warm-up excluded: mean, p50 and p95 per input. Top-1 and MACs per input
come from PyTorch on the test split (the gathered form is checked to equal the gated model on every timed image).

    python benchmarks/gate_cifar.py /tmp/gate-bench/vgg16-dense.pt --data ../shared/datasets/cifar10 \\
        --out /tmp/gate-bench/vgg16 --flops-reduction 0.5 --epochs 2 --train-samples 10000
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgeshift import device_profiles
from edgeshift.exporter import pipeline as pipeline_lib
from edgeshift.exporter.onnx_export import onnx_bytes
from edgeshift.pruner.checkpoint import load_checkpoint
from edgeshift.pruner.data import load_dataset
from edgeshift.pruner.fuse import fuse_conv_bn
from edgeshift.pruner.gating import GatedNetwork, gated_network
from edgeshift.pruner.metrics import count_macs
from edgeshift.pruner.models.vgg import CifarVGG
from edgeshift.pruner.train import evaluate
from edgeshift.runtime.cascade import spin_stopping
from edgeshift.runtime.measure import machine_label
from edgeshift.runtime.session import create_session

WARMUP = 30


class Gathered(nn.Module):
    """A gated CIFAR VGG (conv-BN folded) computing, per input (batch 1), only the filters its gates keep: each conv
    on its weights' kept rows (its own gate) and columns (the gate before), the heads' softmax over every input
    channel (a skipped one pooled to 0 counts exp(0)) or, standardised, the head with the running statistics folded
    into its weights (a skipped channel, pooled to 0, then adds nothing), the classifier on the kept columns."""

    def __init__(self, fused: GatedNetwork, vgg: CifarVGG):
        super().__init__()
        # the folded layers as the gated graph holds them (``vgg``, unfolded, gives the order of convs and pools)
        self.layers = [
            m if isinstance(m, nn.MaxPool2d) else fused.net.get_submodule(f"features.{i}.0")
            for i, m in enumerate(vgg.features)
        ]
        self.convs = [m for m in self.layers if isinstance(m, nn.Conv2d)]
        self.heads = [g.head for g in fused.gate_list()]
        self.softmax = [g.head_input == "softmax" for g in fused.gate_list()]
        self.folded: list[tuple[torch.Tensor, torch.Tensor]] = []  # a standardised head's (weight, bias), folded
        for g in fused.gate_list():
            w, b = g.head.weight.detach().flatten(1), cast(torch.Tensor, g.head.bias).detach()
            if g.head_input == "standardised":
                norm = cast(nn.BatchNorm2d, g.normalise)
                scale = 1 / torch.sqrt(cast(torch.Tensor, norm.running_var) + norm.eps)
                w, b = w * scale, b - w @ (cast(torch.Tensor, norm.running_mean) * scale)
            self.folded.append((w, b))
        assert [b.conv for b in fused.blocks] == [
            f"features.{i}.0" for i, m in enumerate(vgg.features) if not isinstance(m, nn.MaxPool2d)
        ], "every conv of the VGG is gated"
        self.fc = cast(nn.Linear, fused.net.get_submodule("fc"))
        self._modules_kept = nn.ModuleList([*self.convs, *self.heads, self.fc])  # (their parameters, for export)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kept: torch.Tensor | None = None
        i = 0
        for layer in self.layers:
            if isinstance(layer, nn.MaxPool2d):
                x = layer(x)
                continue
            conv, head, (w_folded, b_folded) = cast(nn.Conv2d, layer), self.heads[i], self.folded[i]
            softmax = self.softmax[i]
            i += 1
            w_head = head.weight.flatten(1)  # (out, in)
            pooled = x.amax(dim=(2, 3))  # (1, kept in)
            if not softmax:
                w = w_folded if kept is None else w_folded.index_select(1, kept)
                logits = F.linear(pooled, w, b_folded)
            elif kept is None:
                logits = F.linear(torch.softmax(pooled, dim=1), w_head, head.bias)
            else:
                e = pooled.exp()
                denominator = e.sum(dim=1, keepdim=True) + (conv.in_channels - kept.numel())
                w_kept = w_head.index_select(1, kept)
                skipped = w_head.sum(dim=1) - w_kept.sum(dim=1)
                logits = F.linear(e / denominator, w_kept, head.bias) + skipped / denominator
            out = torch.nonzero(logits[0] > 0).flatten()
            weight = conv.weight.index_select(0, out)
            if kept is not None:
                weight = weight.index_select(1, kept)
            bias = cast(torch.Tensor, conv.bias).index_select(0, out)
            x = torch.relu(F.conv2d(x, weight, bias, padding=conv.padding))
            kept = out
        assert kept is not None
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return F.linear(x, self.fc.weight.index_select(1, kept), self.fc.bias)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dense", type=Path, help="A trained CIFAR VGG checkpoint.")
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--ratio", type=float, default=0.0)
    ap.add_argument("--flops-reduction", type=float, default=0.5)
    ap.add_argument("--mode", default="decoupled")
    ap.add_argument("--head-input", default="standardised")
    ap.add_argument("--head-lr-scale", type=float, default=10.0)
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--train-samples", type=int, default=0)
    ap.add_argument("--timed-images", type=int, default=1000)
    ap.add_argument("--profile", default="host")
    args = ap.parse_args()
    document = {
        "data": {"path": args.data, "train_samples": args.train_samples, "test_samples": 0},
        "methods": [
            {
                "name": "gate",
                "ratio": args.ratio,
                "flops_reduction": args.flops_reduction,
                "mode": args.mode,
                "head_input": args.head_input,
                "head_lr_scale": args.head_lr_scale,
                "epochs": args.epochs,
                "lr": args.lr,
            }
        ],
        "train": {"batch_size": args.batch_size, "seed": 0},
        "variants": {"dense": str(args.dense)},
        "output": {"dir": str(args.out)},
    }
    made = pipeline_lib.run_method(document, "gate_cifar.py")  # resumes: a gated checkpoint there is reused
    dense, _ = load_checkpoint(args.dense)
    backbone, checkpoint = load_checkpoint(made[-1])
    summary = checkpoint["meta"]["gate"]
    test = load_dataset(args.data, "test", num_classes=10, size=32)
    x, y = torch.from_numpy(test.normalised()), torch.from_numpy(test.labels)
    gated = gated_network(backbone, summary, x[:2], str(made[-1]))
    dense_top1, gated_top1 = evaluate(dense, x, y), evaluate(gated, x, y)
    macs = torch.cat([gated.macs_per_input(x[i : i + 500]) for i in range(0, len(x), 500)])
    heads = sum(b.in_channels * b.out_channels for b in gated.blocks)
    kept = []  # per block, the mean filters kept over the test split
    with torch.no_grad():
        counts = [torch.zeros(len(gated.blocks))]
        for i in range(0, len(x), 500):
            gated(x[i : i + 500])
            counts.append(torch.stack([g.kept.sum() for g in gated.gate_list()]))  # type: ignore[union-attr]
        kept = (torch.stack(counts).sum(0) / len(x)).round().clamp_min(1).int().tolist()

    fused_gated = fuse_conv_bn(gated, example_inputs=x[:1])
    fused_vgg = fuse_conv_bn(dense, example_inputs=x[:1])
    assert isinstance(dense, CifarVGG), "the gathered form is written for CifarVGG"
    gathered = Gathered(cast(GatedNetwork, fused_gated), dense).eval()
    plan: list[int | str] = []
    widths = iter(kept)
    for spec in (m for m in dense.features):
        plan.append("M" if isinstance(spec, nn.MaxPool2d) else next(widths))
    static = fuse_conv_bn(CifarVGG(plan, num_classes=10).eval(), example_inputs=x[:1])
    static_macs = count_macs(static, x[:1])
    forms = {"dense": fused_vgg, "masked": fused_gated, "gathered": gathered, "static": static}
    graphs = {name: onnx_bytes(model, x[:1]) for name, model in forms.items()}
    profile = spin_stopping(device_profiles.load_profile(args.profile))
    sessions = {name: create_session(data, profile) for name, data in graphs.items()}
    timed = x[: args.timed_images].numpy()
    for i in range(WARMUP):
        for s in sessions.values():
            s.run(None, {"input": timed[i : i + 1]})
    names = list(sessions)
    ms = {n: np.empty(len(timed)) for n in names}
    worst = 0.0
    for i in range(len(timed)):
        item = timed[i : i + 1]
        order = names[i % len(names) :] + names[: i % len(names)]
        outputs = {}
        for n in order:
            t = time.perf_counter()
            outputs[n] = sessions[n].run(None, {"input": item})[0]
            ms[n][i] = (time.perf_counter() - t) * 1e3
        worst = max(worst, float(np.abs(outputs["gathered"] - outputs["masked"]).max()))
    dense_macs = gated.dense_macs
    figures = {
        n: {"mean_ms": float(v.mean()), "p50_ms": float(np.percentile(v, 50)), "p95_ms": float(np.percentile(v, 95))}
        for n, v in ms.items()
    }
    macs_of = {
        "dense": dense_macs,
        "masked": dense_macs + heads,
        "gathered": float(macs.mean()),
        "static": static_macs,
    }
    result = {
        "machine": machine_label(),
        "profile": profile.name,
        "date": time.strftime("%Y-%m-%d"),
        "gate": {k: v for k, v in summary.items() if k != "heads"},
        "dense_top1": dense_top1,
        "gated_top1": gated_top1,
        "kept_per_block": kept,
        "max_gathered_vs_masked": worst,
        "macs": macs_of,
        "macs_p95": float(macs.quantile(0.95)),
        "timed_images": len(timed),
        "forms": figures,
    }
    (args.out / "gate_result.json").write_text(json.dumps(result, indent=1))
    print(f"machine: {machine_label()}; profile {profile.name}; {time.strftime('%Y-%m-%d')}")
    print(
        f"gate r={summary['ratio']:g} ({summary['mode']}): top-1 {100 * gated_top1:.2f}% vs dense "
        f"{100 * dense_top1:.2f}% on {len(y)} test images; MACs per input {macs.mean() / 1e6:.1f} M mean, "
        f"{1 - float(macs.mean()) / dense_macs:.1%} fewer than dense's {dense_macs / 1e6:.1f} M (heads included); "
        f"filters kept per block (mean): {kept}"
    )
    print(f"gathered form vs masked form: max |difference| {worst:.2e} over the {len(timed)} timed images")
    print("\n| form | MACs per input | MACs reduction | mean ms | p50 ms | p95 ms | latency reduction (mean) |")
    print("|---|---|---|---|---|---|---|")
    for n in names:
        f = figures[n]
        print(
            f"| {n} | {macs_of[n] / 1e6:.1f} M | {1 - macs_of[n] / dense_macs:.1%} | {f['mean_ms']:.3f} | "
            f"{f['p50_ms']:.3f} | {f['p95_ms']:.3f} | {1 - f['mean_ms'] / figures['dense']['mean_ms']:.1%} |"
        )


if __name__ == "__main__":
    main()
