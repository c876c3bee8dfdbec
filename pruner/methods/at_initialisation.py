"""Pruning at initialisation, structurally where layers can take it, then trained with its masks enforced.

"Rapid Deployment of DNNs for Edge Computing via Structured Pruning at Initialization" (Reconvene), Algorithms
1 and 2: the sensitivity evaluator and the rectifier (resilient layers shrink to their density, sensitive ones stay
sparse), over an unstructured scorer (magnitude, SynFlow or random).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from edgeshift.core.config import setting

from ..imp import load_data
from ..pai import MODES, PaiConfig, save_pai
from ..sparse import SCORERS
from ..train_checkpoint import train_checkpoint
from .base import MethodContext, fractions, one_of
from .sparse_training import run_config


@dataclass(frozen=True)
class PaiSettings:
    sparsities: tuple[float, ...] = setting(
        (0.5, 0.8, 0.9),
        "one variant per sparsity: the share of conv and linear weights removed, in (0, 1)",
        check=fractions,
    )
    mode: str = setting(
        "reconvene", "which layers shrink: reconvene | all-layers | inverted | unstructured", check=one_of(MODES)
    )
    scorer: str = setting("magnitude", "the unstructured scorer: magnitude | synflow | random", check=one_of(SCORERS))


class PruningAtInitialisation:
    """Prune a fresh initialisation per sparsity, then train it like the dense model."""

    name: ClassVar[str] = "pai"
    help: ClassVar[str] = "pruning at initialisation (edgeshift pai), then trained (edgeshift train --init)"
    Settings: ClassVar[type[PaiSettings]] = PaiSettings

    def make_variants(self, settings: PaiSettings, context: MethodContext) -> list[Path]:
        sources = [context.dense()]
        run = run_config(context, "magnitude")
        classes = load_data(run, None, run.size())[0].num_classes
        d = context.data
        for p in settings.sparsities:
            path = context.folder / f"pai-{float(p):g}.pt"
            init = context.folder / f"pai-{float(p):g}-init.pt"
            if not path.exists():
                if not init.exists():
                    save_pai(
                        PaiConfig(
                            run.arch,
                            float(p),
                            scorer=settings.scorer,
                            mode=settings.mode,
                            num_classes=classes,
                            seed=context.seed,
                            measure_latency=False,
                            input_size=run.input_size,
                            arch_kwargs=run.arch_kwargs,
                        ),
                        init,
                    )
                train_checkpoint(
                    path,
                    context.train,
                    data=d.path,
                    init=init,
                    train_samples=d.train_samples,
                    test_samples=d.test_samples,
                    seed=context.seed,
                )
            sources.append(path)
        return sources
