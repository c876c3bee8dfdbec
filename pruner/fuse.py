"""Conv-BN fusion: fold every BatchNorm2d that directly follows a Conv2d into the conv's weight and bias."""
from __future__ import annotations

import copy

import torch
from torch import fx, nn

from edgeshift.core.errors import ModelNotTraceableError


def trace(model: nn.Module) -> fx.GraphModule:
    """Symbolically trace ``model``; a model fx cannot trace raises ModelNotTraceableError."""
    try:
        return fx.symbolic_trace(model)
    except Exception as exc:  # fx raises many types for untraceable code
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelNotTraceableError(
            f"model {type(model).__name__} cannot be traced into a graph ({first}); "
            "remove data-dependent control flow from its forward"
        ) from None


def conv_bn_pairs(model: nn.Module, gm: fx.GraphModule | None = None) -> list[tuple[str, str]]:
    """(conv name, bn name) for every BatchNorm2d whose only input is a Conv2d read by nothing else."""
    gm = gm or trace(model)
    mods = dict(model.named_modules())
    pairs = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(mods.get(node.target), nn.BatchNorm2d):
            continue
        src = node.args[0]
        if (isinstance(src, fx.Node) and src.op == "call_module" and isinstance(mods.get(src.target), nn.Conv2d)
                and len(src.users) == 1):
            pairs.append((src.target, node.target))
    return pairs


@torch.no_grad()
def fold_bn_into_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Rewrite ``conv`` in place so conv(x) equals bn(conv(x)) in eval mode (per-channel factors in float64)."""
    b = conv.bias.double() if conv.bias is not None else torch.zeros(conv.out_channels, dtype=torch.float64)
    gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(b)
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(b)
    scale = gamma / torch.sqrt(bn.running_var.double() + bn.eps)
    conv.weight.mul_(scale.to(conv.weight.dtype).reshape(-1, 1, 1, 1))  # zeros stay exactly zero
    new_bias = ((b - bn.running_mean.double()) * scale + beta).to(conv.weight.dtype)
    if conv.bias is None:
        conv.bias = nn.Parameter(new_bias)
    else:
        conv.bias.copy_(new_bias)


def fuse_conv_bn(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Return ``model`` in eval mode with each Conv2d->BatchNorm2d pair folded and the BN replaced by Identity.

    BatchNorms not directly after a conv are left in place. The input model is untouched unless ``inplace``.
    """
    if not inplace:
        model = copy.deepcopy(model)
    model.eval()
    if not any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
        return model  # nothing to fuse: no need to trace
    for conv_name, bn_name in conv_bn_pairs(model):
        fold_bn_into_conv(model.get_submodule(conv_name), model.get_submodule(bn_name))
        model.set_submodule(bn_name, nn.Identity())
    return model
