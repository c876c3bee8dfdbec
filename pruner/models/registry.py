"""The architecture registry: each zoo model registers its builder where it is defined (``@register_model``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from edgeshift.core.registry import Registry

MODELS: Registry[Callable] = Registry("architecture")


@dataclass(frozen=True)
class ZooEntry:
    """One buildable architecture."""

    builder: Callable  # builds the nn.Module from (num_classes, **kw)
    num_classes: int  # default class count
    input_size: int  # default square input side
    help: str


def register_model(name: str, *, num_classes: int, input_size: int, help: str) -> Callable[[Callable], Callable]:
    """Decorator on a builder ``(num_classes, **kw) -> nn.Module``: registers it as ``name`` with its defaults."""
    return MODELS.register(name, help, num_classes=num_classes, input_size=input_size)
