"""``edgeshift report``: a Pareto chart (accuracy vs latency, marker size = bytes) and a Markdown table."""
from __future__ import annotations

from pathlib import Path

from edgeshift.core.atomic import atomic_path, write_text_atomic
from edgeshift.runtime.portfolio import Portfolio


def markdown_table(portfolio: Portfolio) -> str:
    rows = ["| variant | compression | params | MACs | ONNX bytes | deflated | top-1 | top-5 | p50 ms | p95 ms | p99 ms |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for v in portfolio.variants:
        acc, lat = v.record.accuracy, v.record.latency
        pct = lambda x: "-" if x is None else f"{100 * x:.2f}%"  # noqa: E731
        ms = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
        rows.append(f"| {v.name}{' (reference)' if v.reference else ''} | {v.compression:.1f}x | {v.params:,} | "
                    f"{v.macs:,} | {v.bytes:,} | {v.deflated_bytes:,} | {pct(acc and acc.top1)} | "
                    f"{pct(acc and acc.top5)} | {ms(lat and lat.p50_ms)} | {ms(lat and lat.p95_ms)} | "
                    f"{ms(lat and lat.p99_ms)} |")
    machine = next((v.record.latency.machine for v in portfolio.variants if v.record.latency), "?")
    total = sum(v.bytes for v in portfolio.variants)
    rows += ["", f"Latency at batch 1 measured at build time on: {machine}.",
             f"Portfolio file {portfolio.file_bytes:,} bytes for {total:,} bytes of ONNX "
             f"({100 * portfolio.file_bytes / total:.1f}%)."]
    dropped = portfolio.manifest.dropped
    if dropped:
        rows += ["", "Dropped by the post-processor:"] + [f"- {d.name}: {d.reason}" for d in dropped]
    return "\n".join(rows) + "\n"


def pareto_png(portfolio: Portfolio, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    pts = [(v, v.record.latency and v.record.latency.p50_ms, v.record.accuracy and v.record.accuracy.top1)
           for v in portfolio.variants]
    biggest = max(v.bytes for v in portfolio.variants)
    for v, lat, acc in pts:
        if lat is None:
            continue
        y = 100 * acc if acc is not None else 0.0
        ax.scatter(lat, y, s=40 + 600 * v.bytes / biggest, alpha=0.6,
                   color="tab:red" if v.reference else "tab:blue", edgecolors="black")
        ax.annotate(f"{v.name}\n{v.bytes / 1e6:.2f} MB", (lat, y), textcoords="offset points", xytext=(6, 6),
                    fontsize=7)
    ax.set_xlabel("latency p50 at batch 1 (ms, ONNX Runtime)")
    ax.set_ylabel("top-1 accuracy (%, ONNX Runtime)")
    ax.set_title(f"{portfolio.manifest.architecture or 'portfolio'}: accuracy vs latency "
                 "(marker area = ONNX bytes)")
    ax.grid(alpha=0.3)
    ax.margins(0.2)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def write_report(portfolio_path: Path, out_dir: Path) -> tuple[Path, Path]:
    """Write ``<out_dir>/<stem>.md`` and ``<out_dir>/<stem>.png`` (the folder is created if missing, after the
    portfolio has opened cleanly)."""
    from edgeshift.core.errors import InputFileError

    if out_dir.exists() and not out_dir.is_dir():
        raise InputFileError(f"{out_dir} is a file; pass a folder for the report")
    with Portfolio.open(portfolio_path) as pf:
        out_dir.mkdir(parents=True, exist_ok=True)
        md, png = out_dir / f"{portfolio_path.stem}.md", out_dir / f"{portfolio_path.stem}.png"
        write_text_atomic(md, f"# Portfolio {portfolio_path.name}\n\n![Pareto chart]({png.name})\n\n"
                              + markdown_table(pf))
        pareto_png(pf, png)
    return md, png
