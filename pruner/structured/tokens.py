"""Exact pruning of a transformer's token-wise layers: dead MLP hidden units and dead attention heads.

The channel planner of this package reads dimension 1 of a tensor as its channels. A linear layer applied to tokens
(N, tokens, dim), as in every vision transformer, reads the last one, and the residual stream's channels are read
whole by every block's LayerNorm, so that planner does not apply. This pass removes, instead, what provably cannot
change the output, each removal checked against the model before the next:

* **MLP hidden units**: a linear, elementwise activations (dropout, identity), a linear, found in the traced
  graph with nothing else reading the hidden tensor. A unit the second linear never reads (its column all zero)
  goes; a unit whose row of the first linear is all zero carries ``act(bias)`` for every token, which folds
  into the second linear's bias before it goes.
* **Attention heads**, in modules written as timm's ``Attention`` (``qkv`` and ``proj`` linears, ``num_heads``,
  ``head_dim``, no normalisation or gate between the heads and ``proj``): a head whose ``proj`` columns are all
  zero, or whose value rows and bias are zero (its output is then zero whatever it attends to), contributes
  nothing; its q, k and v rows and its ``proj`` columns go.

The residual stream's width is kept.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from ..channel_states import ELEMENTWISE_FUNCTIONS, ELEMENTWISE_METHODS, ELEMENTWISE_MODULES
from ..fuse import trace
from ..metrics import forward_with_hooks

# Elementwise on every value (not per channel of dimension 1, as a batch norm is).
_POINTWISE_MODULES = tuple(m for m in ELEMENTWISE_MODULES if not issubclass(m, nn.modules.batchnorm._BatchNorm))


def token_linears(model: nn.Module, example_inputs: torch.Tensor) -> list[str]:
    """The linear layers of ``model`` that read a tensor of rank 3 or more (tokens), in the order they run."""
    seen: list[str] = []
    hooks: list[tuple[nn.Module, Callable[..., None]]] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):

            def hook(mod, inp, out, name=name):
                if inp and isinstance(inp[0], torch.Tensor) and inp[0].dim() >= 3 and name not in seen:
                    seen.append(name)

            hooks.append((module, hook))
    forward_with_hooks(model, example_inputs[:1], hooks)
    return seen


@dataclass(frozen=True)
class _HiddenPair:
    """``first`` -> pointwise ``between`` -> ``second``: the hidden units are ``first``'s outputs."""

    first: str
    second: str
    between: tuple[fx.Node, ...]


def _pointwise(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules.get(str(node.target)), _POINTWISE_MODULES)
    extra = [*node.args[1:], *node.kwargs.values()]
    if any(isinstance(a, fx.Node) for a in extra):  # a second tensor operand: not a function of this value alone
        return False
    if node.op == "call_function":
        return node.target in ELEMENTWISE_FUNCTIONS
    return node.op == "call_method" and node.target in ELEMENTWISE_METHODS


def _hidden_pairs(gm: fx.GraphModule) -> list[_HiddenPair]:
    modules = dict(gm.named_modules())
    calls = Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_module")
    pairs = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(str(node.target)), nn.Linear):
            continue
        between: list[fx.Node] = []
        p = node.args[0] if node.args else None
        while isinstance(p, fx.Node) and len(p.users) == 1 and _pointwise(p, modules):
            between.append(p)
            p = p.args[0]
        first = p
        if (
            isinstance(first, fx.Node)
            and first.op == "call_module"
            and isinstance(modules.get(str(first.target)), nn.Linear)
            and len(first.users) == 1
            and calls[str(first.target)] == 1
            and calls[str(node.target)] == 1
        ):
            pairs.append(_HiddenPair(str(first.target), str(node.target), tuple(reversed(between))))
    return pairs


def _apply_between(pair: _HiddenPair, gm: fx.GraphModule, values: torch.Tensor) -> torch.Tensor:
    """The pointwise ops between the two linears, applied to ``values`` (what a constant unit carries)."""
    modules = dict(gm.named_modules())
    for n in pair.between:
        if n.op == "call_module":
            values = modules[str(n.target)](values)
        elif n.op == "call_function":
            values = n.target(values, *n.args[1:], **n.kwargs)  # type: ignore[operator]
        else:
            values = getattr(values, str(n.target))(*n.args[1:], **n.kwargs)
    return values


def _linear_like(old: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None).to(old.weight.dtype)
    new.weight.data.copy_(weight)
    if bias is not None:
        new.bias.data.copy_(bias)
    new.train(old.training)
    return new


