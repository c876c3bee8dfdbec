"""``edgeshift bench``: every variant measured on this device under a profile. Torch-free."""

from __future__ import annotations

import csv
import gc
import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from edgeshift.core.atomic import write_text_atomic

from .measure import machine_fingerprint, time_calls
from .portfolio import Portfolio
from .session import absorb_first_session_cost, session_for_variant


@dataclass
class VariantBench:
    name: str
    bytes: int
    deflated_bytes: int
    inflate_ms: float
    create_ms: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    throughput: float  # items per second at the profile's batch size
    batch: int
    calls: int
    rss_growth_mb: float  # resident memory the session added while created and run
    top1: float | None  # accuracy recorded at build time


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def bench_portfolio(portfolio: Portfolio, profile, variants: list[str] | None = None) -> list[VariantBench]:
    """Inflate, create and time each variant (warm-up excluded) under ``profile``."""
    results = []
    batch = profile.serving.batch_size
    shape = [batch if d is None else d for d in portfolio.input_spec.shape]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    absorb_first_session_cost(portfolio, profile)
    for name in variants or portfolio.names:
        info = portfolio.info(name)
        gc.collect()
        before = _rss_mb()
        session, inflate_ms, create_ms = session_for_variant(portfolio, name, profile)
        inp = session.get_inputs()[0].name
        b = profile.benchmark
        stats = time_calls(
            lambda: session.run(None, {inp: x}),
            warmup=b.warmup,
            iterations=b.iterations,
            max_seconds=b.max_seconds,
            batch=batch,
        )
        growth = _rss_mb() - before
        results.append(
            VariantBench(
                name,
                info.bytes,
                info.deflated_bytes,
                inflate_ms,
                create_ms,
                stats.p50_ms,
                stats.p95_ms,
                stats.p99_ms,
                stats.throughput,
                batch,
                stats.calls,
                growth,
                info.top1,
            )
        )
        session = None  # release it before the next variant is measured
    return results


def bench_document(portfolio: Portfolio, profile, results: list[VariantBench]) -> dict:
    return {
        "portfolio": str(portfolio.path),
        "profile": profile.name,
        "fingerprint": machine_fingerprint(),
        "settings": {
            "batch": profile.serving.batch_size,
            "warmup": profile.benchmark.warmup,
            "iterations": profile.benchmark.iterations,
            "intra_op_threads": profile.execution.intra_op_threads,
        },
        "variants": [asdict(r) for r in results],
    }


def write_json(path: Path, doc: dict) -> None:
    write_text_atomic(path, json.dumps(doc, indent=2))


def write_csv(path: Path, results: list[VariantBench]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(asdict(results[0])))
    w.writeheader()
    for r in results:
        w.writerow(asdict(r))
    write_text_atomic(path, buf.getvalue())


BENCH_HEADER = ["variant", "inflate ms", "create ms", "p50 ms", "p95 ms", "p99 ms", "items/s", "RSS MB", "top-1"]


def bench_rows(results: list[VariantBench]) -> list[list[str]]:
    """One text row per variant, for ``echo_table`` with ``BENCH_HEADER``."""
    return [
        [
            r.name,
            f"{r.inflate_ms:.1f}",
            f"{r.create_ms:.1f}",
            f"{r.p50_ms:.3f}",
            f"{r.p95_ms:.3f}",
            f"{r.p99_ms:.3f}",
            f"{r.throughput:.1f}",
            f"{r.rss_growth_mb:.1f}",
            "-" if r.top1 is None else f"{100 * r.top1:.2f}%",
        ]
        for r in results
    ]


def bench_file(path: str | Path, profile, variants: list[str] | None = None) -> tuple[dict, list[VariantBench]]:
    """Open the portfolio at ``path`` and bench it under ``profile``: (document, results)."""
    with Portfolio.open(path) as pf:
        for name in variants or []:
            pf.info(name)
        results = bench_portfolio(pf, profile, variants or None)
        return bench_document(pf, profile, results), results
