"""Exact pruning on the architectures people deploy: timm and torchvision models with planted sparsity.

For each architecture: built untrained at ``--size`` input and ``--classes`` classes, then in every BatchNorm
(subclasses included) 30% of the channels made exactly zero (gamma = beta = 0) and 3% made constant (gamma = 0,
beta != 0), with random running statistics elsewhere. ``prune_zero_channels`` then ``export_onnx`` (fused,
simplified, checked against torch); the row gives the share of parameters removed, the prune's wall time, its max
deviation (relative to the largest output) and the ONNX graph's leftover BatchNormalization nodes, or the one-line
reason the architecture was refused.

Needs timm and torchvision importable (a user's machine; see BENCHMARKS.md for how they ran here):
    python benchmarks/any_cnn.py [--only NAME ...] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from edgeshift.core.errors import EdgeshiftError
from edgeshift.exporter import export_onnx
from edgeshift.pruner.metrics import count_params
from edgeshift.pruner.structured import prune_zero_channels

# (label, source): the 21 architectures of the table in BENCHMARKS.md.
ARCHITECTURES = [
    ("ResNet-18 (timm)", "timm/resnet18"),
    ("ResNet-18 (torchvision)", "torchvision/resnet18"),
    ("ResNet-50", "timm/resnet50"),
    ("GoogLeNet", "torchvision/googlenet"),
    ("MNASNet", "torchvision/mnasnet1_0"),
    ("MobileNetV2", "timm/mobilenetv2_100"),
    ("MobileNetV3-Small", "timm/mobilenetv3_small_100"),
    ("EfficientNet-B0", "timm/efficientnet_b0"),
    ("RegNetX-200MF", "timm/regnetx_002"),
    ("RegNetY-200MF", "timm/regnety_002"),
    ("ResNeXt-26-ts", "timm/resnext26ts"),
    ("LCNet", "timm/lcnet_100"),
    ("GhostNet", "timm/ghostnet_100"),
    ("CSPResNet-50", "timm/cspresnet50"),
    ("Res2Net-50", "timm/res2net50_26w_4s"),
    ("ShuffleNetV2", "torchvision/shufflenet_v2_x1_0"),
    ("ReXNet-1.0", "timm/rexnet_100"),
    ("DLA-34", "timm/dla34"),
    ("VGG-11-BN", "timm/vgg11_bn"),
    ("DenseNet-121", "torchvision/densenet121"),
    ("RepVGG-A0", "timm/repvgg_a0"),
]


# Beyond that table: ``--extra`` runs these instead.
EXTRA_ARCHITECTURES = [
    ("MobileNetV3-Large", "timm/mobilenetv3_large_100"),
    ("EfficientNet-Lite0", "timm/efficientnet_lite0"),
    ("MixNet-S", "timm/mixnet_s"),
    ("FBNet-C", "timm/fbnetc_100"),
    ("TinyNet-A", "timm/tinynet_a"),
    ("SE-ResNeXt-26d", "timm/seresnext26d_32x4d"),
    ("ResNeXt-50 (torchvision)", "torchvision/resnext50_32x4d"),
    ("RegNetY-400MF (torchvision)", "torchvision/regnet_y_400mf"),
    ("EfficientNetV2-S (torchvision)", "torchvision/efficientnet_v2_s"),
    ("MobileOne-S0", "timm/mobileone_s0"),
    ("CSPDarkNet-53", "timm/cspdarknet53"),
    ("DarkNet-53", "timm/darknet53"),
    ("VoVNet-19-dw", "timm/ese_vovnet19b_dw"),
    ("DPN-68", "timm/dpn68"),
    ("HRNet-W18-small", "timm/hrnet_w18_small"),
    ("Inception-v3", "timm/inception_v3"),
    ("SelecSLS-42b", "timm/selecsls42b"),
    ("SqueezeNet (no BN)", "torchvision/squeezenet1_1"),
]


@torch.no_grad()
def plant(model: nn.Module, seed: int = 0, zero: float = 0.30, constant: float = 0.03) -> None:
    """Make ``zero`` of every BatchNorm's channels exactly zero and ``constant`` of them constant."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
            c = m.num_features
            assert (
                m.running_mean is not None and m.running_var is not None and m.weight is not None and m.bias is not None
            )
            m.running_mean.normal_(0, 0.1, generator=gen)
            m.running_var.uniform_(0.5, 1.5, generator=gen)
            m.weight.uniform_(0.5, 1.5, generator=gen)  # timm zero-initialises residual branches' last gamma
            m.bias.normal_(0, 0.1, generator=gen)
            order = torch.randperm(c, generator=gen)
            nz, nc = int(round(zero * c)), int(round(constant * c))
            m.weight[order[:nz]] = 0
            m.bias[order[:nz]] = 0
            m.weight[order[nz : nz + nc]] = 0
            m.bias[order[nz : nz + nc]] = torch.rand(nc, generator=gen) + 0.1


def build(source: str, classes: int) -> nn.Module:
    from edgeshift.pruner.models import sources

    return sources.create(source, num_classes=classes).eval()


