"""edgeshift's pruning side (needs torch): the model zoo, conv-BN fusion, exact structured pruning, sparse
training and pruning at initialisation.

Heavy imports happen on first use of an attribute, so ``import pruner`` stays cheap.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "create_model": "pruner.models",
    "fuse_conv_bn": "pruner.fuse",
    "prune_zero_channels": "pruner.structured",
    "PruneReport": "pruner.structured",
    "save_checkpoint": "pruner.checkpoint",
    "load_checkpoint": "pruner.checkpoint",
    "count_params": "pruner.metrics",
    "count_macs": "pruner.metrics",
    "pai": "pruner.pai",
    "PaiConfig": "pruner.pai",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'pruner' has no attribute {name!r}")
