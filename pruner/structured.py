"""Exact structured pruning of sparse models (DNNShifter Phase 2, modules 1-4, made general and exact).

``prune_zero_channels`` fuses conv+BN, finds every channel whose removal cannot change the output, plans all
removals at once over Torch-Pruning's dependency groups (residual adds, depthwise convs, flatten into a linear
head), folds constant channels into their consumers' biases where that is exact, rebuilds the layers in one batch,
and proves the result by measuring the output deviation against the input model.

A channel (of one coupled group) is removable when, for every consumer layer reading it, either
  * the consumer's weights for it are all zero (on the consumer's surviving outputs): nobody reads it; or
  * the value arriving there is exactly 0 for every input (proved by ``channel_states``); or
  * the value is a known constant and the consumer is a linear layer or an unpadded conv, so the constant times
    the weights folds exactly into the consumer's bias.
Decisions feed back (removing a layer's outputs may leave its inputs unread), so planning runs to a fixpoint.
``mode="drop"`` is the published rule instead: drop every channel whose producing filters are all zero, bias and
all, whatever that does to the output.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch_pruning as tp
from torch import fx, nn
from torch.func import functional_call

from edgeshift.core.errors import EdgeshiftError, NotExactError

from .channel_states import ShapeRecordingModule, channel_states, used_weights
from .fuse import fuse_conv_bn, trace
from .metrics import count_macs, count_params

MODES = ("exact", "drop")
DEFAULT_RTOL = 1e-4


@dataclass
class LayerChange:
    name: str
    channels_before: int
    channels_after: int


@dataclass
class PruneReport:
    """What a prune did, measured: sizes, per-layer channels, timings and the output deviation it caused."""

    mode: str
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    fuse_seconds: float
    plan_seconds: float
    prune_seconds: float
    max_abs_diff: float  # over example inputs and random batches, pruned vs input model
    max_abs_output: float
    channels_folded: int
    layers: list[LayerChange] = field(default_factory=list)
    align: int = 1  # widths rounded up to multiples of this with zero channels (1: not aligned)
    channels_padded: int = 0  # zero channels added for the alignment

    @property
    def rel_diff(self) -> float:
        return self.max_abs_diff / max(self.max_abs_output, 1e-12)

    @property
    def channels_removed(self) -> int:
        """Net: channels removed minus zero channels added back for alignment."""
        return sum(layer.channels_before - layer.channels_after for layer in self.layers)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(rel_diff=self.rel_diff, channels_removed=self.channels_removed)
        return d

    def table(self) -> str:
        """A plain-text table: per-layer channels, then the totals."""
        rows = [f"{'layer':<36} {'before':>7} {'after':>7}"]
        rows += [f"{c.name:<36} {c.channels_before:>7} {c.channels_after:>7}" for c in self.layers
                 if c.channels_after != c.channels_before]
        rows.append("")
        rows.append(f"params       {self.params_before:>12,} -> {self.params_after:>12,}  "
                    f"({self.params_before / max(self.params_after, 1):.2f}x smaller)")
        rows.append(f"MACs         {self.macs_before:>12,} -> {self.macs_after:>12,}  "
                    f"({self.macs_before / max(self.macs_after, 1):.2f}x fewer)")
        rows.append(f"channels     {self.channels_removed} removed, {self.channels_folded} folded into biases"
                    + (f", {self.channels_padded} zero channels added (widths multiples of {self.align})"
                       if self.align > 1 else ""))
        rows.append(f"time         fuse {self.fuse_seconds * 1e3:.1f} ms, plan {self.plan_seconds * 1e3:.1f} ms, "
                    f"prune {self.prune_seconds * 1e3:.1f} ms")
        rows.append(f"max |diff|   {self.max_abs_diff:.3g} (relative {self.rel_diff:.3g}, mode={self.mode})")
        return "\n".join(rows)


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


_STRUCTURE_CACHE: dict[tuple, _Structure] = {}
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
    found = _STRUCTURE_CACHE.get(key)
    if found is None:
        found = _analyse_structure(model, example_inputs)
        if len(_STRUCTURE_CACHE) >= _STRUCTURE_CACHE_SIZE:
            _STRUCTURE_CACHE.pop(next(iter(_STRUCTURE_CACHE)))
        _STRUCTURE_CACHE[key] = found
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


def _plan_exact(groups: list[_Group]) -> None:
    """Mark removable channels, iterating until removing outputs stops freeing inputs."""
    removed_out: dict[nn.Module, np.ndarray] = {}
    for g in groups:
        for layer, idxs, roots in g.producers:
            removed_out.setdefault(layer, np.zeros(layer.weight.shape[0], dtype=bool))
    changed = True
    while changed:
        changed = False
        for g in groups:
            if g.blocked or g.size <= 1:
                continue
            ok = np.ones(g.size, dtype=bool)
            for c in g.consumers:
                dead = removed_out.get(c.layer)
                used = c.used if dead is None or not dead.any() else c.used[~dead]
                read = used[:, c.idxs].any(0)  # does any surviving output read this input channel
                s = c.states[c.idxs]
                fine = ~read | (s == 0) | (c.foldable & ~np.isnan(s))
                np.logical_and.at(ok, c.roots, fine)
            if ok.all():
                ok[g.keep_one] = False
            if not np.array_equal(ok, g.removable):
                g.removable = ok
                changed = True
                for layer, idxs, roots in g.producers:
                    removed_out[layer][idxs] = ok[roots]


def _plan_drop(groups: list[_Group]) -> None:
    """The published rule: a channel goes when all its producing filters are zero (their bias is ignored)."""
    for g in groups:
        if g.blocked or g.size <= 1 or not g.producers:
            continue
        ok = np.ones(g.size, dtype=bool)
        for layer, idxs, roots in g.producers:
            zero = ~used_weights(layer)[idxs].any(1)
            np.logical_and.at(ok, roots, zero)
        if ok.all():
            ok[g.keep_one] = False
        g.removable = ok


@torch.no_grad()
def _fold_constants(groups: list[_Group]) -> int:
    """Move constant channels that are about to be removed into their consumers' biases."""
    folded = 0
    for g in groups:
        if not g.removable.any():
            continue
        for c in g.consumers:
            sel = g.removable[c.roots]
            s = c.states[c.idxs][sel]
            idx = c.idxs[sel]
            mask = ~np.isnan(s) & (s != 0) & c.used[:, idx].any(0)
            if not mask.any():
                continue
            w = c.layer.weight.detach().double()
            w = w.reshape(w.shape[0], w.shape[1], -1).sum(-1)  # [out, in]
            delta = (w[:, torch.as_tensor(idx[mask])] * torch.as_tensor(s[mask])).sum(1)
            if c.layer.bias is None:
                c.layer.bias = nn.Parameter(torch.zeros(c.layer.weight.shape[0], dtype=c.layer.weight.dtype))
            c.layer.bias.add_(delta.to(c.layer.bias.dtype))
            folded += int(mask.sum())
    return folded


