"""The layer-criteria registry: ``get(name)`` fails naming the known criteria."""
from __future__ import annotations

from runtime.errors import UnknownNameError

from .criteria import BnScale, Ensemble, Imprint, LayerCriterion, Taylor, WeightNorm

_CRITERIA: dict[str, type[LayerCriterion]] = {c.name: c for c in (Imprint, WeightNorm, Taylor, BnScale, Ensemble)}


def names() -> list[str]:
    return sorted(_CRITERIA)


def get(name: str) -> LayerCriterion:
    if name not in _CRITERIA:
        raise UnknownNameError("layer criterion", name, _CRITERIA)
    return _CRITERIA[name]()
