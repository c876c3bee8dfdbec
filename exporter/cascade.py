"""Calibrating a confidence cascade (``edgeshift.runtime.cascade``) at export: which faster variants go before the
reference and at which thresholds, so that the expected time per input is least while top-1 on held-out images
stays within a stated loss of the reference's. Exhaustive over the candidates' subsets (up to ``max_early`` steps
before the reference) and over a grid of thresholds per step (quantiles of that step's confidences); the cost of a
configuration is each step's measured batch-1 p50 times the share of inputs that reach it."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from edgeshift.core.errors import EdgeshiftError
from edgeshift.runtime.cascade import confidence, expected_latency
from edgeshift.runtime.manifest import MAX_CASCADE_POINTS, Cascade, CascadePoint

GRID = 48  # threshold candidates per step: quantiles of its confidences, plus 1 (nobody leaves)
# the loss is bounded at 95% (one-sided) over the calibration images' paired differences, not at its value there:
# thresholds chosen to lose exactly the budget on those images lose more on others (measured: VGG-16 on CIFAR-10,
# 0.50 points on 5,000 calibration images, 0.82 on the 5,000 test images)
MARGIN_Z = 1.645
LOOSER = (0.005, 0.01, 0.02, 0.04, 0.08, 0.16)  # further losses the runtime may trade for time


class NoFasterStep(EdgeshiftError):
    """No candidate was measured faster than the reference: there is no cascade to calibrate."""


@dataclass(frozen=True)
class StepOutputs:
    """One candidate step's logits on the calibration images (and on the test images, where there are some), and
    its measured batch-1 p50."""

    calibration_logits: np.ndarray
    p50_ms: float
    test_logits: np.ndarray | None = None


@dataclass(frozen=True)
class Choice:
    steps: tuple[str, ...]
    thresholds: tuple[float, ...]
    top1: float
    exit_shares: tuple[float, ...]
    mean_ms: float


def simulate(
    confidences: Sequence[np.ndarray], correct: Sequence[np.ndarray], thresholds: Sequence[float]
) -> tuple[float, tuple[float, ...]]:
    """(top-1, exit shares) of a cascade on images whose per-step confidences and correctness are given."""
    n = len(correct[0])
    left = np.ones(n, bool)
    right = np.zeros(n, bool)
    shares = []
    for k, (conf, ok) in enumerate(zip(confidences, correct)):
        leave = left & (conf > thresholds[k] if k < len(thresholds) else True)
        right |= leave & ok
        shares.append(float(leave.sum()) / n)
        left &= ~leave
    return float(right.mean()), tuple(shares)


def _grid(conf: np.ndarray) -> np.ndarray:
    return np.unique(np.append(np.quantile(conf, np.linspace(0, 1, GRID)), 1.0))


def loss_bound(cascade_right: np.ndarray, reference_right: np.ndarray, z: float = MARGIN_Z) -> np.ndarray:
    """Top-1 the cascade loses against the reference (a fraction), plus ``z`` standard errors of that paired
    difference (over the last axis: images); rows of ``cascade_right`` are candidate configurations."""
    n = reference_right.shape[-1]
    worse = (reference_right & ~cascade_right).sum(axis=-1)  # the reference right, the cascade not
    better = (~reference_right & cascade_right).sum(axis=-1)
    loss = (worse - better) / n
    variance = np.maximum((worse + better) / n - loss**2, 0.0) / n
    return loss + z * np.sqrt(variance)


def _best_thresholds(
    confidences: list[np.ndarray], correct: list[np.ndarray], step_ms: list[float], max_loss: float
) -> Choice | None:
    """The cheapest thresholds (grid search; the last early step's vectorised) whose ``loss_bound`` against the
    last step (the reference) is at most ``max_loss``."""
    early = len(confidences) - 1
    grids = [_grid(c) for c in confidences[:early]]
    n = len(correct[0])
    costs = np.cumsum(step_ms)
    best: tuple[float, float, tuple[float, ...]] | None = None  # (mean ms, -top1, thresholds)
    for head in itertools.product(*grids[:-1]):
        left = np.ones(n, bool)
        right = np.zeros(n, bool)
        cost = 0.0
        for k, t in enumerate(head):
            leave = left & (confidences[k] > t)
            right |= leave & correct[k]
            cost += leave.sum() * costs[k]
            left &= ~leave
        k = early - 1
        last = grids[-1][:, None]
        leave = left[None, :] & (confidences[k][None, :] > last)  # [grid, n]
        rest = left[None, :] & ~leave
        right_all = right[None, :] | (leave & correct[k][None, :]) | (rest & correct[-1][None, :])
        top1 = right_all.mean(axis=1)
        mean = (cost + leave.sum(axis=1) * costs[k] + rest.sum(axis=1) * costs[-1]) / n
        for j in np.flatnonzero(loss_bound(right_all, correct[-1]) <= max_loss + 1e-12):
            key = (float(mean[j]), -float(top1[j]), (*map(float, head), float(grids[-1][j])))
            if best is None or key[:2] < best[:2]:
                best = key
    if best is None:
        return None
    thresholds = best[2]
    top1, shares = simulate(confidences, correct, thresholds)
    return Choice((), thresholds, top1, shares, best[0])


def calibrate(
    outputs: Mapping[str, StepOutputs],
    reference: str,
    labels: np.ndarray,
    *,
    max_loss: float = 0.005,
    max_early: int = 2,
    test_labels: np.ndarray | None = None,
    samples_name: str = "",
    profile: str = "",
) -> Cascade:
    """The cascade of least expected time per input whose top-1 loss against ``reference`` is at most ``max_loss``
    with 95% confidence on the calibration images (``loss_bound``), from the candidates in ``outputs`` faster than
    the reference (at most ``max_early`` of them, fastest first); then, on the same steps, looser points for the
    runtime to trade accuracy for time with. Refused in one line when no candidate is faster than the reference."""
    if not 0 <= max_loss <= 1:
        raise EdgeshiftError(f"the cascade's top-1 loss must be in [0, 1] (a fraction), got {max_loss:g}")
    ref = outputs[reference]
    faster = sorted((n for n, o in outputs.items() if n != reference and o.p50_ms < ref.p50_ms), key=_by_p50(outputs))
    if not faster:
        raise NoFasterStep(
            f"no variant is measured faster than the reference {reference!r}: a cascade needs a faster first step"
        )
    conf = {n: confidence(o.calibration_logits) for n, o in outputs.items()}
    ok = {n: o.calibration_logits.argmax(1) == labels for n, o in outputs.items()}
    reference_top1 = float(ok[reference].mean())
    best: Choice | None = None
    for size in range(1, min(max_early, len(faster)) + 1):
        for subset in itertools.combinations(faster, size):  # keeps the fastest-first order
            steps = [*subset, reference]
            choice = _best_thresholds(
                [conf[s] for s in steps], [ok[s] for s in steps], [outputs[s].p50_ms for s in steps], max_loss
            )
            if choice is not None and (best is None or (choice.mean_ms, -choice.top1) < (best.mean_ms, -best.top1)):
                best = Choice(tuple(steps), choice.thresholds, choice.top1, choice.exit_shares, choice.mean_ms)
    assert best is not None  # thresholds of 1 send everything to the reference: top-1 = the reference's
    steps = list(best.steps)
    thresholds = [best.thresholds]
    for loss in LOOSER:
        if loss <= max_loss or len(thresholds) >= MAX_CASCADE_POINTS:
            continue
        looser = _best_thresholds(
            [conf[s] for s in steps], [ok[s] for s in steps], [outputs[s].p50_ms for s in steps], loss
        )
        if looser is not None and looser.thresholds not in thresholds:
            thresholds.append(looser.thresholds)
    points = [_point(ts, steps, conf, ok, outputs, test_labels) for ts in thresholds]
    steps_ms = [outputs[s].p50_ms for s in steps]
    points.sort(key=lambda p: -expected_latency(p.exit_shares, steps_ms).mean_ms)  # most accurate (slowest) first
    return Cascade(
        steps=tuple(steps),
        points=tuple(points),
        max_loss=float(max_loss),
        reference_top1=reference_top1,
        samples=len(labels),
        dataset=samples_name,
        profile=profile,
    )


def _by_p50(outputs: Mapping[str, StepOutputs]):
    return lambda name: (outputs[name].p50_ms, name)


def _point(
    thresholds: tuple[float, ...],
    steps: list[str],
    conf: dict[str, np.ndarray],
    ok: dict[str, np.ndarray],
    outputs: Mapping[str, StepOutputs],
    test_labels: np.ndarray | None,
) -> CascadePoint:
    top1, shares = simulate([conf[s] for s in steps], [ok[s] for s in steps], thresholds)
    test_top1: float | None = None
    test_shares: tuple[float, ...] = ()
    test = [outputs[s].test_logits for s in steps]
    if test_labels is not None and len(test_labels) and all(t is not None for t in test):
        test_top1, test_shares = simulate(
            [confidence(t) for t in test if t is not None],
            [t.argmax(1) == test_labels for t in test if t is not None],
            thresholds,
        )
    return CascadePoint(
        thresholds=thresholds, top1=top1, exit_shares=shares, test_top1=test_top1, test_exit_shares=test_shares
    )
