"""A confidence cascade over a portfolio's variants: per input, the fastest step runs first and the input goes on to
the next, slower and more accurate step only while its top-1 softmax probability is at or under that step's
threshold; the last step answers whatever reaches it. Most inputs are easy, so most leave early (the cascades of
early-exit networks, BranchyNet, as cited in "Self-adaptive neural network for edge devices", sec. 2, here over
whole variants). Thresholds are calibrated at export (``edgeshift.exporter.cascade``) and stored in the manifest
with a few looser operating points; under a latency target the runtime picks among those by this device's own
step latencies. Torch-free.

A threshold of 1 never lets an input leave (the outputs are the last step's); 0 lets every input leave at the
first step (its outputs).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from edgeshift.core.errors import EdgeshiftError
from edgeshift.device_profiles import DeviceProfile

from .manifest import Cascade, CascadePoint

SPIN_STOP = {"session.force_spinning_stop": "1"}


def spin_stopping(profile: DeviceProfile) -> DeviceProfile:
    """``profile`` whose sessions stop their threads spinning when a run ends: a cascade runs several sessions one
    after another on the same cores, and one step's pool spinning on would take them from the next step's."""
    execution = dataclasses.replace(profile.execution, session_config={**profile.execution.session_config, **SPIN_STOP})
    return dataclasses.replace(profile, execution=execution)


def confidence(logits: np.ndarray) -> np.ndarray:
    """Top-1 softmax probability per row (float64, stable for any finite logits)."""
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=1, keepdims=True)
    return 1.0 / np.exp(z).sum(axis=1)  # exp(max - max) = 1 over the sum


def top_probability(row: Sequence[float]) -> float:
    """``confidence`` of one input's logits in plain floats: on the ten logits of a request numpy's per-call cost
    is most of the work (measured 5 against 1 us, and up to 30 us beside ONNX Runtime's calls)."""
    top = max(row)
    return 1.0 / sum(math.exp(v - top) for v in row)


def check_thresholds(thresholds: Sequence[float], steps: int) -> tuple[float, ...]:
    """``thresholds`` if they are one number in [0, 1] per step but the last (one alone stands for all of them);
    else a one-line error."""
    out = tuple(float(t) for t in thresholds)
    if len(out) == 1:
        out *= steps - 1
    if len(out) != steps - 1:
        raise EdgeshiftError(
            f"the cascade has {steps} steps: give {steps - 1} thresholds (one per step but the last) or one for all"
        )
    bad = [t for t in out if not (math.isfinite(t) and 0 <= t <= 1)]
    if bad:
        raise EdgeshiftError(f"cascade threshold {bad[0]:g} is outside [0, 1] (a top-1 probability an input must beat)")
    return out


def parse_thresholds(text: str) -> tuple[float, ...]:
    """Comma-separated thresholds, each in [0, 1]; a one-line error otherwise."""
    try:
        values = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise EdgeshiftError(f"cascade thresholds must be numbers in [0, 1], comma-separated; got {text!r}") from None
    if not values:
        raise EdgeshiftError("give at least one cascade threshold (numbers in [0, 1], comma-separated)")
    return check_thresholds(values, len(values) + 1)  # the count is checked against the cascade's steps later


def run_cascade(
    run_step: Callable[[int, np.ndarray], np.ndarray], batch: np.ndarray, thresholds: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """(logits, answered_by): each item's logits from the step that answered it, and that step's index.
    ``run_step(k, items)`` runs step k on a sub-batch; there are ``len(thresholds) + 1`` steps.

    While every item is still pending nothing is indexed or copied: a batch that leaves whole at one step (a
    single input always does) costs its steps' calls and one confidence per step, no more (the per-request work
    is a share of a small model's call on the device)."""
    n = len(batch)
    last = len(thresholds)
    if n == 1:  # one input (the device's usual request): it leaves whole at one step
        for k in range(last + 1):
            logits = np.asarray(run_step(k, batch))
            if k == last or top_probability(logits[0].ravel().tolist()) > thresholds[k]:
                return logits, np.full(1, k, np.int64)
    pending: np.ndarray | None = None  # None: every item
    out: np.ndarray | None = None
    answered_by: np.ndarray | None = None
    for k in range(last + 1):
        logits = np.asarray(run_step(k, batch if pending is None else batch[pending]))
        leave = None if k == last else confidence(logits) > thresholds[k]
        if pending is None:
            if leave is None or leave.all():
                return logits, np.full(n, k, np.int64)
            if not leave.any():
                continue
            out = np.empty((n, *logits.shape[1:]), logits.dtype)
            answered_by = np.full(n, last, np.int64)
            pending = np.arange(n)
        assert out is not None and answered_by is not None
        if leave is None:
            out[pending] = logits
            answered_by[pending] = k
            break
        out[pending[leave]] = logits[leave]
        answered_by[pending[leave]] = k
        pending = pending[~leave]
        if not len(pending):
            break
    assert out is not None and answered_by is not None  # the last step answers every item still pending
    return out, answered_by


@dataclass(frozen=True)
class Expected:
    """Per-input latency of an operating point, from each step's latency and the point's exit shares."""

    mean_ms: float
    p95_ms: float


def expected_latency(exit_shares: Sequence[float], step_ms: Sequence[float], quantile: float = 0.95) -> Expected:
    """An input answered at step k has run steps 0..k: mean = sum_k share_k * cost_k; the quantile is the cost of
    the first step by which that share of the inputs has left."""
    costs = np.cumsum(np.asarray(step_ms, np.float64))
    shares = np.asarray(exit_shares, np.float64)
    reached = np.cumsum(shares)
    at = int(np.searchsorted(reached, quantile - 1e-12))
    return Expected(float(shares @ costs), float(costs[min(at, len(costs) - 1)]))


def choose_point(points: Sequence[CascadePoint], step_ms: Sequence[float], target_ms: float) -> int:
    """The most accurate operating point whose expected mean latency per input meets ``target_ms`` on these step
    latencies; the fastest one when none does."""
    means = [expected_latency(p.exit_shares, step_ms).mean_ms for p in points]
    for i, mean in enumerate(means):  # most accurate first
        if mean <= target_ms:
            return i
    return int(np.argmin(means))


def describe(cascade: Cascade) -> str:
    p = cascade.points[0]
    return (
        f"cascade {' -> '.join(cascade.steps)}, thresholds {', '.join(f'{t:.3f}' for t in p.thresholds)}: top-1 "
        f"{100 * p.top1:.2f}% against {100 * cascade.reference_top1:.2f}% for {cascade.steps[-1]} on "
        f"{cascade.samples} calibration images, exits {' / '.join(f'{100 * s:.0f}%' for s in p.exit_shares)}"
    )