@torch.no_grad()
def _prune_hidden(model: nn.Module, gm: fx.GraphModule, pair: _HiddenPair) -> tuple[int, int] | None:
    """Remove ``pair``'s dead hidden units in ``model``; (removed, folded into the bias: those carrying a constant
    other than 0), or None when none is dead."""
    first, second = model.get_submodule(pair.first), model.get_submodule(pair.second)
    assert isinstance(first, nn.Linear) and isinstance(second, nn.Linear)
    unread = (second.weight == 0).all(0)
    bias = first.bias if first.bias is not None else torch.zeros(first.out_features)
    constant = (first.weight == 0).all(1) & ~unread
    removable = unread | constant
    if not removable.any():
        return None
    if removable.all():
        removable[0] = False  # a linear keeps one unit
        constant[0] = False
    second_bias = second.bias.clone() if second.bias is not None else torch.zeros(second.out_features)
    carried = _apply_between(pair, gm, bias[constant].to(first.weight.dtype)) if constant.any() else bias[:0]
    second_bias += second.weight[:, constant] @ carried
    folded = int((carried != 0).sum())
    keep = ~removable
    fold_needed = second.bias is not None or folded > 0
    model.set_submodule(
        pair.first,
        _linear_like(first, first.weight[keep], first.bias[keep] if first.bias is not None else None),
    )
    model.set_submodule(pair.second, _linear_like(second, second.weight[:, keep], second_bias if fold_needed else None))
    return int(removable.sum()), folded


def _is_attention(m: nn.Module) -> bool:
    qkv, proj, heads, dim = (getattr(m, a, None) for a in ("qkv", "proj", "num_heads", "head_dim"))
    return (
        isinstance(qkv, nn.Linear)
        and isinstance(proj, nn.Linear)
        and isinstance(heads, int)
        and isinstance(dim, int)
        and qkv.out_features == 3 * heads * dim
        and proj.in_features == heads * dim
        and isinstance(getattr(m, "norm", nn.Identity()), nn.Identity)
        and getattr(m, "gate", None) is None
    )


@torch.no_grad()
def _prune_heads(m: nn.Module) -> int:
    """Remove the dead heads of attention module ``m``; how many went."""
    qkv, proj = getattr(m, "qkv"), getattr(m, "proj")  # noqa: B009  (an attention module: see _is_attention)
    assert isinstance(qkv, nn.Linear) and isinstance(proj, nn.Linear)
    heads, dim = int(getattr(m, "num_heads")), int(getattr(m, "head_dim"))  # noqa: B009
    width = heads * dim
    cols = proj.weight.reshape(proj.out_features, heads, dim)
    v_rows = qkv.weight[2 * width :].reshape(heads, dim, -1)
    v_bias = qkv.bias[2 * width :].reshape(heads, dim) if qkv.bias is not None else torch.zeros(heads, dim)
    dead = (cols == 0).all(2).all(0) | ((v_rows == 0).all(2).all(1) & (v_bias == 0).all(1))
    if not dead.any():
        return 0
    if dead.all():
        dead[0] = False
    keep = ~dead
    rows = torch.arange(3 * width).reshape(3, heads, dim)[:, keep].reshape(-1)
    cols_kept = torch.arange(width).reshape(heads, dim)[keep].reshape(-1)
    m.qkv = _linear_like(qkv, qkv.weight[rows], qkv.bias[rows] if qkv.bias is not None else None)
    m.proj = _linear_like(proj, proj.weight[:, cols_kept], proj.bias)
    setattr(m, "num_heads", int(keep.sum()))  # noqa: B010  (a plain int attribute, not a module)
    if hasattr(m, "attn_dim"):
        setattr(m, "attn_dim", int(keep.sum()) * dim)  # noqa: B010
    return int(dead.sum())


@dataclass
class TokenPruneResult:
    """What ``prune_token_layers`` removed, and why anything dead was kept."""

    removed_units: int = 0  # MLP hidden units
    folded_units: int = 0  # of those, units whose constant went into the next layer's bias
    removed_heads: int = 0
    notes: list[str] = field(default_factory=list)


def prune_token_layers(
    model: nn.Module, example_inputs: torch.Tensor, problem: Callable[[], str | None]
) -> TokenPruneResult:
    """Remove ``model``'s dead MLP hidden units and attention heads in place, each change kept only when
    ``problem()`` (the model against its original on the example) finds nothing wrong."""
    result = TokenPruneResult(notes=["the residual stream's width is kept: every block's LayerNorm reads it whole"])
    for name, m in list(model.named_modules()):
        if not _is_attention(m):
            continue
        saved = {a: getattr(m, a) for a in ("qkv", "proj", "num_heads", "attn_dim") if hasattr(m, a)}
        gone = _prune_heads(m)
        if gone and (why := problem()) is not None:
            for attr, value in saved.items():
                setattr(m, attr, value)
            result.notes.append(f"kept the dead heads of {name}: removing them {why}")
        else:
            result.removed_heads += gone
    try:
        gm = trace(model, example_inputs[:1])
    except Exception as exc:  # no graph, no pairs: the heads above were found by module, not by graph
        result.notes.append(f"MLP hidden units kept: {exc}")
        return result
    for pair in _hidden_pairs(gm):
        first, second = model.get_submodule(pair.first), model.get_submodule(pair.second)
        done = _prune_hidden(model, gm, pair)
        if done is None:
            continue
        if (why := problem()) is not None:
            model.set_submodule(pair.first, first)
            model.set_submodule(pair.second, second)
            result.notes.append(
                f"kept the dead hidden units between {pair.first} and {pair.second}: removing them {why}"
            )
            continue
        result.removed_units += done[0]
        result.folded_units += done[1]
    return result
