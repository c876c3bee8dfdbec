"""``edgeshift bench``: every variant measured on this device under a profile, against each other in one
interleaved run, and the ladder those figures give. Torch-free."""

from __future__ import annotations

import csv
import gc
import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from edgeshift.core.atomic import write_text_atomic
from edgeshift.core.errors import PortfolioError

from .cascade import expected_latency
from .ladder import LadderPoint, bench_ladder, is_faster, not_faster_reason
from .measure import machine_fingerprint
from .portfolio import Portfolio
from .session import absorb_first_session_cost, engine_cached, run_bounded, session_for_variant, session_plan
from .timing_process import Graph, TimingError, TimingSettings, time_graphs


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
    sha256: str = ""  # which model was measured (a saved bench is used only while it matches)
    round_p50_ms: tuple[float, ...] = ()  # the median of each interleaved round
    providers: tuple[str, ...] = ()  # what the session really runs on (ORT's get_providers)
    engine_cached: bool | None = None  # its compiled engine came from the profile's cache (None: no engine cache)
    thread_pool: str = ""  # "shared": timed in a process of its own on one pool; "per-session": in this one
    agreement: float | None = None  # INT8: top-1 agreement with its FP32 source on the shipped check inputs, here
    sliced: bool = False  # a nested width: inflate_ms is slicing its base's weights (kept in memory once read)


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def bench_portfolio(portfolio: Portfolio, profile, variants: list[str] | None = None) -> list[VariantBench]:
    """Time every variant under ``profile`` against the others in one interleaved run (warm-up excluded,
    ``benchmark.rounds`` rounds), so that a drift of the device falls on every variant alike and the ladder
    compares like with like; then inflate and create each one's session here. The timing runs in a process of its
    own whose sessions share one thread pool, under the profile's limits (``edgeshift.runtime.timing_process``);
    creation cost and memory are measured here."""
    batch = profile.serving.batch_size
    spec = portfolio.input_spec
    shape = [batch if d is None else d for d in spec.shape]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    names = variants or portfolio.names
    plans = {n: session_plan(profile, portfolio.info(n).sha256) for n in names}
    cached = {n: engine_cached(plan) for n, plan in plans.items()}  # before any session is made
    # Timed first, in a process of its own under the profile's limits: an untrusted variant is loaded there before
    # this process makes its session.
    graphs = {name: Graph(portfolio.inflate(name), {spec.name: x}, portfolio.info(name).sha256) for name in names}
    try:
        stats = time_graphs(graphs, profile, TimingSettings.of_profile(profile, batch), kind="variant")
    except TimingError as exc:
        raise PortfolioError(f"{portfolio.path}: {exc}") from None
    del graphs
    absorb_first_session_cost(portfolio, profile)
    made: dict[str, tuple[float, float, float]] = {}  # inflate ms, create ms, RSS growth MB
    providers: dict[str, tuple[str, ...]] = {}
    checks = portfolio.check_inputs()
    top1: dict[str, np.ndarray] = {}  # on the check inputs: what the INT8 re-check compares
    sessions = []  # alive until every variant is made: each one's memory is measured beside the others
    for name in names:
        gc.collect()
        before = _rss_mb()
        session, inflate_ms, create_ms = session_for_variant(portfolio, name, profile, plan=plans[name])
        run_bounded(session, {spec.name: x}, profile.limits.run_seconds, f"{portfolio.path}: variant {name!r}")
        made[name] = (inflate_ms, create_ms, _rss_mb() - before)
        providers[name] = tuple(session.get_providers())
        if checks is not None:
            out = run_bounded(session, {spec.name: checks}, profile.limits.run_seconds, f"{portfolio.path}: {name}")
            top1[name] = np.asarray(out[0]).argmax(1)
        sessions.append(session)
        del session
    del sessions
    gc.collect()
    results = []
    for name, (inflate_ms, create_ms, growth) in made.items():
        info, st = portfolio.info(name), stats[name]
        q = info.record.quantization
        agree = None
        if q is not None and name in top1 and q.source in top1:
            agree = float((top1[name] == top1[q.source]).mean())
        results.append(
            VariantBench(
                name,
                info.bytes,
                info.deflated_bytes,
                inflate_ms,
                create_ms,
                st.p50_ms,
                st.p95_ms,
                st.p99_ms,
                st.throughput,
                batch,
                st.calls,
                growth,
                info.top1,
                info.sha256,
                st.round_p50_ms,
                providers[name],
                cached[name],
                st.thread_pool,
                agree,
                portfolio.is_nested(name),
            )
        )
    return results


