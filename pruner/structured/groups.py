"""Which channels are coupled: Torch-Pruning's dependency groups over the fused model, analysed once per
structure (cached by signature), with every consumer of each channel and what it reads."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeGuard

import numpy as np
import torch
import torch_pruning as tp
from torch import fx, nn
from torch.func import functional_call
from torch_pruning.dependency import index_mapping, shape_infer
from torch_pruning.dependency.group import Group
from torch_pruning.dependency.index_mapping import _FlattenIndexMapping, _SplitIndexMapping

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
    assert isinstance(m, nn.Conv2d)
    if isinstance(m.padding, str):
        return m.padding == "valid"
    return all(p == 0 for p in m.padding)


WeightLayer = nn.Conv2d | nn.Linear  # what produces and consumes a group's channels


def _is_layer(m: nn.Module) -> TypeGuard[WeightLayer]:
    return isinstance(m, (nn.Conv2d, nn.Linear))


def _is_grouped(m: nn.Module) -> TypeGuard[nn.Conv2d]:
    """A grouped conv that is not depthwise: it loses whole groups, or equally many channels from each group."""
    return isinstance(m, nn.Conv2d) and m.groups > 1 and not _is_depthwise(m)


def _block_diagonal(layer: nn.Conv2d, used: np.ndarray) -> np.ndarray:
    """A grouped conv's used-weights [out, in_per_group] as [out, in]: output o reads only its group's inputs."""
    out_ch, k_in = used.shape
    k_out = out_ch // layer.groups
    full = np.zeros((out_ch, k_in * layer.groups), dtype=bool)
    for g in range(layer.groups):
        full[g * k_out : (g + 1) * k_out, g * k_in : (g + 1) * k_in] = used[g * k_out : (g + 1) * k_out]
    return full


@dataclass
class _Consumer:
    """One layer reading a group's channels: (its input index, the group's root index) pairs."""

    layer: WeightLayer
    idxs: np.ndarray
    roots: np.ndarray
    used: np.ndarray  # [out, in] any nonzero weight
    states: np.ndarray  # per input channel constant, nan unknown
    foldable: bool


@dataclass
class _Group:
    size: int  # root channels
    consumers: list[_Consumer]
    producers: list[tuple[WeightLayer, np.ndarray, np.ndarray]]  # (layer, out idxs, roots)
    actions: list[tuple[nn.Module, Callable[..., Any], np.ndarray, np.ndarray]]  # (module, TP handler, idxs, roots)
    blocked: bool  # contains a layer kind we cannot reason about: nothing removable
    removable: np.ndarray  # bool per root channel
    reason: str = ""  # why it is blocked, in words naming a module
    root: str = ""
    keep_one: int = 0  # channel kept when every channel is removable
    splits: list = field(default_factory=list)  # as in _GroupSpec: chunks lose equally many channels


@dataclass
class _ItemSpec:
    name: str  # module name in the model
    handler: Callable[..., Any]  # Torch-Pruning's pruning function for this dimension
    idxs: np.ndarray
    roots: np.ndarray
    role: str  # "producer" | "consumer" | "follow"


@dataclass
class _GroupSpec:
    size: int
    items: list[_ItemSpec]
    blocked: bool
    reason: str = ""  # why a blocked group is kept whole (empty: its channels reach the output, or unblocked)
    root: str = ""  # the layer whose output channels the group is, by name
    splits: list = field(default_factory=list)  # per channel split passed: (roots, chunk of each, chunks)


@dataclass
class _Structure:
    """What depends only on the architecture: the fx graph with shapes and the coupled channel groups."""

    gm: fx.GraphModule
    groups: list[_GroupSpec]


STRUCTURE_CACHE: dict[tuple, _Structure] = {}
_STRUCTURE_CACHE_SIZE = 16


def _plain_attributes(m: nn.Module) -> tuple:
    """A module's plain settings (``self.first``, ``self.width``): forward code may branch on them."""
    return tuple(
        sorted(
            (k, v)
            for k, v in vars(m).items()
            if not k.startswith("_") and k != "training" and type(v) in (bool, int, float, str)
        )
    )


