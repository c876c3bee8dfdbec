"""What a pruning method is: a name, a settings dataclass and one entry that writes checkpoints.

A method is one class in one file; the pipeline's ``[[methods]]`` tables, ``edgeshift methods`` and the method's
validation all come from its settings dataclass (fields made with ``edgeshift.core.config.setting``, each with its
help). The method never measures, times or picks a device itself: the context brings the device profile, resolved
once, and the measurers built for it, so a method stays in the pruning layer and knows nothing of ONNX.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

from edgeshift.core.registry import Registry
from edgeshift.device_profiles import DeviceProfile

from ..measure import ModelMeasurer
from ..models.sources import ModelSpec
from ..slim import LayerPricer
from ..train import TrainConfig


@dataclass(frozen=True)
class DataChoice:
    """The data a method trains and measures on."""

    path: str  # 'generated', an ImageFolder root or a CIFAR-10 python folder
    train_samples: int | None = None  # a stratified training subset (None: all)
    test_samples: int | None = None  # a stratified test subset for training-time accuracy (None: all)


@dataclass(frozen=True)
class MethodContext:
    """Everything a method is given besides its own settings."""

    folder: Path  # where its checkpoints go; a file that already exists is finished work (a resumed run)
    model: ModelSpec  # the model source, for methods that start from an initialisation
    data: DataChoice
    train: TrainConfig  # the run's training settings (epochs per level / per variant, batch, lr, ...)
    profile: DeviceProfile  # the device profile every latency figure is taken under
    measure: ModelMeasurer  # a model's latency and ONNX Runtime accuracy under ``profile``
    pricers: Mapping[str, LayerPricer]  # what a channel costs, by pricing name: "latency" (under ``profile``), "macs"
    dense: Callable[[], Path]  # the trained dense model's checkpoint, trained (or copied) on the first call
    say: Callable[[str], None] = print  # progress lines

    @property
    def seed(self) -> int:
        return self.train.seed


class PruningMethod(Protocol):
    """One way of making variants. ``make_variants`` is resumable: it skips every checkpoint that exists."""

    name: ClassVar[str]
    help: ClassVar[str]
    Settings: ClassVar[type[Any]]  # a frozen dataclass of ``setting(...)`` fields, each with its help

    def make_variants(self, settings: Any, context: MethodContext) -> list[Path]:
        """Write the variants' checkpoints (or sparse-run folders) into ``context.folder``; return them, the dense
        model's checkpoint first where the method starts from it."""
        ...


def one_of(registry: Registry[Any]) -> Callable[[str], str | None]:
    """A ``setting(check=...)`` that accepts a name registered in ``registry``."""

    def check(value: str) -> str | None:
        return None if value in registry else f"must be one of {', '.join(registry.names())}"

    return check


def fractions(values: tuple[float, ...]) -> str | None:
    return None if values and all(0 < v < 1 for v in values) else "must be values in (0, 1)"


def counts(values: tuple[int, ...]) -> str | None:
    return None if values and all(n >= 1 for n in values) else "must be counts >= 1"