def run_one(label: str, source: str, size: int, classes: int) -> dict:
    row: dict = {"architecture": label, "source": source}
    torch.manual_seed(0)
    try:
        model = build(source, classes)
    except Exception as exc:  # an architecture this timm/torchvision does not have
        row["outcome"] = f"not built: {exc}"
        return row
    plant(model)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    before = count_params(model)
    t0 = time.perf_counter()
    try:
        pruned, report = prune_zero_channels(model, x)
    except EdgeshiftError as exc:
        row.update(outcome="refused", reason=str(exc), seconds=round(time.perf_counter() - t0, 2))
        return row
    except Exception as exc:  # an internal error: the thing this benchmark exists to find
        row.update(
            outcome="internal error",
            reason=f"{type(exc).__name__}: {exc}"[:300],
            seconds=round(time.perf_counter() - t0, 2),
        )
        return row
    seconds = time.perf_counter() - t0
    with torch.no_grad():  # in float64: what is left is the float32 rounding of fused weights, or a real error
        ref64, out64 = copy.deepcopy(model).double()(x.double()), copy.deepcopy(pruned).double()(x.double())
    row["rel_diff_float64"] = float((ref64 - out64).abs().max() / ref64.abs().max())
    row.update(
        outcome="exact",
        params_before=before,
        params_after=count_params(pruned),
        removed=round(1 - count_params(pruned) / before, 4),
        seconds=round(seconds, 2),
        rel_diff=report.rel_diff,
        notes=list(getattr(report, "notes", [])),
    )
    with tempfile.TemporaryDirectory() as tmp:
        try:
            exp = export_onnx(pruned, x, Path(tmp) / "m.onnx")
            row.update(onnx_rel_diff=exp.rel_diff, bn_left=exp.op_counts.get("BatchNormalization", 0))
        except Exception as exc:
            row.update(outcome="export failed", reason=f"{type(exc).__name__}: {exc}"[:300])
    return row


def markdown(rows: list[dict]) -> str:
    """One table row per architecture: outcome, parameters removed, prune time, deviations, BN left, why."""
    out = [
        "| architecture | source | outcome | params removed | prune time | max dev (rel) | in float64 | "
        "ONNX dev (rel) | BN left in ONNX | kept whole, and why (first note) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        if r["outcome"] == "exact":
            note = (r["notes"][0] if r["notes"] else "").replace("|", "/")
            note = note if len(note) < 140 else note[:137] + "..."
            out.append(
                f"| {r['architecture']} | `{r['source']}` | exact | {r['removed']:.1%} | {r['seconds']:.2f} s | "
                f"{r['rel_diff']:.1e} | {r['rel_diff_float64']:.1e} | "
                f"{r.get('onnx_rel_diff', float('nan')):.1e} | {r.get('bn_left', '')} "
                f"| {note} |"
            )
        else:
            reason = r.get("reason", "").splitlines()[0].replace("|", "/")
            reason = reason if len(reason) < 140 else reason[:137] + "..."
            removed = f"{r['removed']:.1%}" if "removed" in r else ""
            out.append(
                f"| {r['architecture']} | `{r['source']}` | {r['outcome']} | {removed} | "
                f"{r.get('seconds', 0):.2f} s | {r.get('rel_diff', float('nan')):.1e} | | | | {reason} |"
            )
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", action="append", help="source names to run (default: all 21)")
    ap.add_argument("--skip", action="append", default=[], help="source names not to run")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--markdown", action="store_true", help="also print the BENCHMARKS.md table")
    ap.add_argument("--extra", action="store_true", help="run architectures beyond the table instead")
    args = ap.parse_args()
    torch.set_num_threads(2)
    rows = []
    for label, source in EXTRA_ARCHITECTURES if args.extra else ARCHITECTURES:
        if args.only and source not in args.only and label not in args.only:
            continue
        if source in args.skip:
            continue
        row = run_one(label, source, args.size, args.classes)
        rows.append(row)
        if row["outcome"] == "exact":
            print(
                f"{label:<24} removed {row['removed']:6.1%}  {row['seconds']:6.2f} s  dev {row['rel_diff']:.2g}"
                f" (f64 {row['rel_diff_float64']:.2g})"
                f"  onnx dev {row.get('onnx_rel_diff', float('nan')):.2g}  BN left {row.get('bn_left')}"
                + (f"  ({'; '.join(row['notes'])[:200]})" if row["notes"] else ""),
                flush=True,
            )
        else:
            print(
                f"{label:<24} {row['outcome']}: {row.get('reason', '')[:300]}  ({row.get('seconds', 0)} s)", flush=True
            )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    if args.markdown:
        print(markdown(rows))
    ok = sum(r["outcome"] == "exact" and r["removed"] >= 0.10 for r in rows)
    print(
        f"\n{ok} of {len(rows)} exact and at least 10% smaller; "
        f"{sum(r['outcome'] == 'internal error' for r in rows)} internal errors"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