def _signature(model: nn.Module, input_shape: tuple) -> tuple:
    layers = tuple(
        (
            name,
            type(m).__qualname__,
            tuple(tuple(p.shape) for p in m.parameters(recurse=False)),
            getattr(m, "groups", None),
            _plain_attributes(m),
        )
        for name, m in model.named_modules()
    )
    return type(model).__module__, type(model).__qualname__, tuple(input_shape[1:]), layers


def _analyse_structure(model: nn.Module, example_inputs: torch.Tensor) -> _Structure:
    """Trace the (fused) model once: fx graph with node shapes, and Torch-Pruning's coupled groups by name."""
    gm = trace(model, example_inputs[:1])
    ignored = output_layers(model, gm)
    # One forward through ShapeProp gives Torch-Pruning its trace and channel_states its node shapes. It runs on
    # meta tensors swapped in for every parameter and buffer: shapes and the autograd graph, no arithmetic.
    wrapper = ShapeRecordingModule(gm)
    meta = {
        k: torch.empty_like(v, device="meta").requires_grad_(v.is_floating_point())
        for k, v in wrapper.named_parameters()
    }
    meta.update({k: torch.empty_like(v, device="meta") for k, v in wrapper.named_buffers()})  # BN statistics
    # Torch-Pruning traces through autograd: a caller under torch.no_grad() must not get its bare assertion.
    with _tolerant_index_mapping() as unmapped, warnings.catch_warnings(), torch.enable_grad():
        warnings.filterwarnings("ignore", message=".*unwrapped")  # bare parameters: their groups are blocked
        dg = tp.DependencyGraph().build_dependency(
            wrapper,
            example_inputs=(torch.empty_like(example_inputs[:1], device="meta"),),
            forward_fn=lambda module, inputs: functional_call(module, meta, inputs),
        )
        return _Structure(gm, _group_specs(dg, model, ignored, unmapped, _forward_order(model, gm)))


# Torch-Pruning's parameter-free ops that move channels to other positions: a group through one is kept whole
# (a split it cannot map per chunk, slices, unbind, expand, and reshapes other than flattening into a linear
# layer). A mapped split is passed, its chunks losing equally many channels (plan.py).
_MOVING_OPS = {
    tp.ops.OPTYPE.SPLIT: "a channel split",
    tp.ops.OPTYPE.SLICE: "a channel slice",
    tp.ops.OPTYPE.UNBIND: "an unbind",
    tp.ops.OPTYPE.EXPAND: "an expand",
}


@contextlib.contextmanager
def _tolerant_index_mapping() -> Iterator[set]:
    """Build Torch-Pruning's graph even where its index mapping fails on an op (a channel shuffle's reshape
    divides by zero), with every channel split's chunk widths right (``_order_split_chunks``); the ops it failed
    on are yielded, and groups through them are kept whole."""

    unmapped: set = set()
    originals = {
        name: getattr(index_mapping, name)
        for name in dir(index_mapping)
        if name.startswith("update_") and name.endswith("_index_mapping") and name != "update_index_mapping"
    }

    def tolerant(fn):
        def wrapped(graph, node):
            try:
                return fn(graph, node)
            except Exception:
                unmapped.add(node.module)
                node.dependencies = []  # reached, never passed: beyond it the search would only wander

        return wrapped

    originals["update_split_index_mapping"] = _update_split_index_mapping
    init_shapes = shape_infer.init_shape_information

    def init_shapes_in_chunk_order(graph):
        init_shapes(graph)
        _order_split_chunks(graph, unmapped)
        _cut_at_transposes(graph, unmapped)

    update_all = index_mapping.update_index_mapping

    def update_all_then_order(graph):
        update_all(graph)
        _concat_before_split(graph)

    originals["update_index_mapping"] = update_all_then_order
    restore = {name: getattr(index_mapping, name) for name in originals}
    for name, fn in originals.items():
        setattr(index_mapping, name, fn if name == "update_index_mapping" else tolerant(fn))
    shape_infer.init_shape_information = init_shapes_in_chunk_order
    try:
        yield unmapped
    finally:
        for name, fn in restore.items():
            setattr(index_mapping, name, fn)
        shape_infer.init_shape_information = init_shapes