def _execute(groups: list[_Group]) -> None:
    """Rebuild every layer without its planned channels (each group's handlers, one pass)."""
    for g in groups:
        if not g.removable.any():
            continue
        for module, handler, idxs, roots in g.actions:
            hit = g.removable[roots]
            if hit.any():
                handler(module, idxs[hit].tolist())


def _layer_widths(model: nn.Module) -> dict[str, int]:
    return {name: m.weight.shape[0] for name, m in model.named_modules() if _is_layer(m)}


@torch.no_grad()
def output_deviation(reference: nn.Module, candidate: nn.Module, example_inputs: torch.Tensor,
                     random_batches: int = 3, seed: int = 0) -> tuple[float, float]:
    """(max |candidate - reference|, max |reference|) over the example and a few random batches."""
    gen = torch.Generator().manual_seed(seed)
    batches = [example_inputs] + [torch.randn(example_inputs.shape, generator=gen) for _ in range(random_batches)]
    max_diff = max_out = 0.0
    for x in batches:
        ref, out = reference(x), candidate(x)
        if ref.shape != out.shape:
            raise NotExactError(f"pruned model output shape {tuple(out.shape)} != reference {tuple(ref.shape)}")
        max_diff = max(max_diff, float((out.double() - ref.double()).abs().max()))
        max_out = max(max_out, float(ref.abs().max()))
    return max_diff, max_out


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
        if pad == 0 or spec.blocked or any(
                len(it.idxs) != spec.size or not np.array_equal(np.sort(it.idxs), np.arange(spec.size))
                for it in spec.items):
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
                if m.track_running_stats:
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


def prune_zero_channels(model: nn.Module, example_inputs: torch.Tensor, *, mode: str = "exact",
                        rtol: float = DEFAULT_RTOL, random_batches: int = 3,
                        align: int = 1) -> tuple[nn.Module, PruneReport]:
    """Structurally remove every channel of ``model`` that cannot change its output; returns (pruned, report).

    The input model is left untouched. The pruned model has conv+BN fused. In ``mode="exact"`` (default) the
    output deviation on ``example_inputs`` and ``random_batches`` random batches is measured and a
    ``NotExactError`` raised if it exceeds ``rtol`` times the largest output; ``mode="drop"`` reproduces the
    published behaviour (all-zero filters dropped with their bias) and only reports the deviation. ``align`` > 1
    then rounds every width up to a multiple of it with zero channels (``pad_channels``), still exactly.
    """
    if mode not in MODES:
        raise EdgeshiftError(f"unknown prune mode {mode!r}; known: {', '.join(MODES)}")
    if align < 1:
        raise EdgeshiftError(f"align must be >= 1 (1 = keep the widths pruning leaves), got {align}")
    if not isinstance(example_inputs, torch.Tensor):
        raise EdgeshiftError("example_inputs must be one tensor batch shaped like the model's input")
    reference = model
    was_training = reference.training
    reference.eval()
    try:
        t0 = time.perf_counter()
        work = fuse_conv_bn(reference)  # deep copy: the input model is never modified
        t1 = time.perf_counter()
        groups = _build_groups(work, example_inputs)
        (_plan_exact if mode == "exact" else _plan_drop)(groups)
        t2 = time.perf_counter()
        widths_before = _layer_widths(work)
        folded = _fold_constants(groups) if mode == "exact" else 0
        _execute(groups)
        padded = pad_channels(work, example_inputs, align)
        t3 = time.perf_counter()
        widths_after = _layer_widths(work)
        max_diff, max_out = output_deviation(reference, work, example_inputs, random_batches)
        report = PruneReport(
            mode=mode, params_before=count_params(reference), params_after=count_params(work),
            macs_before=count_macs(reference, example_inputs), macs_after=count_macs(work, example_inputs),
            fuse_seconds=t1 - t0, plan_seconds=t2 - t1, prune_seconds=t3 - t2,
            max_abs_diff=max_diff, max_abs_output=max_out, channels_folded=folded,
            layers=[LayerChange(n, widths_before[n], widths_after[n]) for n in widths_before],
            align=align, channels_padded=padded,
        )
    finally:
        reference.train(was_training)
    if mode == "exact" and report.rel_diff > rtol:
        raise NotExactError(f"pruning changed the output by {max_diff:.3g} ({report.rel_diff:.3g} relative, "
                            f"limit {rtol:g}); the model has an operation the planner does not understand")
    work.eval()
    return work, report