def judge_int8_here(portfolio: Portfolio, results: list[VariantBench], min_agreement: float) -> dict[str, dict]:
    """What this device says of its INT8 variants, with the reason either way: one whose top-1 agrees with its FP32
    source, on the inputs shipped in the portfolio, less than ``min_agreement`` is refused (this CPU computes it
    differently: saturating INT8 kernels without VNNI); one built on another CPU for this device (``pending``) is
    kept only when this run measured it faster than its source (``ladder.is_faster``)."""
    by_name = {r.name: r for r in results}
    checks = {}
    for r in results:
        if r.agreement is not None and r.agreement < min_agreement:
            count = portfolio.manifest.checks.count if portfolio.manifest.checks else 0
            checks[r.name] = {
                "kept": False,
                "reason": f"this device computes it differently: its top-1 agrees with its FP32 source on "
                f"{100 * r.agreement:.0f}% of the {count} check inputs shipped in the portfolio, under the "
                f"profile's quantization.min_agreement {100 * min_agreement:.0f}%",
            }
    for name in sorted(portfolio.pending & set(by_name) - set(checks)):
        source = portfolio.info(name).record.quantization.source  # type: ignore[union-attr]
        if source not in by_name:
            checks[name] = {"kept": False, "reason": f"its FP32 source {source} was not timed in this bench"}
            continue
        mine, theirs = (LadderPoint(n, 0.0, by_name[n].p50_ms, tuple(by_name[n].round_p50_ms)) for n in (name, source))
        if is_faster(mine, theirs):
            reason = f"faster than {source} here: p50 {mine.p50_ms:.3f} vs {theirs.p50_ms:.3f} ms, every round"
            checks[name] = {"kept": True, "reason": reason}
        else:
            checks[name] = {"kept": False, "reason": not_faster_reason(mine, theirs)}
    return checks


def bench_document(portfolio: Portfolio, profile, results: list[VariantBench]) -> dict:
    rows = [asdict(r) for r in results]
    plan = session_plan(profile)
    execution = plan.describe()
    if results:  # what the sessions really got, not what was asked for
        execution["providers"] = list(results[0].providers)
        execution["lead"] = results[0].providers[0]
    doc = {
        "portfolio": str(portfolio.path),
        "profile": profile.name,
        "fingerprint": machine_fingerprint(),
        "execution": execution,
        "settings": {
            "batch": profile.serving.batch_size,
            "warmup": profile.benchmark.warmup,
            "iterations": profile.benchmark.iterations,
            "rounds": profile.benchmark.rounds,
            "intra_op_threads": plan.intra_op_threads,
            "ladder_min_gain": profile.benchmark.ladder_min_gain,
        },
        "variants": rows,
        "device_checks": judge_int8_here(portfolio, results, profile.quantization.min_agreement),
        "pending": sorted(portfolio.pending),
        "ladder": [],
        "build_ladder": list(portfolio.manifest.ladder.steps) if portfolio.manifest.ladder else None,
    }
    doc["ladder"] = list(bench_ladder(doc, portfolio, profile).steps)
    doc["cascade"] = cascade_bench(portfolio, results)
    return doc


def cascade_bench(portfolio: Portfolio, results: list[VariantBench]) -> dict | None:
    """The portfolio's cascade on this device: per operating point, the time per input expected from where its
    calibration images left and each step's p50 measured here (an input answered at step k ran steps 0..k), against
    the last step's p50 alone. None without a cascade or when a step was not benched."""
    cascade = portfolio.manifest.cascade
    p50 = {r.name: r.p50_ms for r in results}
    if cascade is None or not set(cascade.steps) <= set(p50):
        return None
    steps_ms = [p50[s] for s in cascade.steps]
    points = []
    for p in cascade.points:
        e = expected_latency(p.exit_shares, steps_ms)
        points.append(
            {
                "thresholds": list(p.thresholds),
                "top1": p.top1,
                "test_top1": p.test_top1,
                "exit_shares": list(p.exit_shares),
                "mean_ms": e.mean_ms,
                "p95_ms": e.p95_ms,
                "mean_vs_last": e.mean_ms / max(steps_ms[-1], 1e-9),
            }
        )
    return {
        "steps": list(cascade.steps),
        "reference_top1": cascade.reference_top1,
        "samples": cascade.samples,
        "max_loss": cascade.max_loss,
        "points": points,
    }


