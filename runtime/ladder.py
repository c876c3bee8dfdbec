"""The ladder: the variants a policy steps along, ordered by latency measured under the device profile. Torch-free.

Size is not speed: at batch 1 a narrower model can be slower (odd widths, per-operator overhead) and an INT8 model
of the same size several times faster. So each step down the ladder must be *measured* faster than the step above,
in one interleaved run, by more than the noise, and no more accurate. Variants off the ladder stay in the portfolio
for the ``memory`` policy and for manual switches.

A step down must be faster by at least ``min_gain`` of the upper step's p50 (the device profile's
``benchmark.ladder_min_gain``, 10% by default: a smaller saving is not worth an accuracy loss, and on a shared
CPU medians drift a few percent between runs) *and* the faster variant's timing rounds must all beat the slower
one's (from 4 rounds on, bar the single most extreme round of each), so that a gain inside the round-to-round
spread never counts.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from edgeshift.core.config import read_capped
from edgeshift.core.errors import EdgeshiftError, InputFileError
from edgeshift.core.jsonio import loads_bounded

if TYPE_CHECKING:
    from edgeshift.device_profiles import DeviceProfile

    from .portfolio import Portfolio

__all__ = [
    "DeviceLadder",
    "LadderPoint",
    "bench_ladder",
    "bench_path_for",
    "build_ladder",
    "device_checks",
    "device_ladder",
    "is_faster",
    "not_faster_reason",
]


@dataclass(frozen=True)
class LadderPoint:
    """One variant as the ladder sees it."""

    name: str
    accuracy: float  # top-1; where unknown, the caller ranks the dense reference first (1.0) and the rest 0.0
    p50_ms: float
    round_p50_ms: tuple[float, ...] = ()  # per-round medians of an interleaved run (empty: one figure only)


def _spread(rounds: tuple[float, ...]) -> tuple[float, float]:
    """(low, high) of a variant's round medians; from 4 rounds on, the single lowest and highest round are left
    out, so that one round hit by a neighbour's burst does not hide a real difference."""
    r = sorted(rounds)
    return (r[1], r[-2]) if len(r) >= 4 else (r[0], r[-1])


