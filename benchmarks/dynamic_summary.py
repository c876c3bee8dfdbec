"""Per-input dynamic inference on CIFAR-10 in one table and one chart: the dense model, the best static variant,
the confidence cascade and channel gating (FTWT: masked, gathered and routed forms), each against the dense model
of its own run: top-1, mean and p95 latency per input under the profile, MACs per input.

Reads what the benchmarks wrote: ``cascade_cifar.py``'s ``result.json`` (one per model), ``gate_cifar.py``'s
``gate_result.json`` and ``gate_routed_cifar.py``'s ``routed_result.json``; writes ``dynamic.md`` and
``dynamic.png`` to ``--out``.

    python benchmarks/dynamic_summary.py --cascade ResNet-20=/tmp/cascade-bench/resnet20-lp/result.json \\
        --cascade VGG-16=/tmp/cascade-bench/vgg16/result.json --gate VGG-16=/tmp/gate-bench/vgg16-r83 \\
        --out /tmp/dynamic
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from edgeshift.core.atomic import atomic_path, write_text_atomic


@dataclass(frozen=True)
class Row:
    model: str
    method: str
    top1: float | None  # None: timing only
    dense_top1: float
    mean_ms: float
    p95_ms: float
    dense_mean_ms: float
    macs: float
    dense_macs: float

    @property
    def speed(self) -> float:
        return self.mean_ms / self.dense_mean_ms


def named(text: str) -> tuple[str, Path]:
    model, _, path = text.partition("=")
    if not path:
        raise SystemExit(f"give MODEL=PATH, not {text!r}")
    return model, Path(path)


def cascade_rows(model: str, path: Path) -> list[Row]:
    r = json.loads(path.read_text())
    d = r["dense"]
    rows = [
        Row(
            model,
            "dense",
            d["top1"],
            d["top1"],
            d["mean_ms"],
            d["p95_ms"],
            d["mean_ms"],
            r["dense_macs"],
            r["dense_macs"],
        )
    ]
    if r.get("static"):
        s = r["static"]
        rows.append(
            Row(model, f"best static ({r['static_variant']})", s["top1"], d["top1"], s["mean_ms"], s["p95_ms"],
                d["mean_ms"], r["static_macs"], r["dense_macs"])
        )  # fmt: skip
    c = r["cascade"]
    rows.append(
        Row(model, "cascade (" + " -> ".join(r["steps"]) + ")", c["top1"], d["top1"], c["mean_ms"], c["p95_ms"],
            d["mean_ms"], r["macs_per_input"], r["dense_macs"])
    )  # fmt: skip
    return rows


def gate_rows(model: str, run: Path) -> list[Row]:
    """The masked and gathered forms (``gate_result.json``) and the routed ones (``routed_result.json``), whichever
    the run folder holds."""
    rows = []
    ratio = None
    if (run / "gate_result.json").exists():
        g = json.loads((run / "gate_result.json").read_text())
        forms, macs = g["forms"], g["macs"]
        dense_ms = forms["dense"]["mean_ms"]
        ratio = g["gate"]["ratio"]
        for form in ("masked", "gathered"):
            f = forms[form]
            rows.append(
                Row(model, f"FTWT r={ratio:g}, {form}", g["gated_top1"], g["dense_top1"], f["mean_ms"], f["p95_ms"],
                    dense_ms, macs[form], macs["dense"])
            )  # fmt: skip
    routed = run / "routed_result.json"
    if routed.exists():
        r = json.loads(routed.read_text())
        ratio = r.get("ratio", ratio)
        label = "FTWT" if ratio is None else f"FTWT r={ratio:g}"
        f, d = r["forms"]["routed"], r["forms"]["dense"]
        rows.append(
            Row(model, f"{label}, routed ({r['signatures']} signatures)", r["top1"]["routed"],
                r["top1"]["dense"], f["mean_ms"], f["p95_ms"], d["mean_ms"], r["routed_macs"], r["dense_macs"])
        )  # fmt: skip
        if "routed_int8" in r["forms"]:  # gate_routed_cifar.py --int8: the INT8 forms, against the FP32 dense
            q = r["forms"]["routed_int8"]
            rows.append(
                Row(model, f"{label}, routed INT8 ({r['signatures']} signatures)", r["top1"]["routed_int8"],
                    r["top1"]["dense"], q["mean_ms"], q["p95_ms"], d["mean_ms"], r["routed_macs"], r["dense_macs"])
            )  # fmt: skip
    if not rows:
        raise SystemExit(f"{run}: neither gate_result.json nor routed_result.json; run the gating benchmarks first")
    return rows


def markdown(rows: list[Row]) -> str:
    lines = [
        "| model | method | top-1 | vs dense | mean ms | p95 ms | mean / dense | MACs per input | MACs / dense |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        top1 = f"{100 * r.top1:.2f}%" if r.top1 is not None else "-"
        delta = f"{100 * (r.top1 - r.dense_top1):+.2f}" if r.top1 is not None else "-"
        lines.append(
            f"| {r.model} | {r.method} | {top1} | {delta} | {r.mean_ms:.3f} | {r.p95_ms:.3f} | {r.speed:.2f}x | "
            f"{r.macs / 1e6:.1f} M | {r.macs / r.dense_macs:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def chart(rows: list[Row], path: Path) -> None:
    # here, not at the top: the file-only Agg backend must be chosen before pyplot first loads
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    colours = dict(zip(dict.fromkeys(r.model for r in rows), ("tab:blue", "tab:red", "tab:green", "tab:purple")))
    dense_labelled = False
    for r in rows:
        if r.top1 is None:
            continue
        marker = "o" if r.method == "dense" else "s" if r.method.startswith("best") else "^"
        marker = "D" if r.method.startswith("FTWT") else marker
        y = 100 * (r.top1 - r.dense_top1)
        ax.scatter(r.speed, y, color=colours[r.model], marker=marker, s=50, edgecolors="black", alpha=0.8)
        if r.method == "dense":  # every model's dense point is (1, 0): one label
            if dense_labelled:
                continue
            dense_labelled = True
        label = "dense (each model's own)" if r.method == "dense" else f"{r.model}: {r.method}"
        ax.annotate(label, (r.speed, y), textcoords="offset points", xytext=(5, 4), fontsize=6)
    ax.axvline(0.6, color="grey", ls=":", lw=1)
    ax.axhline(-0.5, color="grey", ls=":", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("mean latency per input / the dense model's (same run, ONNX Runtime, log scale)", fontsize=8)
    ax.set_ylabel("top-1 - dense top-1 (points)", fontsize=8)
    ax.set_title("Per-input dynamic inference on CIFAR-10 (dotted: 0.6x, -0.5 points)", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cascade", action="append", default=[], type=named, help="MODEL=cascade_cifar result.json")
    ap.add_argument(
        "--gate",
        action="append",
        default=[],
        type=named,
        help="MODEL=gate_cifar.py / gate_routed_cifar.py --out folder",
    )
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    rows: list[Row] = []
    for model, path in args.cascade:
        rows += cascade_rows(model, path)
    for model, run in args.gate:
        rows += gate_rows(model, run)
    first = {r.model: i for i, r in reversed(list(enumerate(rows)))}
    rows.sort(key=lambda r: first[r.model])  # each model's rows together, in the order models first came
    args.out.mkdir(parents=True, exist_ok=True)
    table = markdown(rows)
    write_text_atomic(args.out / "dynamic.md", table)
    chart(rows, args.out / "dynamic.png")
    print(table)
    print(f"wrote {args.out / 'dynamic.md'} and {args.out / 'dynamic.png'}")


if __name__ == "__main__":
    main()