def _split_sizes(grad_fn) -> list[int] | None:
    """The chunk widths of a split along channels, from its autograd node; None when it is not one."""
    dim, sizes = getattr(grad_fn, "_saved_dim", None), getattr(grad_fn, "_saved_self_sym_sizes", None)
    if dim is None or sizes is None or not (0 <= dim < len(sizes)) or dim != 1:
        return None
    if hasattr(grad_fn, "_saved_split_sizes"):
        return [int(n) for n in grad_fn._saved_split_sizes]
    step, total = int(getattr(grad_fn, "_saved_split_size", 0)), int(sizes[1])
    return [min(step, total - start) for start in range(0, total, step)] if step > 0 else None


def _order_split_chunks(graph, unmapped: set) -> None:
    """Torch-Pruning maps a split's i-th consumer, in the order it met them, to the i-th chunk (Res2Net's chunks
    are met last to first; CSP's second chunk has two consumers) and sizes every chunk like the first. Record
    which chunk each consumer edge reads (the autograd edge's output number) and the chunks' true widths, for
    ``_update_split_index_mapping`` and for the widths of concatenations Torch-Pruning infers; a split it cannot
    map that way (a consumer reading several chunks, a split along another axis) is left unmapped, and the
    search stops there."""
    for node in graph.module2node.values():
        if node.type != tp.ops.OPTYPE.SPLIT:
            continue
        sizes = _split_sizes(node.grad_fn)
        chunks = [
            [nr for fn, nr in getattr(out.grad_fn, "next_functions", ()) if fn is node.grad_fn] for out in node.outputs
        ]
        if sizes is None or any(len(c) != 1 or c[0] >= len(sizes) for c in chunks):
            unmapped.add(node.module)
            node.dependencies = []
            continue
        node.module.split_sizes = [sizes[c[0]] for c in chunks]  # per consumer edge, as Torch-Pruning reads it
        node.module.edgeshift_chunks = [c[0] for c in chunks]
        node.module.offsets = [int(sum(sizes[:i])) for i in range(len(sizes) + 1)]


_TRANSPOSES = ("TransposeBackward", "PermuteBackward")


def _cut_at_transposes(graph, unmapped: set) -> None:
    """Torch-Pruning reads a transpose or permute as channel-preserving (its default for unknown ops); one moves
    channels (ShuffleNet's shuffle: reshape, transpose, reshape). Leave them unmapped and stop the search there:
    their groups are kept whole, and the search does not wander on through the shuffles for seconds."""
    for node in graph.module2node.values():
        if type(node.grad_fn).__name__.startswith(_TRANSPOSES):
            unmapped.add(node.module)
            node.dependencies = []


def _concat_before_split(graph) -> None:
    """A chunk read directly by a concatenation (Res2Net's last chunk): going back from the concatenation to the
    split, Torch-Pruning applies the split's mapping before the concatenation's, shifting indices it should
    first select. Put them in order on those dependencies."""
    for node in graph.module2node.values():
        if node.type != tp.ops.OPTYPE.SPLIT or getattr(node.module, "edgeshift_chunks", None) is None:
            continue
        for out in node.outputs:
            if out.type != tp.ops.OPTYPE.CONCAT:
                continue
            for dep in out.dependencies:
                if dep.target == node:  # idempotent: Torch-Pruning re-runs its mappings for every group
                    kinds = {type(m).__name__: m for m in dep.index_mapping if m is not None}
                    dep.index_mapping[:] = [kinds.get("_ConcatIndexMapping"), kinds.get("_SplitIndexMapping")]


def _update_split_index_mapping(graph, node) -> None:
    """Torch-Pruning's split mapping, each consumer edge mapped to the chunk it reads (``_order_split_chunks``)."""

    chunks = getattr(node.module, "edgeshift_chunks", None)
    if node.type != tp.ops.OPTYPE.SPLIT or chunks is None or not node.enable_index_mapping:
        return
    offsets = node.module.offsets
    for reverse in (False, True):
        done: set[int] = set()
        for out, nr in zip(node.outputs, chunks):
            for dep in out.dependencies if reverse else node.dependencies:
                if id(dep) not in done and dep.target == (node if reverse else out):
                    dep.index_mapping[0] = _SplitIndexMapping(offset=offsets[nr : nr + 2], reverse=reverse)
                    done.add(id(dep))
                    break


