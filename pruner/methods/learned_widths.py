"""Learned widths: gates on every coupled channel group learn with the trained model, each channel priced by what
it costs on the device, until the model's price is a target fraction of the dense model's; then fine-tuned and
pruned exactly. "Neural Networks Model Compression: The Static, the Dynamic and the Shallow" (Elkerdawy), ch. 3
(learnable filter masks), with channel prices measured under the device profile instead of counted."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from edgeshift.core.config import setting

from ..slim import PRICINGS, SlimConfig, slim_checkpoint
from .base import MethodContext


def _targets(values: tuple[float, ...]) -> str | None:
    return None if values and all(0 < v <= 1 for v in values) else "must be fractions of the dense cost in (0, 1]"


@dataclass(frozen=True)
class LearnedWidthsSettings:
    targets: tuple[float, ...] = setting(
        (0.5,), "one variant per target: its priced cost as a fraction of the dense model's, in (0, 1]", check=_targets
    )
    pricing: str = setting(
        "latency",
        "what a channel costs: latency (every layer timed under the profile over a width sweep) | macs",
        check=lambda v: None if v in PRICINGS else f"must be one of {', '.join(PRICINGS)}",
    )
    gate_epochs: float = setting(1.0, "epochs the gates learn with the model", minimum=0.01)
    finetune_epochs: float = setting(1.0, "epochs of fine-tuning after, closed channels held at zero", minimum=0)
    lr: float = setting(0.01, "peak learning rate of the weights (cosine), both phases")
    align: int = setting(8, "every group keeps a multiple of this many channels while the gates learn", minimum=1)
    pad_to: int = setting(
        16,
        "also time the widths rounded up to multiples of this (zero channels, exact) and keep "
        "them where faster under the profile; 1: as trained",
        minimum=1,
    )
    distill: float = setting(
        0.0,
        "share of the loss matching the dense model's softened outputs, in [0, 1)",
        check=lambda v: None if 0 <= v < 1 else "must be in [0, 1)",
    )


class LearnedWidths:
    """One slim variant per target, each from the dense model."""

    name: ClassVar[str] = "slim"
    help: ClassVar[str] = "learned widths priced by device latency (edgeshift slim)"
    Settings: ClassVar[type[LearnedWidthsSettings]] = LearnedWidthsSettings

    def make_variants(self, settings: LearnedWidthsSettings, context: MethodContext) -> list[Path]:
        dense = context.dense()
        sources = [dense]
        d = context.data
        for target in settings.targets:
            path = context.folder / f"slim-{float(target):g}.pt"
            if not path.exists():
                cfg = SlimConfig(
                    target=float(target),
                    pricing=settings.pricing,
                    gate_epochs=settings.gate_epochs,
                    finetune_epochs=settings.finetune_epochs,
                    lr=settings.lr,
                    batch_size=context.train.batch_size,
                    align=settings.align,
                    pad_to=settings.pad_to,
                    distill=settings.distill,
                    seed=context.seed,
                )
                slim_checkpoint(
                    dense,
                    path,
                    cfg,
                    data=d.path,
                    pricer=context.pricers[settings.pricing],
                    measure=context.measure,
                    train_samples=d.train_samples,
                    test_samples=d.test_samples,
                    say=context.say,
                )
            sources.append(path)
        return sources
