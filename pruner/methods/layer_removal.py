"""Layer removal: rank whole layers and residual blocks by a criterion, remove the least useful in one shot from
the trained dense model, fine-tune. "Neural Networks Model Compression: The Static, the Dynamic and the Shallow"
(Elkerdawy), ch. 4 (ranking by imprinting) and ch. 5 (the LayerPrune criteria, eqs. 5.1-5.4)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

from edgeshift.core.config import setting

from ..layers.criteria import CRITERIA
from ..layers.layerprune import LayerPruneConfig, layerprune_checkpoint
from .base import MethodContext, counts, one_of


@dataclass(frozen=True)
class LayerRemovalSettings:
    criterion: str = setting(
        "imprint", "the layer criterion: imprint | weight-norm | taylor | bn-scale | ensemble", check=one_of(CRITERIA)
    )
    remove: tuple[int, ...] = setting((1, 2, 3), "one variant per count of removed candidates", check=counts)
    finetune_epochs: int = setting(1, "fine-tuning epochs per variant (0: none)", minimum=0)


class LayerRemoval:
    """One variant per count of removed layers or blocks, each fine-tuned from the dense model."""

    name: ClassVar[str] = "layerprune"
    help: ClassVar[str] = "layer removal from the dense model (edgeshift layerprune)"
    Settings: ClassVar[type[LayerRemovalSettings]] = LayerRemovalSettings

    def make_variants(self, settings: LayerRemovalSettings, context: MethodContext) -> list[Path]:
        dense = context.dense()
        sources = [dense]
        d = context.data
        finetune = replace(context.train, epochs=settings.finetune_epochs) if settings.finetune_epochs else None
        for n in settings.remove:
            path = context.folder / f"layerprune-{int(n)}.pt"
            if not path.exists():
                cfg = LayerPruneConfig(
                    criterion=settings.criterion, remove=int(n), profile=context.profile.name, seed=context.seed
                )
                layerprune_checkpoint(
                    dense,
                    path,
                    cfg,
                    data=d.path,
                    finetune=finetune,
                    train_samples=d.train_samples,
                    test_samples=d.test_samples,
                    measure=context.measure,
                )
            sources.append(path)
        return sources
