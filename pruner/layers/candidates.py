"""Which layers or blocks can go: residual blocks recognised by what they compute, and shape-preserving conv layers
inside a sequential stage.

A *block* is any submodule (not a container) that contains a conv or a linear layer, maps its input to an output of
exactly the same shape, and computes ``y = f(x) + x`` (through an activation after the add, as ``relu(f(x) + x)``;
or adds twice, as a pre-norm transformer block: ``y = x + attn(x); y + mlp(y)``), read from its own traced graph:
so a ResNet written any way (blocks in an ``nn.ModuleList``, the add in ``forward``, a shortcut attribute of any
name or none) has its identity blocks found, and downsampling blocks (another shape, a projection shortcut) are
not. A module whose forward cannot be traced counts as a block when it has an identity ``shortcut`` or says
``use_residual``. A *conv* candidate is a child of an ``nn.Sequential`` stage that contains a conv, preserves its
input's shape and follows another conv layer rather than a pooling step (VGG's in-stage convs). Removing one
replaces it with ``nn.Identity``, so the rest of the graph stays valid; for a block that is exactly the model with
its residual branches at zero (where what it adds to is non-negative, as after a ReLU).
"""

from __future__ import annotations

import copy
import operator
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.nn import functional as F

from edgeshift.core.errors import EdgeshiftError

from ..metrics import forward_with_hooks

_POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
_ADDS = {operator.add, operator.iadd, torch.add}
_ACTIVATIONS = {F.relu, torch.relu, F.relu6, F.silu, F.gelu, F.hardswish, F.leaky_relu, F.elu}
_ACTIVATION_MODULES = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.LeakyReLU, nn.ELU)
_PASS_THROUGH = (nn.Identity, nn.Dropout)  # a shortcut made of these is the identity


@dataclass(frozen=True)
class Candidate:
    """A removable layer or block: its module name, kind and the tensor shape it preserves."""

    name: str
    kind: str  # "block" (a residual block) or "conv" (a plain conv layer with its BN and activation)
    shape: tuple[int, ...]  # (C, H, W) in and out


def _contains_conv(m: nn.Module) -> bool:
    return any(isinstance(x, nn.Conv2d) for x in m.modules())


def _has_layers(m: nn.Module) -> bool:
    """Holds a layer with weights: a conv, or a linear (a transformer block's attention and MLP)."""
    return any(isinstance(x, (nn.Conv2d, nn.Linear)) for x in m.modules())


def _by_attribute(m: nn.Module) -> bool:
    """For a block fx cannot trace: an identity ``shortcut`` attribute, or the zoo's ``use_residual``."""
    shortcut = getattr(m, "shortcut", None)
    identity = isinstance(shortcut, _PASS_THROUGH) or (isinstance(shortcut, nn.Sequential) and len(shortcut) == 0)
    return identity or bool(getattr(m, "use_residual", False))


def adds_its_input(m: nn.Module) -> bool:
    """``m`` computes ``f(x) + x`` (maybe through an activation after the add), read from its own traced graph."""
    try:
        graph = fx.symbolic_trace(m).graph
    except Exception:  # data-dependent control flow, an untraceable call: fall back to what it says it is
        return _by_attribute(m)
    modules = dict(m.named_modules())
    # one input; further arguments only with defaults (timm's blocks take an optional attention mask)
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    if not inputs or any(not n.args for n in inputs[1:]):
        return False
    out = next(n for n in graph.nodes if n.op == "output").args[0]

    def skip(node, kinds) -> object:
        while isinstance(node, fx.Node) and (
            (node.op == "call_module" and isinstance(modules.get(str(node.target)), kinds))
            or (kinds is _ACTIVATION_MODULES and node.op == "call_function" and node.target in _ACTIVATIONS)
            or (kinds is _ACTIVATION_MODULES and node.op == "call_method" and node.target in ("relu", "relu_"))
        ):
            node = node.args[0]
        return node

    def is_add(node: object) -> bool:
        return isinstance(node, fx.Node) and (
            (node.op == "call_function" and node.target in _ADDS)
            or (node.op == "call_method" and node.target in ("add", "add_"))
        )

    def residual(node: object) -> bool:
        """``node`` is the input plus branches: the input itself, or an add one of whose terms is residual (a
        pre-norm transformer block adds twice: ``y = x + attn(x); y + mlp(y)``)."""
        if node is inputs[0]:
            return True
        terms = node.args[:2] if isinstance(node, fx.Node) and is_add(node) else ()
        return any(residual(skip(a, _PASS_THROUGH)) for a in terms)

    out = skip(out, _ACTIVATION_MODULES)
    return is_add(out) and residual(out)


def find_candidates(model: nn.Module, example_inputs: torch.Tensor) -> list[Candidate]:
    """Every removable layer or block of ``model``, in forward order."""
    modules = dict(model.named_modules())
    shapes: dict[str, tuple[tuple, tuple]] = {}
    order: list[str] = []
    hooks = []
    for name, module in modules.items():
        if not name or isinstance(module, (nn.ModuleList, nn.ModuleDict)):  # never called: no shapes
            continue

        def hook(mod, inp, out, name=name):
            if inp and isinstance(inp[0], torch.Tensor) and isinstance(out, torch.Tensor) and name not in shapes:
                shapes[name] = (tuple(inp[0].shape[1:]), tuple(out.shape[1:]))
                order.append(name)

        hooks.append((module, hook))
    forward_with_hooks(model, example_inputs, hooks)
    blocks = {
        name
        for name, (shape_in, shape_out) in shapes.items()
        if shape_in == shape_out
        and not isinstance(modules[name], _CONTAINERS)
        and _has_layers(modules[name])
        and adds_its_input(modules[name])
    }
    # outermost only: a block inside a block is part of it
    blocks = {b for b in blocks if not any(b.startswith(other + ".") for other in blocks)}
    out = [Candidate(name, "block", shapes[name][0]) for name in blocks]
    for seq_name, seq in modules.items():
        if not isinstance(seq, nn.Sequential):
            continue
        previous = None
        for child_name, child in seq.named_children():
            full = f"{seq_name}.{child_name}" if seq_name else child_name
            seen = shapes.get(full)
            inside = any(full == b or full.startswith(b + ".") or b.startswith(full + ".") for b in blocks)
            if (
                seen
                and not inside
                and _contains_conv(child)
                and seen[0] == seen[1]
                and not _is_nested_in_block(full, modules)
                and previous is not None
                and _contains_conv(previous)
                and not isinstance(previous, _POOLS)
            ):
                out.append(Candidate(full, "conv", seen[0]))
            previous = child
    rank = {name: i for i, name in enumerate(order)}
    return sorted(out, key=lambda c: rank[c.name])


def _is_nested_in_block(name: str, modules: dict[str, nn.Module]) -> bool:
    """Layers inside a block (any ancestor below the root that is not a container) are not candidates on their
    own."""
    parts = name.split(".")
    return any(not isinstance(modules[".".join(parts[:i])], _CONTAINERS) for i in range(1, len(parts)))


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