def _forward_order(model: nn.Module, gm: fx.GraphModule) -> dict[nn.Module, int]:
    """Each module's first call in the traced graph: groups are rooted at the earliest layer, so a layer whose
    channels a split hands to several branches roots one group over all its chunks."""
    mods = dict(model.named_modules())
    order: dict[nn.Module, int] = {}
    for i, node in enumerate(gm.graph.nodes):
        if node.op == "call_module" and node.target in mods:
            order.setdefault(mods[node.target], i)
    return order


def _group_specs(
    dg,
    model: nn.Module,
    ignored: list[nn.Module],
    unmapped: frozenset | set = frozenset(),
    order: dict[nn.Module, int] | None = None,
) -> list[_GroupSpec]:
    """Torch-Pruning's coupled channel groups, by module name, with each item's role; a group we cannot map
    one-to-one is blocked, with the reason naming a module."""
    names = {m: n for n, m in model.named_modules()}
    specs: list[_GroupSpec] = []
    for group in _all_groups(dg, ignored, names, specs, order or {}):
        items, reason, has_consumer, splits = [], "", False, []
        size = len(group[0].idxs)
        makers = list(
            dict.fromkeys(
                names[it.dep.target.module]
                for it in group.items
                if _is_layer(it.dep.target.module)
                and it.dep.target.module in names
                and dg.is_out_channel_pruning_fn(it.dep.handler)
            )
        )
        root_name = ", ".join(makers[:3]) + (f" and {len(makers) - 3} more" if len(makers) > 3 else "") or "?"
        for item in group.items:
            module, handler = item.dep.target.module, item.dep.handler
            idxs = np.asarray(item.idxs, dtype=np.int64)
            roots = np.asarray(item.root_idxs, dtype=np.int64)
            op_type = item.dep.target.type
            if (
                op_type == tp.ops.OPTYPE.SPLIT
                and module not in unmapped
                and getattr(module, "edgeshift_chunks", None) is not None
            ):
                offsets = np.asarray(module.offsets)
                splits.append((roots, np.searchsorted(offsets, idxs, side="right") - 1, len(offsets) - 1))
                continue
            if op_type in _MOVING_OPS:
                reason = reason or f"its channels pass {_MOVING_OPS[op_type]} after {root_name}"
                continue
            if module in unmapped:
                reason = reason or f"its channels pass a reshape that moves them (a channel shuffle?) after {root_name}"
                continue
            if op_type == tp.ops.OPTYPE.RESHAPE and not _flattens(group, item):
                reason = reason or f"its channels pass a reshape that moves them after {root_name}"
                continue
            if not isinstance(module, nn.Module):
                reason = reason or f"a bare parameter reads the channels of {root_name}"
                continue
            if _is_depthwise(module):
                role = "follow"  # in and out of one channel: decided by what its consumers see
            elif _is_layer(module):  # grouped convs too: equal groups kept (plan.py)
                role = "producer" if dg.is_out_channel_pruning_fn(handler) else "consumer"
                has_consumer |= role == "consumer"
            elif isinstance(module, (nn.BatchNorm2d, nn.BatchNorm1d)):
                role = "follow"  # per-channel affine: follows the group
            elif not any(True for _ in module.parameters()):
                continue  # Torch-Pruning's parameter-free ops (add, flatten, activations): nothing to rebuild
            else:
                reason = reason or (
                    f"{names.get(module, type(module).__name__)} ({type(module).__name__}) reads "
                    f"the channels of {root_name} and is not a conv, linear or batch norm"
                )
                role = "follow"
            if module not in names:
                reason = reason or f"a module outside the model reads the channels of {root_name}"
                continue
            if role != "follow" or _is_depthwise(module) or isinstance(module, (nn.BatchNorm2d, nn.BatchNorm1d)):
                width = _width(module, role)
                if len(idxs) and (idxs.min() < 0 or idxs.max() >= width or len(np.unique(idxs)) != len(idxs)):
                    reason = reason or f"Torch-Pruning maps the channels of {root_name} outside {names[module]}"
                    continue
            items.append(_ItemSpec(names[module], handler, idxs, roots, role))
        # no consumer: the channels reach the model output directly
        specs.append(_GroupSpec(size, items, bool(reason) or not has_consumer, reason, root_name, splits))
    return specs


