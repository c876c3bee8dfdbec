"""Model size figures: parameter count and multiply-accumulates per sample."""
from __future__ import annotations

import torch
from torch import nn


def count_params(model: nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def count_nonzero_params(model: nn.Module) -> int:
    return int(sum(int(torch.count_nonzero(p)) for p in model.parameters()))


@torch.no_grad()
def count_macs(model: nn.Module, example_inputs: torch.Tensor) -> int:
    """MACs of one sample through every Conv2d and Linear (the layers that dominate a CNN's cost)."""
    total = 0

    def conv_hook(m: nn.Conv2d, inp, out):
        nonlocal total
        kh, kw = m.kernel_size
        total += out[0].numel() * (m.in_channels // m.groups) * kh * kw

    def linear_hook(m: nn.Linear, inp, out):
        nonlocal total
        total += out[0].numel() * m.in_features

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
    was_training = model.training
    model.eval()
    try:
        model(example_inputs[:1])
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return int(total)
