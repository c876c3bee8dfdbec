"""Self-distilled exits ("Neural Networks Model Compression" (Elkerdawy), ch. 7): one training of a vision
transformer with C classifiers gives C models of increasing depth, each written as a plain checkpoint of the same
architecture (the blocks up to its exit, the exit as its norm and head), so export, INT8 and the cascade take them
as they take any variant.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from edgeshift.core.config import setting
from edgeshift.core.errors import require_file

from ..checkpoint import load_checkpoint, save_checkpoint
from ..data import model_splits
from ..exits import ExitNetwork, check_layout, depth_variant
from ..models.record import record_of
from ..train import evaluate, to_tensor, train
from .base import MethodContext

STARTS = ("scratch", "dense")


@dataclass(frozen=True)
class ExitSettings:
    exits: int = setting(4, "classifiers C, one after every depth/C blocks, the last the model's own", minimum=2)
    start: str = setting(
        "scratch",
        "scratch: train the model source's initialisation with its exits (the thesis's one training); dense: start "
        "from the run's trained dense model",
        check=lambda v: None if v in STARTS else f"must be one of {', '.join(STARTS)}",
    )
    epochs: float = setting(0.0, "training epochs (0: the run's [train] epochs)", minimum=0)
    lr: float = setting(0.0, "peak learning rate (0: the run's [train] lr)", minimum=0)
    teacher: str = setting(
        "",
        "a trained checkpoint (any architecture, same classes) queried on the inputs the final classifier gets "
        "wrong (the query-efficient term, sec. 7.2.3); empty: self-distillation alone",
    )


class SelfDistilledExits:
    """C depth variants of a vision transformer from one training with self-distilled exits."""

    name: ClassVar[str] = "exits"
    help: ClassVar[str] = "self-distilled exits: one training of a ViT gives a model per exit depth (ch. 7)"
    Settings: ClassVar[type[ExitSettings]] = ExitSettings

    def make_variants(self, settings: ExitSettings, context: MethodContext) -> list[Path]:
        probe = context.model.build()  # refused before any training when the model has no transformer layout
        check_layout(probe, settings.exits)
        dense = context.dense() if settings.start == "dense" else None
        model = load_checkpoint(dense)[0] if dense is not None else probe
        depths = ExitNetwork(model, settings.exits).depths
        paths = [
            context.folder / f"exit{c + 1}of{settings.exits}-depth{d}-{settings.start}.pt" for c, d in enumerate(depths)
        ]
        if all(p.exists() for p in paths):
            return [dense, *paths] if dense is not None else paths
        teacher = None
        if settings.teacher:
            require_file(Path(settings.teacher), "teacher checkpoint")
            teacher = load_checkpoint(settings.teacher)[0]
        d = context.data
        train_ds, test_ds = model_splits(
            d.path, record_of(model), train_samples=d.train_samples, test_samples=d.test_samples, seed=context.seed
        )
        epochs = settings.epochs or context.train.epochs
        steps = max(1, math.ceil(epochs * len(train_ds) / context.train.batch_size))
        network = ExitNetwork(model, settings.exits, total_steps=steps, teacher=teacher)
        cfg = dataclasses.replace(context.train, iterations=steps, lr=settings.lr or context.train.lr)
        context.say(
            f"exits: {settings.exits} classifiers after blocks {', '.join(map(str, depths))}, training {epochs:g} "
            f"epochs ({steps} steps) from {settings.start}" + (" with a query-efficient teacher" if teacher else "")
        )
        train(network, train_ds, test_ds, cfg, label="exits", regulariser=network)
        network.eval()
        x, y = to_tensor(test_ds)
        for c, path in enumerate(paths):
            variant = depth_variant(network, c)
            accuracy = evaluate(variant, x, y)
            context.say(f"exits: classifier {c + 1}/{settings.exits} (depth {depths[c]}): top-1 {accuracy:.2%}")
            meta = {
                "exit": {"index": c, "exits": settings.exits, "depth": depths[c], "start": settings.start},
                "test_accuracy": accuracy,
            }
            save_checkpoint(variant, path, meta=meta)
        return [dense, *paths] if dense is not None else paths
