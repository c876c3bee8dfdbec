"""Exact structured pruning of sparse models: ``prune_zero_channels`` (prune.py) over the coupled groups
(groups.py), planned and rebuilt (plan.py), optionally aligned (align.py), reported (report.py)."""

from .align import pad_channels
from .groups import STRUCTURE_CACHE, coupled_groups, output_layers
from .prune import DEFAULT_RTOL, MODES, output_deviation, prune_zero_channels
from .report import LayerChange, PruneReport

__all__ = [
    "DEFAULT_RTOL",
    "MODES",
    "STRUCTURE_CACHE",
    "LayerChange",
    "PruneReport",
    "coupled_groups",
    "output_deviation",
    "output_layers",
    "pad_channels",
    "prune_zero_channels",
]