def _beats_round_by_round(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    """Timed in the same interleaved rounds, ``a``'s median is below ``b``'s in every round, bar one from 4
    rounds on. Pairing the rounds is what interleaving is for: a device that slows down for a while slows every
    variant in that round alike, so the comparison within a round holds where the spread across rounds does not."""
    if len(a) != len(b):  # not from one run: compare the spreads
        return _spread(a)[1] < _spread(b)[0]
    losses = sum(x >= y for x, y in zip(a, b))
    return losses <= (1 if len(a) >= 4 else 0)


def is_faster(a: LadderPoint, b: LadderPoint, min_gain: float = 0.0) -> bool:
    """``a`` is measured faster than ``b``: p50 lower by more than ``min_gain`` of b's, and beyond the noise (a's
    round median below b's in every interleaved round, bar one from 4 rounds on), where both were timed in
    rounds."""
    if not a.p50_ms <= (1.0 - min_gain) * b.p50_ms or a.p50_ms >= b.p50_ms:
        return False
    if a.round_p50_ms and b.round_p50_ms:
        return _beats_round_by_round(a.round_p50_ms, b.round_p50_ms)
    return True


def not_faster_reason(a: LadderPoint, b: LadderPoint, min_gain: float = 0.0) -> str:
    """Why ``is_faster(a, b, min_gain)`` said no, in words consistent with the figures: its p50, or the rounds."""
    if a.p50_ms >= b.p50_ms:
        return f"not faster than {b.name}: p50 {a.p50_ms:.3f} vs {b.name} {b.p50_ms:.3f} ms"
    if a.p50_ms > (1.0 - min_gain) * b.p50_ms:
        return (
            f"not {100 * min_gain:.0f}% faster than {b.name}: p50 {a.p50_ms:.3f} vs {b.p50_ms:.3f} ms "
            f"({100 * (1 - a.p50_ms / b.p50_ms):.1f}% faster)"
        )
    lost = sum(x >= y for x, y in zip(a.round_p50_ms, b.round_p50_ms))
    return (
        f"p50 {a.p50_ms:.3f} vs {b.name} {b.p50_ms:.3f} ms, but slower in {lost} of {len(a.round_p50_ms)} interleaved "
        "rounds (faster must mean every round, bar one from 4 rounds on: the rest is noise)"
    )


def build_ladder(points: Sequence[LadderPoint], min_gain: float = 0.10) -> list[str]:
    """Names, fastest first, slowest (most accurate) last: from the most accurate variant (the fastest of equals)
    down, each next step is the most accurate of the variants measured faster than it by ``min_gain`` (the
    slower of equals, so no step is skipped)."""
    if not points:
        return []
    rest = list(points)
    current = max(rest, key=lambda p: (p.accuracy, -p.p50_ms, p.name))
    steps = [current]
    while True:
        below = [p for p in rest if p.accuracy <= current.accuracy and is_faster(p, current, min_gain)]
        if not below:
            break
        current = max(below, key=lambda p: (p.accuracy, p.p50_ms, p.name))
        steps.append(current)
    return [p.name for p in reversed(steps)]


@dataclass(frozen=True)
class DeviceLadder:
    """The ladder the runtime uses, where its order came from, and what it knows of each variant's latency."""

    steps: tuple[str, ...]  # fastest first
    source: str  # in words: this device's bench, or the manifest's build-time figures
    p95_ms: dict[str, float]  # per variant, from the same source (absent: not measured)
    # the variants the runtime may run (every one but INT8 forms built for this device elsewhere that no bench here
    # has kept yet, and any this device's bench refused); empty: all
    usable: tuple[str, ...] = ()


def device_checks(doc: dict) -> dict[str, dict]:
    """What a bench document decided about variants that needed this device's word: {name: {kept, reason}}."""
    checks = doc.get("device_checks") if isinstance(doc, dict) else None
    if not isinstance(checks, dict):
        return {}
    return {n: c for n, c in checks.items() if isinstance(c, dict) and isinstance(c.get("kept"), bool)}


def _usable(portfolio: Portfolio, checks: dict[str, dict]) -> tuple[str, ...]:
    return tuple(
        n
        for n in portfolio.names
        if checks.get(n, {}).get("kept", n not in portfolio.pending)  # pending: only once a bench here kept it
    )


def bench_path_for(portfolio_path: str | os.PathLike) -> Path:
    """Where ``edgeshift bench --save`` keeps a device's results: beside the portfolio, ``<stem>.bench.json``."""
    p = Path(portfolio_path)
    return p.with_name(f"{p.stem}.bench.json")


def ladder_accuracy(top1: float | None, reference: bool) -> float:
    """What the ladder ranks a variant by: its top-1, or where unknown the dense reference first (1.0), the rest 0."""
    return top1 if top1 is not None else float(reference)


def _read_bench(path: Path, max_bytes: int) -> dict:
    """A bench document from a file we did not write: its size checked before it is parsed, strict JSON."""
    try:
        doc = loads_bounded(read_capped(path, max_bytes, error=InputFileError, what="bench result").decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputFileError(f"{path}: not a bench result ({exc}); write one with `edgeshift bench --save`") from None
    return _check_bench(doc, str(path))


def _check_bench(doc: Any, where: str) -> dict:
    """Refuse a bench document that is not a list of variants with their figures (one line, naming ``where``)."""
    rows = doc.get("variants") if isinstance(doc, dict) else None
    if not isinstance(rows, list) or not rows:
        raise InputFileError(f"{where}: not a bench result (no variants); write one with `edgeshift bench --save`")
    for row in rows:
        ok = isinstance(row, dict) and isinstance(row.get("name"), str)
        figures = [row.get("p50_ms"), row.get("p95_ms"), *(row.get("round_p50_ms") or [None])] if ok else []
        if not ok or not all(isinstance(f, (int, float)) and not isinstance(f, bool) and f >= 0 for f in figures):
            raise InputFileError(
                f"{where}: a variant lacks its name, p50_ms, p95_ms or round_p50_ms; re-run `edgeshift bench --save`"
            )
    return doc


def _bench_mismatch(doc: dict, portfolio: Portfolio, profile: DeviceProfile) -> str | None:
    """Why ``doc`` does not describe this portfolio on this device under this profile (None: it does)."""
    from .measure import machine_fingerprint

    if doc.get("profile") != profile.name:
        return f"measured under profile {doc.get('profile')!r}, not {profile.name!r}"
    fp, here = doc.get("fingerprint") or {}, machine_fingerprint()
    for key in ("machine", "cpu", "cores", "onnxruntime"):
        if fp.get(key) != here.get(key):
            return f"measured on another machine or runtime ({key} {fp.get(key)!r}, here {here.get(key)!r})"
    for row in doc["variants"]:
        if not isinstance(row, dict) or row.get("name") not in portfolio.names:
            return "it names a variant this portfolio does not hold"
        if row.get("sha256") != portfolio.info(row["name"]).sha256:
            return f"variant {row['name']} has changed since"
    return None


def device_ladder(
    portfolio: Portfolio, profile: DeviceProfile, bench: str | os.PathLike | dict[str, Any] | None = None
) -> DeviceLadder:
    """The ladder for this device: from ``bench`` (a bench document or its file) when given, else from the bench
    saved beside the portfolio when it was measured here under this profile, else the manifest's (or, for a
    version-1 manifest, one built from its latencies). A ``bench`` passed in that does not match is an error; a
    stale one beside the portfolio is passed over, and ``source`` says so."""
    note = ""
    max_bytes = profile.limits.file_mb * 2**20
    if bench is None:
        beside = bench_path_for(portfolio.path)
        if beside.is_file():
            doc = _read_bench(beside, max_bytes)
            why = _bench_mismatch(doc, portfolio, profile)
            if why is None:
                return bench_ladder(doc, portfolio, profile, f"bench {beside}")
            note = f" ({beside} not used: {why})"
    else:
        where = "the bench passed in" if isinstance(bench, dict) else f"bench {bench}"
        doc = _check_bench(bench, where) if isinstance(bench, dict) else _read_bench(Path(bench), max_bytes)
        why = _bench_mismatch(doc, portfolio, profile)
        if why is not None:
            raise EdgeshiftError(f"{where} does not fit: {why}; run `edgeshift bench --save` here")
        return bench_ladder(doc, portfolio, profile, where)
    usable = _usable(portfolio, {})
    if portfolio.pending:
        note += f" ({len(portfolio.pending)} INT8 variants wait for this device's bench: `edgeshift bench --save`)"
    p95 = {v.name: v.record.latency.p95_ms for v in portfolio.variants if v.record.latency and v.name in usable}
    ladder = portfolio.manifest.ladder
    if ladder is not None:
        steps = tuple(s for s in ladder.steps if s in usable)
        where = f"manifest (profile {ladder.profile}, {ladder.threads} threads){note}"
        return DeviceLadder(steps, where, p95, usable)
    points = [
        LadderPoint(
            v.name, ladder_accuracy(v.top1, v.reference), v.record.latency.p50_ms, v.record.latency.round_p50_ms
        )
        for v in portfolio.variants
        if v.record.latency and v.name in usable
    ]
    if len(points) < len(usable):
        return DeviceLadder(usable, f"portfolio order: latencies not recorded{note}", p95, usable)
    return DeviceLadder(
        tuple(build_ladder(points, profile.benchmark.ladder_min_gain)), f"manifest latencies{note}", p95, usable
    )


def bench_ladder(doc: dict, portfolio: Portfolio, profile: DeviceProfile, where: str = "bench") -> DeviceLadder:
    """The ladder a bench document's figures give, with the manifest's accuracies; variants pending this device's
    word count only where the document kept them."""
    usable = _usable(portfolio, device_checks(doc))
    rows = {r["name"]: r for r in doc["variants"] if r["name"] in usable}
    try:
        points = [
            LadderPoint(
                n,
                ladder_accuracy(portfolio.info(n).top1, portfolio.info(n).reference),
                float(r["p50_ms"]),
                tuple(map(float, r["round_p50_ms"])),
            )
            for n, r in rows.items()
        ]
        p95 = {n: float(r["p95_ms"]) for n, r in rows.items()}
    except (KeyError, TypeError, ValueError):
        raise InputFileError(
            f"{where}: a variant lacks p50_ms, p95_ms or round_p50_ms; re-run `edgeshift bench --save`"
        ) from None
    steps = build_ladder(points, profile.benchmark.ladder_min_gain)
    return DeviceLadder(tuple(steps), f"{where} (profile {profile.name}, this device)", p95, usable)
