"""Channel gating (FTWT) routed on ONNX Runtime, as the kit ships it: the checkpoint `edgeshift gate --signatures K`
writes, exported as the one graph `edgeshift export` makes of it (router, then per signature an ``If`` branch),
timed against the dense model and against the same parts as separate sessions.

Per input the thesis's gathered form ("Self-adaptive neural network for edge devices", sec. 6.3.4, Table 6.7)
slices every conv's weights by the masks of that input: ONNX Runtime then computes fewer MACs but on weights it
cannot prepare ahead, and loses more time than it saves. The routed form slices once, before any session exists
(``edgeshift.pruner.routing``): K signatures of fixed widths voted from the heads' masks, a router on the first
block choosing one per input, the backbone fine-tuned under the routed masks.

Top-1 on the whole test split (PyTorch, and the graph on ONNX Runtime); latency per input of the dense model,
the routed graph and the router + signature as two sessions, in one process under the profile, interleaved per
image in rotating order (warm-up excluded): mean, p50, p95; MACs per input (the router's, plus each input's own
signature's). ``--int8`` adds the INT8 forms of dense and routed as `edgeshift export --int8` makes them.

    edgeshift gate /tmp/gate-bench/vgg16-dense.pt -o /tmp/routed --data ../shared/datasets/cifar10 \\
        --train-samples 10000 --flops-reduction 0.55 --epochs 8 --batch-size 64 --signatures 4 --vote 0.6 \\
        --route-epochs 4
    python benchmarks/gate_routed_cifar.py /tmp/gate-bench/vgg16-dense.pt \\
        /tmp/routed/variants/gate-r0.85-decoupled-routed4.pt --data ../shared/datasets/cifar10 --out /tmp/routed
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from edgeshift import device_profiles
from edgeshift.core.atomic import write_text_atomic
from edgeshift.exporter.onnx_export import onnx_bytes
from edgeshift.exporter.quantize import Calibration, fastest_int8
from edgeshift.exporter.routing import export_parts, export_routed, routed_int8
from edgeshift.pruner.checkpoint import load_checkpoint
from edgeshift.pruner.data import load_dataset
from edgeshift.pruner.fuse import fuse_conv_bn
from edgeshift.pruner.metrics import count_macs
from edgeshift.pruner.routing import routed_network
from edgeshift.runtime.cascade import spin_stopping
from edgeshift.runtime.measure import machine_label
from edgeshift.runtime.session import create_session

WARMUP = 30
BATCH = 250


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dense", type=Path, help="The trained model the gated one came from.")
    ap.add_argument("routed", type=Path, help="The checkpoint `edgeshift gate --signatures K` wrote.")
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", type=Path, required=True, help="Folder for routed_result.json.")
    ap.add_argument("--timed-images", type=int, default=1000)
    ap.add_argument("--test-samples", type=int, default=0, help="A stratified subset of the test split (0: all).")
    ap.add_argument("--profile", default="host")
    ap.add_argument(
        "--int8", action="store_true", help="Also the INT8 forms of dense and routed (64 training images, minmax)."
    )
    args = ap.parse_args()
    dense, _ = load_checkpoint(args.dense)
    backbone, checkpoint = load_checkpoint(args.routed)
    routing = checkpoint["meta"].get("routing")
    test = load_dataset(args.data, "test", num_classes=10, size=32)
    test = test.subset(args.test_samples) if args.test_samples else test
    x, y = torch.from_numpy(test.normalised()), torch.from_numpy(test.labels)
    example = x[:2]
    routed = routed_network(backbone, routing, example, str(args.routed))
    k = len(routed.signatures)
    dense.eval()
    with torch.no_grad():
        dense_logits = torch.cat([dense(x[i : i + BATCH]) for i in range(0, len(x), BATCH)])
        routes = torch.cat([routed.routes(x[i : i + BATCH]) for i in range(0, len(x), BATCH)])
        logits = torch.cat([routed(x[i : i + BATCH]) for i in range(0, len(x), BATCH)])
    one = x[:1]
    signature_macs = [count_macs(n, one) for n in routed.signatures]
    router_macs = count_macs(routed.router, one)
    shares = torch.bincount(routes, minlength=k).double() / len(x)
    routed_macs = router_macs + float(sum(float(s) * m for s, m in zip(shares, signature_macs)))
    dense_macs = count_macs(dense, one)

    profile = spin_stopping(device_profiles.load_profile(args.profile))
    parts = export_parts(routed, example)
    with tempfile.TemporaryDirectory() as tmp:
        report = export_routed(routed, example, Path(tmp) / "routed.onnx", parts=parts)
        graph = (Path(tmp) / "routed.onnx").read_bytes()
    dense_graph = onnx_bytes(fuse_conv_bn(dense, example_inputs=one), one)
    sessions = {
        "dense": create_session(dense_graph, profile),
        "routed": create_session(graph, profile),
        "router": create_session(onnx_bytes(routed.router, one), profile),
        **{f"signature_{j}": create_session(onnx_bytes(n, one), profile) for j, n in enumerate(routed.signatures)},
    }
    if args.int8:  # as `edgeshift export --int8` makes them: each in its fastest format under the profile
        train = load_dataset(args.data, "train", num_classes=10, size=32).subset(64)
        calibration = Calibration(train.normalised(), "minmax", train.name)
        feed = {"input": x[:1].numpy()}
        sessions["dense_int8"] = fastest_int8(dense_graph, calibration, profile, feed, name="dense").session
        parts_bytes = [data for data, _ in parts]
        sessions["routed_int8"] = routed_int8(parts_bytes, calibration, profile, feed, name="routed").session

    def logits_of(name: str) -> np.ndarray:
        return np.concatenate(
            [sessions[name].run(None, {"input": x[i : i + BATCH].numpy()})[0] for i in range(0, len(x), BATCH)]
        )

    ort_logits = logits_of("routed")
    timed = x[: args.timed_images].numpy()

    def session(name: str) -> Callable[[np.ndarray], np.ndarray]:
        return lambda item: sessions[name].run(None, {"input": item})[0]

    def two_sessions(item: np.ndarray) -> np.ndarray:
        j = int(sessions["router"].run(None, {"input": item})[0].argmax())
        return sessions[f"signature_{j}"].run(None, {"input": item})[0]

    forms = {"dense": session("dense"), "routed": session("routed"), "routed_sessions": two_sessions}
    if args.int8:
        forms.update(dense_int8=session("dense_int8"), routed_int8=session("routed_int8"))
    for i in range(WARMUP):
        for f in forms.values():
            f(timed[i : i + 1])
    for j in range(k):  # every signature warm, whichever an input takes first
        sessions[f"signature_{j}"].run(None, {"input": timed[:1]})
    ms = {n: np.empty(len(timed)) for n in forms}
    names = list(forms)
    for i in range(len(timed)):
        item = timed[i : i + 1]
        turn = i % len(names)
        for n in names[turn:] + names[:turn]:
            t = time.perf_counter()
            forms[n](item)
            ms[n][i] = (time.perf_counter() - t) * 1e3
    figures = {
        n: {"mean_ms": float(v.mean()), "p50_ms": float(np.percentile(v, 50)), "p95_ms": float(np.percentile(v, 95))}
        for n, v in ms.items()
    }
    macs_cut = 1 - routed_macs / dense_macs
    latency_cut = 1 - figures["routed"]["mean_ms"] / figures["dense"]["mean_ms"]
    top1 = {
        "dense": float((dense_logits.argmax(1) == y).float().mean()),
        "routed": float((logits.argmax(1) == y).float().mean()),
        "routed_onnx": float((ort_logits.argmax(1) == y.numpy()).mean()),
        **{n: float((logits_of(n).argmax(1) == y.numpy()).mean()) for n in ("dense_int8", "routed_int8") if args.int8},
    }
    result = {
        "machine": machine_label(),
        "profile": profile.name,
        "date": time.strftime("%Y-%m-%d"),
        "checkpoint": str(args.routed),
        "signatures": k,
        "ratio": checkpoint["meta"].get("gate", {}).get("ratio"),
        "vote": routing.get("vote"),
        "widths": [[len(rows) for rows in per] for per in routing["signatures"]],
        "signature_macs": signature_macs,
        "router_macs": router_macs,
        "routed_share": shares.tolist(),
        "top1": top1,
        "dense_macs": dense_macs,
        "routed_macs": routed_macs,
        "macs_reduction": macs_cut,
        "latency_reduction": latency_cut,
        "latency_share_of_macs": latency_cut / macs_cut,
        "max_onnx_vs_torch": report.max_abs_diff,
        "graph_bytes": report.bytes,
        "timed_images": len(timed),
        "forms": figures,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out / "routed_result.json", json.dumps(result, indent=1))
    print(f"machine: {machine_label()}; profile {profile.name}; {time.strftime('%Y-%m-%d')}")
    print(
        f"routed graph: {report.bytes:,} bytes, {report.op_counts.get('If', 0)} If branches, ONNX Runtime vs "
        f"PyTorch max |difference| {report.max_abs_diff:.1e}"
    )
    for j in range(k):
        print(
            f"signature {j}: widths {result['widths'][j]}, {signature_macs[j] / 1e6:.1f} M MACs, routed "
            f"{100 * float(shares[j]):.1f}% of test inputs"
        )
    print(
        f"top-1 on {len(y)} test images: dense {100 * top1['dense']:.2f}%, routed {100 * top1['routed']:.2f}% "
        f"(PyTorch), {100 * top1['routed_onnx']:.2f}% (the graph on ONNX Runtime)"
        + (
            f"; INT8: dense {100 * top1['dense_int8']:.2f}%, routed {100 * top1['routed_int8']:.2f}%"
            if args.int8
            else ""
        )
    )
    print("\n| form | MACs per input | MACs reduction | mean ms | p50 ms | p95 ms | latency reduction (mean) |")
    print("|---|---|---|---|---|---|---|")
    macs = {"dense": dense_macs, "routed": routed_macs, "routed_sessions": routed_macs}
    macs.update(dense_int8=dense_macs, routed_int8=routed_macs)
    for form in forms:
        fig, m = figures[form], macs[form]
        print(
            f"| {form} | {m / 1e6:.1f} M | {1 - m / dense_macs:.1%} | {fig['mean_ms']:.3f} | {fig['p50_ms']:.3f} | "
            f"{fig['p95_ms']:.3f} | {1 - fig['mean_ms'] / figures['dense']['mean_ms']:.1%} |"
        )
    print(f"latency reduction / MACs reduction: {latency_cut / macs_cut:.2f} (the thesis's Table 6.7: 0.27 / 0.52)")


if __name__ == "__main__":
    main()
