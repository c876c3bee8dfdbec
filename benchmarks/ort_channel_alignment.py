"""Exactly pruned widths vs the same widths rounded up to multiples of 8 (``prune_zero_channels(align=8)``), timed
through ONNX Runtime at batch 1 against the unpruned model, in interleaved rounds.

Exact pruning leaves whatever widths the zeros dictate (61, 59, 123, ...); ``align`` adds zero channels (outputs
unchanged: the deviation is printed) so that every width is a multiple of 8. The figure is p50/p95 and the ratio
to the unpruned model, for each intra-op thread count given.

    python benchmarks/ort_channel_alignment.py [--arch vgg16] [--compression 16] [--checkpoint PATH]
                                               [--align 8] [--threads 1 2]
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np
import torch

from edgeshift.device_profiles import cpu_profile
from edgeshift.exporter.onnx_export import INPUT_NAME, onnx_bytes
from edgeshift.pruner.checkpoint import load_checkpoint
from edgeshift.pruner.models import get
from edgeshift.pruner.models.record import record_of
from edgeshift.pruner.structured import prune_zero_channels
from edgeshift.runtime.measure import machine_label, time_calls
from edgeshift.runtime.session import create_session


def conv_widths(model: torch.nn.Module) -> list[int]:
    return [m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--checkpoint",
        help="a sparse checkpoint (default: a synthetic sparse --arch at --compression, as in the runtime benchmarks)",
    )
    ap.add_argument("--arch", default="vgg16")
    ap.add_argument("--compression", type=float, default=16.0)
    ap.add_argument("--align", type=int, default=8)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iterations", type=int, default=300)
    args = ap.parse_args()
    if args.checkpoint:
        sparse, _ = load_checkpoint(args.checkpoint)
    else:
        from _common import synthetic_sparse

        sparse = synthetic_sparse(args.arch, args.compression, filter_sigma=2.0)
    sparse.eval()
    record = record_of(sparse)
    x = torch.randn(4, 3, record.input_size, record.input_size, generator=torch.Generator().manual_seed(0))
    pruned, plain = prune_zero_channels(sparse, x)
    aligned, report = prune_zero_channels(sparse, x, align=args.align)
    dense = get(record.name, **record.kwargs).eval()
    print(
        f"machine: {machine_label()}; {record.name}; batch 1; {args.rounds} interleaved rounds of "
        f"{args.iterations} calls; medians over rounds"
    )
    print(f"pruned widths:  {conv_widths(pruned)} (deviation {plain.rel_diff:.1e} relative)")
    print(
        f"aligned widths: {conv_widths(aligned)} (deviation {report.rel_diff:.1e} relative, "
        f"{report.channels_padded} zero channels added)"
    )
    models = {"dense": dense, "pruned": pruned, f"aligned-{args.align}": aligned}
    feed = {INPUT_NAME: x[:1].numpy().astype(np.float32)}
    raw = {name: onnx_bytes(model, x[:1]) for name, model in models.items()}
    for threads in args.threads:
        sessions = {name: create_session(b, cpu_profile(threads)) for name, b in raw.items()}
        p50s: dict[str, list[float]] = {n: [] for n in models}
        p95s: dict[str, list[float]] = {n: [] for n in models}
        for _ in range(args.rounds):
            for name, sess in sessions.items():
                st = time_calls(lambda: sess.run(None, feed), warmup=20, iterations=args.iterations)
                p50s[name].append(st.p50_ms)
                p95s[name].append(st.p95_ms)
        base = statistics.median(p50s["dense"])
        print(f"{threads} intra-op thread(s):")
        print(f"  {'model':<12} {'p50 ms':>8} {'p95 ms':>8} {'p50 vs dense':>12}")
        for name in models:
            p50, p95 = statistics.median(p50s[name]), statistics.median(p95s[name])
            print(f"  {name:<12} {p50:8.3f} {p95:8.3f} {p50 / base:12.2f}")
        a, p = statistics.median(p50s[f"aligned-{args.align}"]), statistics.median(p50s["pruned"])
        print(f"  aligned vs pruned p50: {a / p:.2f}x")


if __name__ == "__main__":
    main()