# A coupled group larger than this is Torch-Pruning's search not settling (ReXNet's residual adds onto part of
# the channels make it revisit one layer under ever-shifted indices for minutes); real groups have hundreds.
_MAX_GROUP_ITEMS = 2000
_MAX_MAPPED_INDICES = 1 << 18  # one flatten's indices: 512 channels x 7 x 7 is 25,088


class _GroupDiverged(Exception):
    pass


@contextlib.contextmanager
def _bounded_group_growth():
    """Within the block, a Torch-Pruning group growing past ``_MAX_GROUP_ITEMS`` raises ``_GroupDiverged``."""

    original, flatten = Group.add_dep, _FlattenIndexMapping.__call__

    def add_dep(self, dep, idxs):
        if len(self._group) >= _MAX_GROUP_ITEMS:
            raise _GroupDiverged()
        return original(self, dep, idxs)

    def bounded_flatten(self, idxs):
        # Only the expanding direction (channels to the linear layer's inputs) can explode; going back, a linear
        # layer's inputs map to at most as many channels (512 x 7 x 7 of VGG's classifier is 25,088 of them).
        if not self.reverse and len(idxs) * getattr(self, "_stride", 1) > _MAX_MAPPED_INDICES:
            raise _GroupDiverged()  # a reshape read as a flatten (a channel shuffle): indices explode
        return flatten(self, idxs)

    Group.add_dep, _FlattenIndexMapping.__call__ = add_dep, bounded_flatten
    try:
        yield
    finally:
        Group.add_dep, _FlattenIndexMapping.__call__ = original, flatten


def _all_groups(dg, ignored: list[nn.Module], names: dict, specs: list[_GroupSpec], order: dict[nn.Module, int]):
    """Torch-Pruning's ``get_all_groups``, one root at a time: a root whose group Torch-Pruning cannot follow
    (an index mapping it does not support) becomes a blocked group of its own, with the reason, instead of an
    error for the whole model."""
    visited: set[nn.Module] = set()
    ignored_set = set(ignored) | set(dg.IGNORED_LAYERS_IN_TRACING)
    for m in sorted(dg.module2node.keys(), key=lambda m: order.get(m, len(order))):
        if m in ignored_set or m in visited or not isinstance(m, (nn.Conv2d, nn.Linear)):
            continue
        pruner = dg.get_pruner_of_module(m)
        if pruner is None or pruner.get_out_channels(m) is None:
            continue
        width = pruner.get_out_channels(m)
        try:
            with _bounded_group_growth():
                group = dg.get_pruning_group(m, pruner.prune_out_channels, list(range(width)))
        except _GroupDiverged:
            visited.add(m)
            specs.append(
                _GroupSpec(
                    width,
                    [],
                    True,
                    f"Torch-Pruning's analysis of the channels of {names.get(m)} "
                    f"did not settle (over {_MAX_GROUP_ITEMS} items: channels added onto "
                    "shifting parts of one another?)",
                    names.get(m, ""),
                )
            )
            continue
        except Exception as exc:
            visited.add(m)
            specs.append(
                _GroupSpec(
                    width,
                    [],
                    True,
                    f"Torch-Pruning cannot follow the channels of {names.get(m)} ({type(exc).__name__})",
                    names.get(m, ""),
                )
            )
            continue
        prunable = True
        for dep, _ in group:
            if dg.is_out_channel_pruning_fn(dep.handler):
                visited.add(dep.target.module)
                prunable &= dep.target.module not in ignored_set
        if prunable:
            yield group


