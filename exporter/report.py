"""``edgeshift report``: a Pareto chart (accuracy vs latency, marker size = bytes, INT8 and the ladder marked) and
a Markdown table. Every latency names the profile, thread count and machine it was measured on."""

from __future__ import annotations

from pathlib import Path

from edgeshift.core.atomic import atomic_path, write_text_atomic
from edgeshift.core.errors import InputFileError
from edgeshift.runtime.portfolio import Portfolio


def timing_label(portfolio: Portfolio) -> str:
    """Where the portfolio's latencies were measured: profile, threads, machine."""
    lat = next((v.record.latency for v in portfolio.variants if v.record.latency), None)
    if lat is None:
        return "not measured"
    return f"profile {lat.profile or '?'}, {lat.threads} threads, {lat.machine or '?'}"


def _steps(portfolio: Portfolio) -> dict[str, int]:
    ladder = portfolio.manifest.ladder
    return {name: i + 1 for i, name in enumerate(ladder.steps)} if ladder else {}


def markdown_table(portfolio: Portfolio) -> str:
    rows = [
        "| variant | precision | compression | params | MACs | ONNX bytes | deflated | top-1 | top-5 | p50 ms | "
        "p95 ms | p99 ms | ladder step |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    steps = _steps(portfolio)
    for v in portfolio.variants:
        acc, lat = v.record.accuracy, v.record.latency
        pct = lambda x: "-" if x is None else f"{100 * x:.2f}%"  # noqa: E731
        ms = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
        rows.append(
            f"| {v.name}{' (reference)' if v.reference else ''} | {v.record.precision} | "
            f"{v.compression:.1f}x | {v.params:,} | "
            f"{v.macs:,} | {v.bytes:,} | {v.deflated_bytes:,} | {pct(acc and acc.top1)} | "
            f"{pct(acc and acc.top5)} | {ms(lat and lat.p50_ms)} | {ms(lat and lat.p95_ms)} | "
            f"{ms(lat and lat.p99_ms)} | {steps.get(v.name, '-')} |"
        )
    total = sum(v.bytes for v in portfolio.variants)
    ladder = portfolio.manifest.ladder
    rows += [
        "",
        f"Latency at batch 1 measured at build time ({timing_label(portfolio)}), every variant against the "
        "others in one interleaved run.",
    ]
    if ladder:
        rows += [
            f"Ladder (fastest first; each step at least {100 * ladder.min_gain:.0f}% faster than the one above, "
            f"beyond the spread of timing rounds): {' -> '.join(ladder.steps)}."
        ]
    for v in portfolio.variants:
        q = v.record.quantization
        if q is not None and q.agreement_top1 is not None:
            src = next((o for o in portfolio.variants if o.name == q.source), None)
            drop = (
                ""
                if src is None or src.top1 is None or v.top1 is None
                else f", top-1 {100 * (v.top1 - src.top1):+.2f} points"
            )
            rows += [
                f"{v.name}: INT8 ({q.format}, {q.activations} activations, per-channel {q.per_channel}) of "
                f"{q.source}, calibrated on {q.calibration_samples} images ({q.calibration_method}); top-1 "
                f"agrees with {q.source} on {100 * q.agreement_top1:.1f}% of {q.test_samples} test images, max "
                f"logit deviation {q.max_logit_deviation:.3g}{drop}."
            ]
    rows += [
        f"Portfolio file {portfolio.file_bytes:,} bytes for {total:,} bytes of ONNX "
        f"({100 * portfolio.file_bytes / total:.1f}%)."
    ]
    dropped = portfolio.manifest.dropped
    if dropped:
        rows += ["", "Dropped by the post-processor:"] + [f"- {d.name}: {d.reason}" for d in dropped]
    return "\n".join(rows) + "\n"


def pareto_png(portfolio: Portfolio, path: Path) -> None:
    # here, not at the top: the file-only Agg backend must be chosen before pyplot first loads, and only a chart
    # needs matplotlib (seconds to import)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    pts = [
        (
            v,
            v.record.latency.p50_ms if v.record.latency else None,
            v.record.accuracy.top1 if v.record.accuracy else None,
        )
        for v in portfolio.variants
    ]
    biggest = max(v.bytes for v in portfolio.variants)
    where = {}
    for v, lat, acc in pts:
        if lat is None:
            continue
        y = 100 * acc if acc is not None else 0.0
        where[v.name] = (lat, y)
        int8 = v.record.precision == "int8"
        ax.scatter(
            lat,
            y,
            s=40 + 600 * v.bytes / biggest,
            alpha=0.6,
            marker="s" if int8 else "o",
            color="tab:red" if v.reference else "tab:orange" if int8 else "tab:blue",
            edgecolors="black",
        )
        ax.annotate(
            f"{v.name}\n{v.bytes / 1e6:.2f} MB", (lat, y), textcoords="offset points", xytext=(6, 6), fontsize=7
        )
    steps = [where[n] for n in (portfolio.manifest.ladder.steps if portfolio.manifest.ladder else ()) if n in where]
    if steps:
        ax.plot(
            [p[0] for p in steps],
            [p[1] for p in steps],
            "-",
            color="tab:green",
            lw=1.5,
            zorder=0,
            label="ladder (each step measured faster)",
        )
    from matplotlib.lines import Line2D

    handles = [
        Line2D([], [], marker="o", ls="", color="tab:blue", label="FP32"),
        Line2D([], [], marker="s", ls="", color="tab:orange", label="INT8"),
        Line2D([], [], marker="o", ls="", color="tab:red", label="dense reference"),
    ]
    if steps:
        handles.append(Line2D([], [], color="tab:green", label="ladder (each step measured faster)"))
    ax.legend(handles=handles, fontsize=7, loc="lower right")
    ax.set_xlabel(f"latency p50 at batch 1 (ms, ONNX Runtime; {timing_label(portfolio)})", fontsize=8)
    ax.set_ylabel("top-1 accuracy (%, ONNX Runtime)")
    ax.set_title(f"{portfolio.manifest.architecture or 'portfolio'}: accuracy vs latency (marker area = ONNX bytes)")
    ax.grid(alpha=0.3)
    ax.margins(0.2)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def write_report(portfolio_path: Path, out_dir: Path) -> tuple[Path, Path]:
    """Write ``<out_dir>/<stem>.md`` and ``<out_dir>/<stem>.png`` (the folder is created if missing, after the
    portfolio has opened cleanly)."""

    if out_dir.exists() and not out_dir.is_dir():
        raise InputFileError(f"{out_dir} is a file; pass a folder for the report")
    with Portfolio.open(portfolio_path) as pf:
        out_dir.mkdir(parents=True, exist_ok=True)
        md, png = out_dir / f"{portfolio_path.stem}.md", out_dir / f"{portfolio_path.stem}.png"
        write_text_atomic(
            md, f"# Portfolio {portfolio_path.name}\n\n![Pareto chart]({png.name})\n\n" + markdown_table(pf)
        )
        pareto_png(pf, png)
    return md, png
