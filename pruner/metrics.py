"""Model size figures: parameter count and multiply-accumulates per sample."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn


@torch.no_grad()
def forward_with_hooks(model: nn.Module, example_inputs: torch.Tensor, hooks: list[tuple[nn.Module, Callable]]) -> None:
    """One eval-mode forward of the first example with these forward hooks attached; mode and hooks restored."""
    handles = [m.register_forward_hook(h) for m, h in hooks]
    was_training = model.training
    model.eval()
    try:
        model(example_inputs[:1])
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()


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

    hooks: list[tuple[nn.Module, Callable[..., Any]]] = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append((m, conv_hook))
        elif isinstance(m, nn.Linear):
            hooks.append((m, linear_hook))
    forward_with_hooks(model, example_inputs, hooks)
    return int(total)
