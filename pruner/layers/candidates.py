"""Which layers or blocks can go: the shape-preserving children of a model's sequential stages.

A candidate is a child of an ``nn.Sequential`` that contains a conv, maps its input to an output of exactly the same
shape, and (for plain conv layers) follows another conv layer rather than a pooling step. In ResNets and
MobileNetV2 these are the residual blocks with an identity shortcut (never the downsampling ones); in VGGs the conv
layers with equal in/out channels inside a stage. Removing one replaces it with ``nn.Identity``, so the rest of
the graph stays valid.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from edgeshift.core.errors import EdgeshiftError

from ..metrics import forward_with_hooks

_POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


@dataclass(frozen=True)
class Candidate:
    """A removable layer or block: its module name, kind and the tensor shape it preserves."""

    name: str
    kind: str  # "block" (a residual block) or "conv" (a plain conv layer with its BN and activation)
    shape: tuple[int, ...]  # (C, H, W) in and out


def _contains_conv(m: nn.Module) -> bool:
    return any(isinstance(x, nn.Conv2d) for x in m.modules())


def _is_residual(m: nn.Module) -> bool:
    return hasattr(m, "shortcut") or getattr(m, "use_residual", False)


def find_candidates(model: nn.Module, example_inputs: torch.Tensor) -> list[Candidate]:
    """Every removable layer or block of ``model``, in forward order."""
    seqs = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Sequential)]
    shapes: dict[str, tuple[tuple, tuple]] = {}
    order: list[str] = []
    hooks = []
    for seq_name, seq in seqs:
        for child_name, child in seq.named_children():
            full = f"{seq_name}.{child_name}" if seq_name else child_name

            def hook(mod, inp, out, full=full):
                if isinstance(inp[0], torch.Tensor) and isinstance(out, torch.Tensor):
                    shapes[full] = (tuple(inp[0].shape[1:]), tuple(out.shape[1:]))
                    order.append(full)
            hooks.append((child, hook))
    forward_with_hooks(model, example_inputs, hooks)
    modules = dict(model.named_modules())
    out = []
    for seq_name, seq in seqs:
        previous = None
        for child_name, child in seq.named_children():
            full = f"{seq_name}.{child_name}" if seq_name else child_name
            seen = shapes.get(full)
            if seen and _contains_conv(child) and seen[0] == seen[1] and not _is_nested_in_candidate(full, modules):
                residual = _is_residual(child)
                if residual or (previous is not None and _contains_conv(previous) and not isinstance(previous, _POOLS)):
                    out.append(Candidate(full, "block" if residual else "conv", seen[0]))
            previous = child
    rank = {name: i for i, name in enumerate(order)}
    return sorted(out, key=lambda c: rank[c.name])


def _is_nested_in_candidate(name: str, modules: dict[str, nn.Module]) -> bool:
    """Layers inside a block (any ancestor below the root that is not a plain Sequential stage) are not
    candidates on their own."""
    parts = name.split(".")
    return any(not isinstance(modules[".".join(parts[:i])], nn.Sequential) for i in range(1, len(parts)))


def remove_candidates(model: nn.Module, names: list[str], candidates: list[Candidate]) -> nn.Module:
    """A copy of ``model`` with the named candidates replaced by ``nn.Identity``."""
    known = {c.name for c in candidates}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise EdgeshiftError(f"not removable: {', '.join(unknown)}; candidates are {', '.join(sorted(known))}")
    pruned = copy.deepcopy(model)
    for name in names:
        pruned.set_submodule(name, nn.Identity())
    return pruned
