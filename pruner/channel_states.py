"""Which channels of every tensor in a model are the same constant for every input.

An abstract interpretation over the fx graph: each tensor gets one float per channel (dim 1), ``nan`` when the
channel depends on the input, otherwise the exact value the channel holds at every position for every input.
It is a proof, not a measurement: a channel is marked constant only by reasoning on the weights (a conv output
channel whose every used input channel is constant zero, or constant with no padding, is its bias plus those
constants times the weights). Unknown operations make their outputs ``nan``, which is always safe.
"""

from __future__ import annotations

import operator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

# Modules applied channel-wise and element by element: f(constant channel) is a constant channel.
ELEMENTWISE_MODULES = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.Hardtanh,
    nn.Hardswish,
    nn.SiLU,
    nn.GELU,
    nn.ELU,
    nn.Sigmoid,
    nn.Tanh,
    nn.Identity,
    nn.Dropout,
    nn.BatchNorm2d,
    nn.BatchNorm1d,
)
ELEMENTWISE_FUNCTIONS = {
    F.relu,
    F.relu6,
    torch.relu,
    F.hardtanh,
    F.hardswish,
    F.silu,
    F.gelu,
    torch.sigmoid,
    torch.tanh,
    F.dropout,
}
ELEMENTWISE_METHODS = {"relu", "sigmoid", "tanh", "contiguous", "clone"}
SHAPE_KEEPING_POOLS = (nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
ADD = {operator.add, operator.iadd, torch.add}
MUL = {operator.mul, operator.imul, torch.mul}


def _shape(node) -> tuple | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _unknown(node) -> np.ndarray | None:
    shape = _shape(node)
    if shape is None or len(shape) < 2:
        return None
    return np.full(shape[1], np.nan)


@torch.no_grad()
def _apply_elementwise(fn, values: np.ndarray, ndim: int) -> np.ndarray:
    t = torch.tensor(values, dtype=torch.float32).reshape((1, -1) + (1,) * (ndim - 2))
    return fn(t).reshape(-1).double().numpy()


def used_weights(layer: nn.Conv2d | nn.Linear) -> np.ndarray:
    """Bool [out, in_per_group]: whether any weight linking output o and input i is nonzero.

    A sum of |w| is 0 iff every w is (so -0.0 counts as zero); the sum over the kernel is a product with a ones
    vector (BLAS is twice as fast as a reduction over a short innermost axis). Computed in cache-sized chunks
    through one reused buffer: a whole-layer temporary would be fresh memory, paying page faults every call."""
    w = layer.weight.detach()
    o, i = w.shape[0], w.shape[1]
    flat = w.reshape(o, i, -1)
    k = flat.shape[2]
    ones = torch.ones(k, dtype=w.dtype)
    out = torch.empty((o, i), dtype=torch.bool)
    step = max(1, (1 << 16) // max(1, i * k))
    buf = torch.empty((min(step, o), i, k), dtype=w.dtype)
    for start in range(0, o, step):
        chunk = flat[start : start + step]
        b = buf[: chunk.shape[0]]
        torch.abs(chunk, out=b)
        torch.ne((b.reshape(-1, k) @ ones).reshape(chunk.shape[0], i), 0, out=out[start : start + step])
    return out.numpy()


def _layer_output(layer: nn.Conv2d | nn.Linear, inp: np.ndarray, used: np.ndarray) -> np.ndarray:
    """Per-output-channel constant of a Conv2d/Linear given its per-input-channel constants."""
    out_ch, in_per_group = layer.weight.shape[0], layer.weight.shape[1]
    groups = getattr(layer, "groups", 1)
    padded = isinstance(layer, nn.Conv2d) and (
        isinstance(layer.padding, str)
        and layer.padding != "valid"
        or not isinstance(layer.padding, str)
        and any(p != 0 for p in layer.padding)
    )
    unknown_in, const_in = np.isnan(inp), ~np.isnan(inp) & (inp != 0)
    if groups == 1:  # the common case: every output reads every input, no index arrays needed
        unknown = used[:, unknown_in].any(1) if unknown_in.any() else np.zeros(out_ch, bool)
        nonzero = used[:, const_in] if const_in.any() else None
        x = inp[None, :]
    else:
        group_of_out = np.arange(out_ch) // (out_ch // groups)
        in_idx = group_of_out[:, None] * in_per_group + np.arange(in_per_group)[None, :]  # [out, in_per_group]
        unknown = (unknown_in[in_idx] & used).any(1)
        nonzero = const_in[in_idx] & used
        x = inp[in_idx]
        nonzero = nonzero if nonzero.any() else None
    blocked = unknown.copy()
    if nonzero is not None and padded:
        blocked |= nonzero.any(1)
    const = layer.bias.detach().double().numpy().copy() if layer.bias is not None else np.zeros(out_ch)
    if nonzero is not None and nonzero[~blocked].any():  # constants times weights, only where read (rare)
        w_sum = layer.weight.detach().reshape(out_ch, in_per_group, -1).sum(-1).double().numpy()
        if groups == 1:
            contrib = (w_sum[:, const_in] * inp[const_in][None, :] * nonzero).sum(1)
        else:
            contrib = np.where(nonzero, np.nan_to_num(x) * w_sum, 0.0).sum(1)
        const += np.where(blocked, 0.0, contrib)
    return np.where(blocked, np.nan, const)


SPLITS = {torch.split, torch.chunk, "split", "chunk"}


def _split_states(node: fx.Node, x: np.ndarray) -> list[np.ndarray] | None:
    """Per chunk of a split or chunk (from the chunks' recorded shapes): a slice of the channels along dim 1,
    all of them along any other dim."""
    metas = node.meta.get("tensor_meta")
    if not isinstance(metas, (tuple, list)) or not all(hasattr(m, "shape") for m in metas) or not metas:
        return None
    ndim = len(metas[0].shape)
    dim = node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else 0)
    if not isinstance(dim, int) or ndim < 2:
        return None
    dim = dim + ndim if dim < 0 else dim
    if dim != 1:
        return [x.copy() for _ in metas]
    widths = [int(m.shape[1]) for m in metas]
    if sum(widths) != len(x):
        return None
    starts = np.cumsum([0] + widths)
    return [x[a:b].copy() for a, b in zip(starts[:-1], starts[1:])]


def _flatten_states(values: np.ndarray, shape: tuple) -> np.ndarray:
    spatial = int(np.prod(shape[2:])) if len(shape) > 2 else 1
    return np.repeat(values, spatial)


class _FastMetaShapeProp(ShapeProp):
    """ShapeProp that, on meta tensors, stands in ``relu`` for elementwise activations.

    Some activations (hardtanh / ReLU6) have slow Python decompositions on meta tensors; any elementwise op gives
    the same shapes and the same channel coupling in the autograd graph.
    """

    def call_module(self, target, args, kwargs):
        m = self.fetch_attr(target)
        x = args[0] if args else None
        if (
            isinstance(m, ELEMENTWISE_MODULES)
            and not isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d))
            and isinstance(x, torch.Tensor)
            and x.is_meta
        ):
            return torch.relu(x)
        return super().call_module(target, args, kwargs)


