"""How much DEFLATE saves on a VGG-16 portfolio at compression 1, 2, 4, ..., 64.

Two portfolios: the sparse variants as trained (unstructured zeros kept, every layer full width) and the same
variants after exact structured pruning. Prints each variant's ONNX and deflated bytes and the totals.
Target: the portfolio deflates to <= 40% of the summed ONNX bytes when the variants come from real
sparse training. Without --run-dir the variants are synthetic (benchmarks/_common.py), which says nothing of
trained weights' deflation; with --run-dir RUN (an `edgeshift imp` run of VGG-16) the real levels are used.

    python benchmarks/portfolio_deflate.py [--run-dir RUN] [--levels 7]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from _common import synthetic_sparse

from edgeshift.exporter.onnx_export import export_onnx
from edgeshift.exporter.profile import deflated_size
from edgeshift.pruner.structured import prune_zero_channels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", help="an `edgeshift imp` run directory (level_<k>/checkpoint.pt)")
    ap.add_argument("--levels", type=int, default=7)
    args = ap.parse_args()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    models = {}
    if args.run_dir:
        from edgeshift.pruner.checkpoint import load_checkpoint

        for k in range(args.levels):
            path = Path(args.run_dir) / f"level_{k}" / "checkpoint.pt"
            if path.is_file():
                models[f"level{k}"] = load_checkpoint(path)[0]
        source = f"trained levels from {args.run_dir}"
    else:
        models = {f"c{2**k}x": synthetic_sparse("vgg16", 2**k, filter_sigma=1.0) for k in range(args.levels)}
        source = "synthetic sparse VGG-16 (NOT trained: the target needs real sparse training)"
    print(f"source: {source}")
    totals = {"sparse": [0, 0], "pruned": [0, 0]}
    print(
        f"{'variant':<8} {'sparse onnx':>12} {'deflated':>10} {'ratio':>6}   {'pruned onnx':>12} {'deflated':>10} "
        f"{'ratio':>6}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for name, model in models.items():
            row = []
            for kind, m in (("sparse", model), ("pruned", prune_zero_channels(model, x)[0])):
                data_path = Path(tmp) / f"{name}-{kind}.onnx"
                export_onnx(m, x, data_path, random_batches=0)
                data = data_path.read_bytes()
                d = deflated_size(data)
                totals[kind][0] += len(data)
                totals[kind][1] += d
                row += [len(data), d, d / len(data)]
            print(f"{name:<8} {row[0]:12,} {row[1]:10,} {row[2]:6.1%}   {row[3]:12,} {row[4]:10,} {row[5]:6.1%}")
    for kind, (raw, d) in totals.items():
        print(f"{kind} portfolio: {raw:,} ONNX bytes -> {d:,} deflated = {d / raw:.1%} (target <= 40%)")


if __name__ == "__main__":
    main()
