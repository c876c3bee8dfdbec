"""Which channels are coupled: Torch-Pruning's dependency groups over the fused model, analysed once per
structure (cached by signature), with every consumer of each channel and what it reads."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch_pruning as tp
from torch import fx, nn
from torch.func import functional_call

from ..channel_states import ShapeRecordingModule, channel_states, used_weights
from ..fuse import trace


def output_layers(model: nn.Module, gm: fx.GraphModule) -> list[nn.Module]:
    """Conv/Linear layers whose outputs reach the model output without passing another such layer."""
    mods = dict(model.named_modules())
    found, stack, seen = [], [n for n in gm.graph.nodes if n.op == "output"], set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.op == "call_module" and isinstance(mods[node.target], (nn.Conv2d, nn.Linear)):
            found.append(mods[node.target])
            continue
        stack.extend(n for n in node.all_input_nodes)
    return found


def _is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups == m.out_channels and m.groups == m.in_channels and m.groups > 1


def _foldable(m: nn.Module) -> bool:
    """A constant input channel of this layer folds exactly into its bias (no zero padding at borders)."""
    if isinstance(m, nn.Linear):
        return True
    if isinstance(m.padding, str):
        return m.padding == "valid"
    return all(p == 0 for p in m.padding)


def _is_layer(m: nn.Module) -> bool:
    return isinstance(m, (nn.Conv2d, nn.Linear))


@dataclass
class _Consumer:
    """One layer reading a group's channels: (its input index, the group's root index) pairs."""

    layer: nn.Module
    idxs: np.ndarray
    roots: np.ndarray
    used: np.ndarray  # [out, in] any nonzero weight
    states: np.ndarray  # per input channel constant, nan unknown
    foldable: bool


@dataclass
class _Group:
    size: int  # root channels
    consumers: list[_Consumer]
    producers: list[tuple[nn.Module, np.ndarray, np.ndarray]]  # (layer, out idxs, roots)
    actions: list[tuple[nn.Module, object, np.ndarray, np.ndarray]]  # (module, TP handler, idxs, roots)
    blocked: bool  # contains a layer kind we cannot reason about: nothing removable
    removable: np.ndarray = None  # bool per root channel
    keep_one: int = 0  # channel kept when every channel is removable


@dataclass
class _ItemSpec:
    name: str  # module name in the model
    handler: object  # Torch-Pruning's pruning function for this dimension
    idxs: np.ndarray
    roots: np.ndarray
    role: str  # "producer" | "consumer" | "follow"


@dataclass
class _GroupSpec:
    size: int
    items: list[_ItemSpec]
    blocked: bool


@dataclass
class _Structure:
    """What depends only on the architecture: the fx graph with shapes and the coupled channel groups."""

    gm: fx.GraphModule
    groups: list[_GroupSpec]


STRUCTURE_CACHE: dict[tuple, _Structure] = {}
_STRUCTURE_CACHE_SIZE = 16


def _signature(model: nn.Module, input_shape: tuple) -> tuple:
    layers = tuple((name, type(m).__qualname__, tuple(tuple(p.shape) for p in m.parameters(recurse=False)),
                    getattr(m, "groups", None))
                   for name, m in model.named_modules())
    return type(model).__module__, type(model).__qualname__, tuple(input_shape[1:]), layers


def _analyse_structure(model: nn.Module, example_inputs: torch.Tensor) -> _Structure:
    """Trace the (fused) model once: fx graph with node shapes, and Torch-Pruning's coupled groups by name."""
    gm = trace(model)
    ignored = output_layers(model, gm)
    # One forward through ShapeProp gives Torch-Pruning its trace and channel_states its node shapes. It runs on
    # meta tensors swapped in for every parameter and buffer: shapes and the autograd graph, no arithmetic.
    wrapper = ShapeRecordingModule(gm)
    meta = {k: torch.empty_like(v, device="meta").requires_grad_(v.is_floating_point())
            for k, v in wrapper.named_parameters()}
    meta.update({k: torch.empty_like(v, device="meta") for k, v in wrapper.named_buffers()})  # BN statistics
    dg = tp.DependencyGraph().build_dependency(
        wrapper, example_inputs=(torch.empty_like(example_inputs[:1], device="meta"),),
        forward_fn=lambda module, inputs: functional_call(module, meta, inputs))
    return _Structure(gm, _group_specs(dg, model, ignored))


