"""``edgeshift inspect``: the manifest of a portfolio as a table. Torch-free."""

from __future__ import annotations

from pathlib import Path

from edgeshift.core.tables import echo_table

from .portfolio import Portfolio


def print_portfolio(path: Path, verify: bool = True) -> None:
    with Portfolio.open(path) as pf:
        if verify:
            pf.verify()
        m = pf.manifest
        inp = m.input
        print(
            f"portfolio {path}: {m.architecture or '?'}, {len(pf.variants)} variants, "
            f"{pf.file_bytes:,} bytes on disk, schema {m.schema_version}" + (", all sha256 verified" if verify else "")
        )
        print(
            f"input {inp.name} {inp.dtype} {['N' if d is None else d for d in inp.shape]} {inp.layout}; "
            f"{len(m.labels)} classes; mean {list(m.preprocessing.mean)} std {list(m.preprocessing.std)}"
        )
        rows = []
        for v in pf.variants:
            rows.append(
                [
                    v.name + (" *" if v.reference else ""),
                    f"{v.compression:.1f}x",
                    f"{v.params:,}",
                    f"{v.macs:,}",
                    f"{v.bytes:,}",
                    f"{v.deflated_bytes:,}",
                    "-" if v.top1 is None else f"{100 * v.top1:.2f}%",
                    "-" if v.p95_ms is None else f"{v.p95_ms:.3f}",
                ]
            )
        echo_table(rows, ["variant", "compr.", "params", "MACs", "ONNX bytes", "deflated", "top-1", "p95 ms"])
        for d in m.dropped:
            print(f"dropped {d.name}: {d.reason}")
        print(
            "* dense reference; p95 measured at build time on "
            + next((v.record.latency.machine or "?" for v in pf.variants if v.record.latency), "?")
        )
