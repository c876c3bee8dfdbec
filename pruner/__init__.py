"""edgeshift's pruning side (needs torch): the model zoo, conv-BN fusion, exact structured pruning, sparse
training and pruning at initialisation.

Heavy imports happen on first use of an attribute, so ``import edgeshift.pruner`` stays cheap.
"""

from __future__ import annotations

from edgeshift.core.lazy import lazy_exports

_EXPORTS = {
    "create_model": "edgeshift.pruner.models",
    "fuse_conv_bn": "edgeshift.pruner.fuse",
    "prune_zero_channels": "edgeshift.pruner.structured",
    "PruneReport": "edgeshift.pruner.structured",
    "save_checkpoint": "edgeshift.pruner.checkpoint",
    "load_checkpoint": "edgeshift.pruner.checkpoint",
    "count_params": "edgeshift.pruner.metrics",
    "count_macs": "edgeshift.pruner.metrics",
    "pai": "edgeshift.pruner.pai",
    "PaiConfig": "edgeshift.pruner.pai",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports("edgeshift.pruner", _EXPORTS)