def cascade_lines(doc: dict) -> list[str]:
    """The cascade's operating points in words (the calibrated one first)."""
    c = doc.get("cascade")
    if not c:
        return []
    lines = [
        f"cascade {' -> '.join(c['steps'])} (per input, expected from where its {c['samples']} calibration images "
        f"left and the steps' p50 here; {c['steps'][-1]} alone: top-1 {100 * c['reference_top1']:.2f}%):"
    ]
    for i, p in enumerate(c["points"]):
        lines.append(
            f"  {'calibrated' if i == 0 else 'looser'}: thresholds {', '.join(f'{t:.3f}' for t in p['thresholds'])}, "
            f"top-1 {100 * p['top1']:.2f}%, exits {' / '.join(f'{100 * s:.0f}%' for s in p['exit_shares'])}, mean "
            f"{p['mean_ms']:.3f} ms ({p['mean_vs_last']:.2f}x {c['steps'][-1]}), p95 {p['p95_ms']:.3f} ms"
        )
    return lines


def write_json(path: Path, doc: dict) -> None:
    write_text_atomic(path, json.dumps(doc, indent=2))


def write_csv(path: Path, results: list[VariantBench]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(asdict(results[0])))
    w.writeheader()
    for r in results:
        w.writerow(asdict(r))
    write_text_atomic(path, buf.getvalue())


BENCH_HEADER = [
    "variant",
    "inflate ms",
    "create ms",
    "p50 ms",
    "p95 ms",
    "p99 ms",
    "items/s",
    "RSS MB",
    "top-1",
    "ladder",
]


def bench_rows(results: list[VariantBench], ladder: list[str] | None = None) -> list[list[str]]:
    """One text row per variant, for ``echo_table`` with ``BENCH_HEADER``; ``ladder`` (fastest first) numbers
    the steps, 1 the fastest."""
    steps = {name: i + 1 for i, name in enumerate(ladder or [])}
    return [
        [
            r.name,
            f"{r.inflate_ms:.1f}" + (" sliced" if r.sliced else ""),
            f"{r.create_ms:.1f}",
            f"{r.p50_ms:.3f}",
            f"{r.p95_ms:.3f}",
            f"{r.p99_ms:.3f}",
            f"{r.throughput:.1f}",
            f"{r.rss_growth_mb:.1f}",
            "-" if r.top1 is None else f"{100 * r.top1:.2f}%",
            str(steps[r.name]) if r.name in steps else "-",
        ]
        for r in results
    ]


def bench_file(path: str | Path, profile, variants: list[str] | None = None) -> tuple[dict, list[VariantBench]]:
    """Open the portfolio at ``path`` and bench it under ``profile``: (document, results). The document's
    ``ladder`` is the one these figures give (fastest first)."""
    with Portfolio.open(path, profile.limits) as pf:
        for name in variants or []:
            pf.info(name)
        results = bench_portfolio(pf, profile, variants or None)
        return bench_document(pf, profile, results), results


def ladder_lines(doc: dict) -> list[str]:
    """The ladder a bench gives (fastest first), in words, and the build-time one where it differs."""
    lines = [
        f"{name}: {'kept' if check['kept'] else 'dropped'} ("
        + ("built on another CPU for this device; " if name in doc.get("pending", []) else "")
        + f"{check['reason']})"
        for name, check in doc.get("device_checks", {}).items()
    ]
    lines.append(
        f"ladder on this device, profile {doc['profile']}, each step >= {100 * doc['settings']['ladder_min_gain']:.0f}%"
        f" faster than the one above: {' -> '.join(doc['ladder'])}"
    )
    if doc.get("build_ladder") and doc["build_ladder"] != doc["ladder"]:
        lines.append(f"  (the build-time ladder was {' -> '.join(doc['build_ladder'])})")
    return lines
