"""``edgeshift inspect``: the manifest of a portfolio as a table. Torch-free."""

from __future__ import annotations

import builtins
from pathlib import Path

from edgeshift.core.tables import echo_table
from edgeshift.core.text import printable

from .cascade import describe as describe_cascade
from .portfolio import Portfolio
from .vetting import vet_portfolio


def print_portfolio(path: Path, profile, verify: bool = True, load: bool = True) -> None:
    """Print the manifest; with ``verify``, first check every variant's bytes and, with ``load``, load and run each
    once in a process of its own under ``profile``'s limits (``vetting``), so a portfolio that cannot be served
    fails here (the exporter, which has just run every variant, skips that)."""
    print = _print  # every line may quote the file: one printable line each
    with Portfolio.open(path, profile.limits) as pf:
        if verify:
            pf.verify()
            if load:
                vet_portfolio(pf, profile)
        m = pf.manifest
        inp = m.input
        print(
            f"portfolio {path}: {m.architecture or '?'}, {len(pf.variants)} variants, "
            f"{pf.file_bytes:,} bytes on disk, schema {m.schema_version}"
            + (", all sha256 verified" if verify else "")
            + (f", every variant loaded under profile {profile.name}" if verify and load else "")
        )
        print(
            f"input {inp.name} {inp.dtype} {['N' if d is None else d for d in inp.shape]} {inp.layout}; "
            f"{len(m.labels)} classes; mean {list(m.preprocessing.mean)} std {list(m.preprocessing.std)}"
        )
        ladder = m.ladder.steps if m.ladder else ()
        step = {name: i + 1 for i, name in enumerate(ladder)}
        rows = []
        for v in pf.variants:
            lat = v.record.latency
            rows.append(
                [
                    v.name + (" *" if v.reference else ""),
                    v.record.precision
                    + ("" if v.record.nested is None else f", {v.record.nested.width:g} of {v.record.nested.base}"),
                    f"{v.compression:.1f}x",
                    f"{v.params:,}",
                    f"{v.macs:,}",
                    f"{v.bytes:,}",
                    f"{v.deflated_bytes:,}",
                    "-" if v.top1 is None else f"{100 * v.top1:.2f}%",
                    "-" if lat is None else f"{lat.p50_ms:.3f}",
                    "-" if lat is None else f"{lat.p95_ms:.3f}",
                    str(step[v.name]) if v.name in step else "-",
                ]
            )
        header = ["variant", "precision", "compr.", "params", "MACs", "ONNX bytes", "deflated", "top-1", "p50 ms"]
        echo_table(rows, [*header, "p95 ms", "ladder"])
        for d in m.dropped:
            print(f"dropped {d.name}: {d.reason}")
        timed = next((v.record.latency for v in pf.variants if v.record.latency), None)
        where = (
            "?" if timed is None else f"{timed.machine or '?'}, profile {timed.profile or '?'}, {timed.threads} threads"
        )
        print(f"* dense reference; latency at batch 1 measured at build time on {where}")
        if m.ladder:
            print(
                f"ladder (fastest first; each step >= {100 * m.ladder.min_gain:.0f}% faster than the one above, "
                f"profile {m.ladder.profile}, {m.ladder.threads} threads): {' -> '.join(m.ladder.steps)}"
            )
        for v in pf.variants:
            q = v.record.quantization
            if q is not None:
                agree = "-" if q.agreement_top1 is None else f"{100 * q.agreement_top1:.1f}%"
                dev = "-" if q.max_logit_deviation is None else f"{q.max_logit_deviation:.3g}"
                print(
                    f"{v.name}: INT8 {q.format}/{q.activations} of {q.source}, {q.calibration_samples} calibration "
                    f"images ({q.calibration_method}); top-1 agrees with {q.source} on {agree} of "
                    f"{q.test_samples} test images, max logit deviation {dev}"
                )
        if m.cascade is not None:
            print(describe_cascade(m.cascade))
            test = m.cascade.points[0]
            if test.test_top1 is not None:
                print(
                    f"  on the test images: top-1 {100 * test.test_top1:.2f}%, exits "
                    + " / ".join(f"{100 * s:.0f}%" for s in test.test_exit_shares)
                )


def _print(*parts: object) -> None:
    builtins.print(*(printable(p) for p in parts))