class ShapeRecordingModule(nn.Module):
    """Runs an fx graph through ShapeProp: one forward both records node shapes and serves as a trace."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__()
        self.gm = gm

    def forward(self, x):
        return _FastMetaShapeProp(self.gm).propagate(x)


def channel_states(
    model: nn.Module, gm: fx.GraphModule, used: dict[nn.Module, np.ndarray], example_inputs: torch.Tensor | None = None
) -> dict[nn.Module, list[np.ndarray]]:
    """For each Conv2d/Linear, the per-input-channel constants it sees (one array per call site).

    ``used`` maps each layer to ``used_weights(layer)``. Node shapes come from a previous ShapeProp run over
    ``gm`` unless ``example_inputs`` is given, in which case it is run here.
    """
    if example_inputs is not None:
        ShapeProp(gm).propagate(example_inputs)
    mods = dict(model.named_modules())
    states: dict[fx.Node, np.ndarray | list | float | None] = {}
    layer_inputs: dict[nn.Module, list[np.ndarray]] = {}

    def state(arg):
        if isinstance(arg, fx.Node):
            return states.get(arg)
        if isinstance(arg, (int, float)):
            return float(arg)
        return None

    for node in gm.graph.nodes:
        out: Any = _unknown(node)  # an array of per-channel constants, a list of them (a split), or None
        shape = _shape(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None
        x = state(node.args[0]) if node.args else None
        if isinstance(x, np.ndarray) and shape is None:  # no recorded shape: nothing is known about its output
            states[node] = out
            continue
        shape_in: tuple = shape or ()  # recorded wherever the input's state is known
        if node.op == "call_module":
            m = mods[node.target]
            if isinstance(m, (nn.Conv2d, nn.Linear)) and isinstance(x, np.ndarray):
                layer_inputs.setdefault(m, []).append(x)
                if isinstance(m, nn.Conv2d) or (shape is not None and len(shape_in) == 2):
                    out = _layer_output(m, x, used[m])
            elif isinstance(m, ELEMENTWISE_MODULES) and isinstance(x, np.ndarray):
                out = _apply_elementwise(m, x, len(shape_in))
            elif isinstance(m, SHAPE_KEEPING_POOLS) and isinstance(x, np.ndarray):
                out = x.copy()
            elif isinstance(m, nn.AvgPool2d) and isinstance(x, np.ndarray):
                exact = m.padding == 0 or not m.count_include_pad
                out = x.copy() if exact else np.where(x == 0, 0.0, np.nan)
            elif isinstance(m, nn.Flatten) and isinstance(x, np.ndarray) and m.start_dim == 1:
                out = _flatten_states(x, shape_in)
        elif node.op in ("call_function", "call_method"):
            fn = node.target
            if (fn in ADD or fn in ("add", "add_")) and len(node.args) == 2:
                a, b = state(node.args[0]), state(node.args[1])
                if (
                    a is not None
                    and b is not None
                    and out is not None
                    and np.shape(a) in ((), np.shape(out))
                    and np.shape(b) in ((), np.shape(out))
                ):
                    out = np.asarray(a) + np.asarray(b) * np.ones_like(out)
            elif (fn in MUL or fn in ("mul", "mul_")) and len(node.args) == 2:
                a, b = state(node.args[0]), state(node.args[1])
                if isinstance(b, np.ndarray) and not isinstance(a, np.ndarray):
                    a, b = b, a
                if isinstance(a, np.ndarray) and isinstance(b, float) and a.shape == np.shape(out):
                    out = a * b
                elif isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.shape == b.shape == np.shape(out):
                    # a gate (squeeze-excitation: x * sigmoid(...)): zero times anything finite is zero
                    with np.errstate(invalid="ignore"):
                        out = np.where((a == 0) | (b == 0), 0.0, a * b)
            elif (fn in ELEMENTWISE_FUNCTIONS or fn in ELEMENTWISE_METHODS) and isinstance(x, np.ndarray):
                f = getattr(torch.Tensor, fn) if isinstance(fn, str) else fn
                out = _apply_elementwise(lambda t: f(t), x, len(shape_in))
            elif fn in (torch.flatten, "flatten", "view", "reshape") and isinstance(x, np.ndarray):
                flat_shape = _shape(node)
                if flat_shape is not None and len(flat_shape) == 2 and shape_in[0] == flat_shape[0]:
                    out = _flatten_states(x, shape_in)
            elif fn in (F.adaptive_avg_pool2d, F.max_pool2d, F.adaptive_max_pool2d) and isinstance(x, np.ndarray):
                out = x.copy()
            elif fn == "mean" and isinstance(x, np.ndarray):
                dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
                dims = tuple(dims) if isinstance(dims, (list, tuple)) else (dims,)
                if all(d not in (0, 1) and d is not None for d in dims) and len(_shape(node) or ()) >= 2:
                    out = x.copy()
            elif fn in SPLITS and isinstance(x, np.ndarray):
                out = _split_states(node, x)
            elif (
                fn is operator.getitem
                and isinstance(x, list)
                and isinstance(node.args[1], int)
                and -len(x) <= node.args[1] < len(x)
            ):
                out = x[node.args[1]]
            elif fn == torch.cat:
                parts = [state(a) for a in node.args[0]]
                dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
                if dim == 1 and all(isinstance(p, np.ndarray) for p in parts):
                    out = np.concatenate(parts)
        shape_out = _shape(node)
        if out is not None and shape_out is not None and np.shape(out) != (shape_out[1],):
            out = _unknown(node)
        states[node] = out
    return layer_inputs