def _group_specs(dg, model: nn.Module, ignored: list[nn.Module]) -> list[_GroupSpec]:
    """Torch-Pruning's coupled channel groups, by module name, with each item's role."""
    names = {m: n for n, m in model.named_modules()}
    specs = []
    for group in dg.get_all_groups(ignored_layers=ignored, root_module_types=(nn.Conv2d, nn.Linear)):
        items, blocked, has_consumer = [], False, False
        for item in group.items:
            module, handler = item.dep.target.module, item.dep.handler
            idxs = np.asarray(item.idxs, dtype=np.int64)
            roots = np.asarray(item.root_idxs, dtype=np.int64)
            if not isinstance(module, nn.Module):
                blocked = True  # a bare parameter: we do not reason about it
                continue
            if _is_depthwise(module):
                role = "follow"  # in and out of one channel: decided by what its consumers see
            elif _is_layer(module) and getattr(module, "groups", 1) != 1:
                blocked, role = True, "follow"  # grouped (non-depthwise) conv: keep the group whole
            elif _is_layer(module):
                role = "producer" if dg.is_out_channel_pruning_fn(handler) else "consumer"
                has_consumer |= role == "consumer"
            elif isinstance(module, (nn.BatchNorm2d, nn.BatchNorm1d)):
                role = "follow"  # per-channel affine: follows the group
            elif not any(True for _ in module.parameters()):
                continue  # Torch-Pruning's parameter-free ops (add, flatten, activations): nothing to rebuild
            else:
                blocked, role = True, "follow"
            if module not in names:
                blocked = True
                continue
            items.append(_ItemSpec(names[module], handler, idxs, roots, role))
        # no consumer: the channels reach the model output directly
        specs.append(_GroupSpec(len(group[0].idxs), items, blocked or not has_consumer))
    return specs


def coupled_groups(model: nn.Module, example_inputs: torch.Tensor) -> list[_GroupSpec]:
    """The coupled channel groups of an unfused model, from one real forward (for surgery, not for proofs).

    Cheaper than the meta-tensor analysis ``prune_zero_channels`` needs when the model is small enough to run.
    """
    gm = trace(model)
    was_training = model.training
    model.eval()
    try:
        dg = tp.DependencyGraph().build_dependency(model, example_inputs=(example_inputs[:1],))
    finally:
        model.train(was_training)
    return _group_specs(dg, model, output_layers(model, gm))


def _structure(model: nn.Module, example_inputs: torch.Tensor) -> _Structure:
    key = _signature(model, tuple(example_inputs.shape))
    found = STRUCTURE_CACHE.get(key)
    if found is None:
        found = _analyse_structure(model, example_inputs)
        if len(STRUCTURE_CACHE) >= _STRUCTURE_CACHE_SIZE:
            STRUCTURE_CACHE.pop(next(iter(STRUCTURE_CACHE)))
        STRUCTURE_CACHE[key] = found
    return found


def _build_groups(model: nn.Module, example_inputs: torch.Tensor) -> list[_Group]:
    """Bind the architecture's groups to this model's modules and weights."""
    structure = _structure(model, example_inputs)
    mods = dict(model.named_modules())
    used_map = {m: used_weights(m) for m in mods.values() if _is_layer(m)}
    inputs = channel_states(model, structure.gm, used_map)
    groups = []
    for spec in structure.groups:
        consumers, producers, actions, blocked = [], [], [], spec.blocked
        for it in spec.items:
            module = mods[it.name]
            actions.append((module, it.handler, it.idxs, it.roots))
            if it.role == "producer":
                producers.append((module, it.idxs, it.roots))
            elif it.role == "consumer":
                calls = inputs.get(module)
                if not calls:
                    blocked = True
                    continue
                states = calls[0]
                if any(not np.array_equal(c, calls[0], equal_nan=True) for c in calls[1:]):
                    states = np.full_like(calls[0], np.nan)  # a shared layer seeing different inputs
                consumers.append(_Consumer(module, it.idxs, it.roots, used_map[module], states, _foldable(module)))
        g = _Group(spec.size, consumers, producers, actions, blocked, np.zeros(spec.size, dtype=bool))
        # the channel kept when all are removable: the one whose producers have the fewest nonzero weights
        nnz = np.zeros(spec.size)
        for layer, idxs, roots in producers:
            np.add.at(nnz, roots, used_map[layer].sum(1)[idxs])
        g.keep_one = int(np.argmin(nnz)) if spec.size else 0
        groups.append(g)
    return groups
