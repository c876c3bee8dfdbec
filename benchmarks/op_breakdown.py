"""Where batch-1 latency goes, per operator: ONNX Runtime's profiler on each model under a device profile.

For each ONNX file: the nodes ONNX Runtime runs after its graph optimisations, and per op type the count, the
median time of one call of the model spent in them, and the share of the model's p50; then the part no width
removes: the fastest node's time times the node count (what the model would cost if every node were as cheap as
its cheapest), and the time outside nodes (session call, thread-pool wake-ups). Used to show why a target is out of
reach on a model, e.g. the ONNX files `benchmarks/targets_cifar.py` writes:

    python benchmarks/op_breakdown.py RUN/compare/onnx/dense.onnx RUN/compare/onnx/lp7-int8.onnx [--profile host]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import tempfile
import time
from pathlib import Path


def breakdown(path: Path, profile, calls: int = 500) -> dict:
    import numpy as np
    import onnxruntime as ort

    from edgeshift.runtime.session import session_options, session_plan

    plan = session_plan(profile, None)
    with tempfile.TemporaryDirectory(prefix="edgeshift-prof-") as tmp:
        opts = session_options(profile, plan)
        opts.enable_profiling = True
        opts.profile_file_prefix = os.path.join(tmp, "p")
        s = ort.InferenceSession(str(path), opts, providers=list(plan.providers))
        inp = s.get_inputs()[0]
        shape = [d if isinstance(d, int) else 1 for d in inp.shape]
        feed = {inp.name: np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
        plain = ort.InferenceSession(str(path), session_options(profile, plan), providers=list(plan.providers))
        walls = []  # the p50 without the profiler's own cost, the two sessions alternating
        for i in range(50 + calls):  # the first 50 calls of each are warm-up, dropped below by call index
            s.run(None, feed)
            t0 = time.perf_counter()
            plain.run(None, feed)
            if i >= 50:
                walls.append((time.perf_counter() - t0) * 1e3)
        events = json.loads(Path(s.end_profiling()).read_text())
    runs = [e for e in events if e.get("cat") == "Session" and e["name"] == "model_run"]
    nodes = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    runs = sorted(runs, key=lambda e: e["ts"])[50:]
    start = runs[0]["ts"] if runs else 0
    per_node: dict[str, list[float]] = collections.defaultdict(list)
    op_of, bounds = {}, [(r["ts"], r["ts"] + r["dur"]) for r in runs]
    for e in nodes:
        if e["ts"] < start:
            continue
        per_node[e["name"]].append(e["dur"])
        op_of[e["name"]] = e["args"].get("op_name", "?")
    node_count = len(per_node)
    node_median = {n: statistics.median(d) for n, d in per_node.items()}
    by_op: dict[str, dict] = collections.defaultdict(lambda: {"nodes": 0, "us": 0.0})
    for n, us in node_median.items():
        by_op[op_of[n]]["nodes"] += 1
        by_op[op_of[n]]["us"] += us
    run_us = statistics.median(b - a for a, b in bounds) if bounds else 0.0
    in_nodes = sum(node_median.values())
    return {
        "model": path.name,
        "p50_ms": statistics.median(walls),
        "run_us": run_us,
        "nodes": node_count,
        "in_nodes_us": in_nodes,
        "outside_nodes_us": max(run_us - in_nodes, 0.0),
        "cheapest_node_us": min(node_median.values()) if node_median else 0.0,
        "by_op": dict(sorted(by_op.items(), key=lambda kv: -kv[1]["us"])),
    }


def main() -> None:
    from edgeshift.device_profiles import load_profile

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", type=Path, nargs="+")
    ap.add_argument("--profile", default="host")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    profile = load_profile(args.profile)
    docs = [breakdown(p, profile) for p in args.models]
    for d in docs:
        print(
            f"\n{d['model']}: p50 {d['p50_ms']:.3f} ms (no profiler), profiled model_run {d['run_us']:.0f} us, "
            f"{d['nodes']} nodes {d['in_nodes_us']:.0f} us, outside nodes {d['outside_nodes_us']:.0f} us; "
            f"cheapest node {d['cheapest_node_us']:.1f} us x {d['nodes']} nodes = "
            f"{d['cheapest_node_us'] * d['nodes']:.0f} us"
        )
        print("| op | nodes | us per call | share of node time | us per node |")
        print("|---|---|---|---|---|")
        for op, v in d["by_op"].items():
            print(
                f"| {op} | {v['nodes']} | {v['us']:.1f} | {100 * v['us'] / max(d['in_nodes_us'], 1e-9):.0f}% | "
                f"{v['us'] / v['nodes']:.1f} |"
            )
    if args.json:
        args.json.write_text(json.dumps(docs, indent=2))


if __name__ == "__main__":
    main()
