"""Channel alignment: widths rounded up to a multiple with zero channels that change no output."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from edgeshift.core.errors import EdgeshiftError

from .groups import _is_depthwise, coupled_groups


def _grown(t: torch.Tensor, dim: int, pad: int, fill: float = 0.0) -> torch.Tensor:
    shape = list(t.shape)
    shape[dim] = pad
    return torch.cat([t.detach(), torch.full(shape, fill, dtype=t.dtype)], dim=dim)


def pad_channels(model: nn.Module, example_inputs: torch.Tensor, multiple: int = 8) -> int:
    """Widen every coupled channel group of ``model`` (in place) to a multiple of ``multiple`` with zero channels;
    return how many channels were added.

    Why: ONNX Runtime's convolutions split work across intra-op threads in blocks of channels, and a pruned width
    like 61 or 123 can make a multi-threaded variant slower than the dense model (benchmarks/
    ort_channel_alignment.py). A new channel is produced with zero weights and zero bias (BatchNorm passes 0
    through as 0), so it is exactly 0 after ReLU, residual adds and pooling, and every consumer reads it with zero
    weights: the outputs do not change. Groups Torch-Pruning cannot map one-to-one (grouped convs, flattened
    spatial maps, bare parameters) are left as they are.
    """
    if multiple < 1:
        raise EdgeshiftError(f"channel alignment must be >= 1, got {multiple}")
    if multiple == 1:
        return 0
    mods = dict(model.named_modules())
    added = 0
    for spec in coupled_groups(model, example_inputs):
        pad = -spec.size % multiple
        if (
            pad == 0
            or spec.blocked
            or any(
                len(it.idxs) != spec.size or not np.array_equal(np.sort(it.idxs), np.arange(spec.size))
                for it in spec.items
            )
        ):
            continue
        grown: set[tuple[str, str]] = set()
        for it in spec.items:
            m = mods[it.name]
            key = (it.name, "depthwise" if _is_depthwise(m) else it.role)
            if key in grown:
                continue
            grown.add(key)
            if _is_depthwise(m):
                m.weight = nn.Parameter(_grown(m.weight, 0, pad))
                m.in_channels = m.out_channels = m.groups = m.out_channels + pad
            elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
                if m.affine:
                    m.weight = nn.Parameter(_grown(m.weight, 0, pad, 1.0))
                    m.bias = nn.Parameter(_grown(m.bias, 0, pad))
                if m.running_mean is not None and m.running_var is not None:  # tracked running statistics
                    m.running_mean = _grown(m.running_mean, 0, pad)
                    m.running_var = _grown(m.running_var, 0, pad, 1.0)
                m.num_features += pad
                continue
            elif it.role in ("producer", "consumer"):  # a producer grows its outputs, a consumer its inputs
                out = it.role == "producer"
                m.weight = nn.Parameter(_grown(m.weight, 0 if out else 1, pad))
                attr = ("out_" if out else "in_") + ("channels" if isinstance(m, nn.Conv2d) else "features")
                setattr(m, attr, getattr(m, attr) + pad)
                if not out:
                    continue
            else:
                continue
            if m.bias is not None:  # producers and depthwise convs: the new channels' bias is 0
                m.bias = nn.Parameter(_grown(m.bias, 0, pad))
        added += pad
    return added