def _flattens(group, item) -> bool:
    """A reshape in a group is a flatten into a linear layer when the group's linear items read whole
    spatial blocks per channel (Torch-Pruning's flatten mapping); a channel shuffle is not."""
    for other in group.items:
        module = other.dep.target.module
        if isinstance(module, nn.Linear) and len(other.idxs) % max(len(group[0].idxs), 1) == 0:
            return True
    return False


def _width(module: nn.Module, role: str) -> int:
    if role == "consumer":
        return module.in_channels if isinstance(module, nn.Conv2d) else int(getattr(module, "in_features"))
    if isinstance(module, (nn.BatchNorm2d, nn.BatchNorm1d)):
        return module.num_features
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    return int(weight.shape[0])


def coupled_groups(model: nn.Module, example_inputs: torch.Tensor) -> list[_GroupSpec]:
    """The coupled channel groups of an unfused model, from one real forward (for surgery, not for proofs).

    Cheaper than the meta-tensor analysis ``prune_zero_channels`` needs when the model is small enough to run.
    """
    gm = trace(model, example_inputs[:1])
    was_training = model.training
    model.eval()
    try:
        with _tolerant_index_mapping() as unmapped, warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*unwrapped")
            dg = tp.DependencyGraph().build_dependency(model, example_inputs=(example_inputs[:1],))
            specs = _group_specs(dg, model, output_layers(model, gm), unmapped, _forward_order(model, gm))
    finally:
        model.train(was_training)
    mods = dict(model.named_modules())
    for spec in specs:  # surgery here (alignment, PaI) resizes layers one-to-one: a grouped conv stays whole
        if not spec.blocked and any(_is_grouped(mods[it.name]) for it in spec.items):
            spec.blocked, spec.reason = True, f"a grouped conv reads or writes the channels of {spec.root}"
        elif not spec.blocked and spec.splits:
            spec.blocked, spec.reason = True, f"the channels of {spec.root} pass a channel split"
    return specs


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
    used_map: dict[nn.Module, np.ndarray] = {m: used_weights(m) for m in mods.values() if _is_layer(m)}
    inputs = channel_states(model, structure.gm, used_map)
    groups = []
    for spec in structure.groups:
        blocked, reason = spec.blocked, spec.reason
        consumers: list[_Consumer] = []
        producers: list[tuple[WeightLayer, np.ndarray, np.ndarray]] = []
        actions: list[tuple[nn.Module, Callable[..., Any], np.ndarray, np.ndarray]] = []
        for it in spec.items:
            module = mods[it.name]
            actions.append((module, it.handler, it.idxs, it.roots))
            if it.role in ("producer", "consumer"):
                assert _is_layer(module)  # only convs and linears are given these roles (_group_specs)
            if it.role == "producer":
                producers.append((module, it.idxs, it.roots))
            elif it.role == "consumer":
                calls = inputs.get(module)
                if not calls:
                    blocked = True
                    reason = reason or f"{it.name} is not called as a module in the traced graph"
                    continue
                states = calls[0]
                if any(not np.array_equal(c, calls[0], equal_nan=True) for c in calls[1:]):
                    states = np.full_like(calls[0], np.nan)  # a shared layer seeing different inputs
                if _is_grouped(module):  # constants are not folded into a grouped conv (zeros still go)
                    consumers.append(
                        _Consumer(module, it.idxs, it.roots, _block_diagonal(module, used_map[module]), states, False)
                    )
                else:
                    consumers.append(_Consumer(module, it.idxs, it.roots, used_map[module], states, _foldable(module)))
        g = _Group(
            spec.size,
            consumers,
            producers,
            actions,
            blocked,
            np.zeros(spec.size, dtype=bool),
            reason,
            spec.root,
            splits=spec.splits,
        )
        # the channel kept when all are removable: the one whose producers have the fewest nonzero weights
        nnz = np.zeros(spec.size)
        for layer, idxs, roots in producers:
            np.add.at(nnz, roots, used_map[layer].sum(1)[idxs])
        g.keep_one = int(np.argmin(nnz)) if spec.size else 0
        groups.append(g)
    return groups
