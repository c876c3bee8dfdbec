"""Sparse training: iterative magnitude pruning with rewinding, and its one-shot baselines (magnitude, random,
SynFlow). One training run, one checkpoint per level; the exporter prunes each level's zero channels exactly.

"DNNShifter: An efficient DNN pruning system for edge computing", modules 1-3: iterative magnitude pruning with
rewinding to an early step, the one-shot scorers as its baselines.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from edgeshift.core.config import setting

from ..imp import RunConfig, run_sparse
from .base import MethodContext


@dataclass(frozen=True)
class SparseSettings:
    levels: int = setting(
        4, "levels after the dense one (each removes prune_fraction of the remaining weights)", minimum=0
    )
    prune_fraction: float = setting(
        0.5,
        "share of the remaining weights removed per level, in (0, 1)",
        check=lambda v: None if 0 < v < 1 else "must be in (0, 1)",
    )
    rewind_step: int = setting(5, "the optimiser step the surviving weights rewind to (iterative pruning)", minimum=0)


def run_config(context: MethodContext, scorer: str, settings: SparseSettings | None = None) -> RunConfig:
    """The sparse run ``context`` describes, pruned by ``scorer`` (level 0 is the dense model)."""
    s = settings or SparseSettings()
    m, d = context.model, context.data
    return RunConfig(
        arch=m.source,
        data=d.path,
        method=scorer,
        prune_fraction=s.prune_fraction,
        rewind_step=s.rewind_step,
        train_samples=d.train_samples,
        test_samples=d.test_samples,
        seed=context.seed,
        arch_kwargs=m.kwargs,
        weights=m.weights,
        input_size=m.input_size,
    )


class IterativeMagnitude:
    """Iterative magnitude pruning with rewinding: train, remove the smallest weights, rewind, repeat."""

    name: ClassVar[str] = "imp"
    help: ClassVar[str] = "iterative magnitude pruning with rewinding"
    Settings: ClassVar[type[SparseSettings]] = SparseSettings

    def make_variants(self, settings: SparseSettings, context: MethodContext) -> list[Path]:
        run = context.folder / "run"
        run_sparse(run, run_config(context, self.name, settings), context.train, settings.levels)
        return [run]


class OneShotMagnitude(IterativeMagnitude):
    """Train once, then each level removes the smallest-magnitude weights of the trained model."""

    name: ClassVar[str] = "magnitude"
    help: ClassVar[str] = "one-shot |w|"


class OneShotRandom(IterativeMagnitude):
    """The random control: each level removes weights chosen at random."""

    name: ClassVar[str] = "random"
    help: ClassVar[str] = "one-shot random"


class OneShotSynFlow(IterativeMagnitude):
    """Each level removes the weights of least synaptic flow ("Pruning neural networks without any data by
    iteratively conserving synaptic flow", Tanaka et al.)."""

    name: ClassVar[str] = "synflow"
    help: ClassVar[str] = "one-shot SynFlow"
