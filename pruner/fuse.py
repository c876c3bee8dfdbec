"""Conv-BN fusion: fold every BatchNorm2d (or norm+activation) that directly follows a Conv2d into the conv's
weight and bias, after folding re-parameterisable multi-branch blocks into one conv."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import sys

import torch
from torch import fx, nn
from torch.fx import _symbolic_trace as st

from edgeshift.core.errors import ModelNotTraceableError

from .models.record import has_record, record_of, set_record


def _timm_notrace() -> tuple[tuple[type, ...], tuple]:
    """The modules and functions timm marks as not traceable (where timm is already imported: a timm model)."""
    fx_mod = sys.modules.get("timm.layers._fx")
    if fx_mod is None:
        return (), ()
    try:
        return tuple(fx_mod.get_notrace_modules()), tuple(fx_mod.get_notrace_functions())
    except Exception:  # no timm, or a timm whose private helpers moved: trace without its lists
        return (), ()


class _TraceInsideFailed(Exception):
    """Tracing into a module timm marks as not traceable failed: trace again with it as one node."""

    def __init__(self, kind: type) -> None:
        super().__init__(kind.__name__)
        self.kind = kind


class Tracer(fx.Tracer):
    """fx's tracer, keeping as single nodes: every BatchNorm (subclasses too, e.g. timm's BatchNormAct2d, a norm
    with its activation inside: one per-channel, elementwise module to the planner and the fuser), and what timm
    marks as not traceable.

    Given ``example_inputs``, it traces into timm's not-traceable modules instead (their control flow is on
    shapes: VGG's head pools when its input is under 7x7), deciding each such branch at the example's shape;
    the graph is then for that input shape only, which is what pruning and export are for. A module whose
    forward still cannot be traced (control flow on values) stays one node: ``trace`` retries with it in
    ``opaque``."""

    _MAX_DECISIONS = 64  # shape branches decided by running the graph so far; past this, the module stays a node

    def __init__(self, example_inputs: torch.Tensor | None = None, opaque: frozenset[type] = frozenset()) -> None:
        modules, functions = _timm_notrace()
        super().__init__(autowrap_functions=tuple(f for f in functions if callable(f)))
        self._leaves = modules
        self._example = example_inputs
        self._opaque = opaque
        self._decisions = 0

    def _traced_into(self, m: nn.Module) -> bool:
        return (
            self._example is not None
            and bool(self._leaves)
            and isinstance(m, self._leaves)
            and type(m) not in self._opaque
            and not isinstance(m, nn.modules.batchnorm._BatchNorm)
        )

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            return True
        if self._leaves and isinstance(m, self._leaves):
            return not self._traced_into(m)
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        if not self._traced_into(m):
            return super().call_module(m, forward, args, kwargs)
        try:
            return super().call_module(m, forward, args, kwargs)
        except _TraceInsideFailed:
            raise
        except Exception as exc:
            raise _TraceInsideFailed(type(m)) from exc

    def to_bool(self, obj: fx.Proxy) -> bool:
        """A branch on the input's shape, decided at the example's shape; any other branch cannot be traced."""
        if self._example is None or self._decisions >= self._MAX_DECISIONS or _reads_values(obj.node):
            return super().to_bool(obj)
        self._decisions += 1
        return bool(self._evaluate(obj.node))

    @torch.no_grad()
    def _evaluate(self, node: fx.Node):
        needed, stack = set(), [node]
        while stack:
            n = stack.pop()
            if n not in needed:
                needed.add(n)
                stack.extend(n.all_input_nodes)
        graph, env = fx.Graph(), dict[fx.Node, fx.Node]()
        for n in self.graph.nodes:
            if n in needed:
                env[n] = graph.node_copy(n, lambda a: env[a])
        graph.output(env[node])
        modes = {m: m.training for m in self.root.modules()}
        self.root.eval()  # never update batch statistics while deciding a branch
        try:
            with _not_tracing():
                return fx.GraphModule(self.root, graph)(self._example)
        finally:
            for m, training in modes.items():
                m.training = training


@contextlib.contextmanager
def _not_tracing():
    """Run real modules in the middle of a trace: fx's patches of ``nn.Module.__call__`` lifted for the block
    (fx's own private helper; a torch without it cannot decide branches, and the module stays one node)."""

    revert = getattr(st, "_maybe_revert_all_patches", None)
    if revert is None or not hasattr(st, "_is_fx_tracing_flag"):
        raise RuntimeError("this torch cannot run modules during a trace")
    flag = st._is_fx_tracing_flag
    st._is_fx_tracing_flag = False
    try:
        with revert():
            yield
    finally:
        st._is_fx_tracing_flag = flag


def _reads_values(node: fx.Node) -> bool:
    """Whether ``node`` depends on a tensor's values, not only on shapes (``x.shape``, ``x.size()``, ``x.dim()``)."""
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if (
            n.op == "call_function"
            and n.target is getattr
            and len(n.args) > 1
            and n.args[1] in ("shape", "ndim")
            or n.op == "call_method"
            and n.target in ("size", "dim")
        ):
            continue
        if n.op in ("placeholder", "get_attr", "call_module"):
            return True
        stack.extend(n.all_input_nodes)
    return False


def trace(model: nn.Module, example_inputs: torch.Tensor | None = None) -> fx.GraphModule:
    """Symbolically trace ``model``; a model fx cannot trace raises ModelNotTraceableError. With
    ``example_inputs`` the graph may be specialised to their shape (see ``Tracer``)."""
    opaque: frozenset[type] = frozenset()
    try:
        while True:
            tracer = Tracer(example_inputs, opaque)
            try:
                graph = tracer.trace(model)
            except _TraceInsideFailed as failed:
                if failed.kind in opaque:
                    raise failed.__cause__ or failed from None
                opaque = opaque | {failed.kind}
                continue
            return fx.GraphModule(tracer.root, graph, type(model).__name__)
    except Exception as exc:  # fx raises many types for untraceable code
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelNotTraceableError(
            f"model {type(model).__name__} cannot be traced into a graph ({first}); "
            "remove data-dependent control flow from its forward"
        ) from None


class NormActRemainder(nn.Module):
    """What is left of a norm+activation module (timm's BatchNormAct2d: batch norm, then ``drop``, then ``act``)
    once its batch norm is folded into the conv before it."""

    def __init__(self, drop: nn.Module, act: nn.Module):
        super().__init__()
        self.drop = drop
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(x))


@torch.no_grad()
def _foldable_norm(bn: nn.Module | None) -> bool:
    """A BatchNorm2d, or a subclass that computes ``act(drop(batch_norm(x)))`` (a norm+activation module such as
    timm's BatchNormAct2d): checked on a probe input, since a subclass may compute anything."""
    if type(bn) is nn.BatchNorm2d:
        return True
    act, drop = getattr(bn, "act", None), getattr(bn, "drop", None) or nn.Identity()
    if not isinstance(bn, nn.BatchNorm2d) or not isinstance(act, nn.Module) or not isinstance(drop, nn.Module):
        return False
    was = bn.training
    bn.eval()
    try:
        x = torch.randn(2, bn.num_features, 3, 3, generator=torch.Generator().manual_seed(0))
        plain = torch.nn.functional.batch_norm(
            x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps
        )
        return bool(torch.equal(bn(x), act(drop(plain))))
    except Exception:
        return False
    finally:
        bn.train(was)


def _remainder(bn: nn.Module) -> nn.Module:
    if type(bn) is nn.BatchNorm2d:
        return nn.Identity()
    return NormActRemainder(getattr(bn, "drop", None) or nn.Identity(), bn.get_submodule("act"))


def conv_bn_pairs(
    model: nn.Module, gm: fx.GraphModule | None = None, example_inputs: torch.Tensor | None = None
) -> list[tuple[str, str]]:
    """(conv name, bn name) for every BatchNorm2d (or norm+activation) whose only input is a Conv2d read by
    nothing else."""
    gm = gm or trace(model, example_inputs)
    mods = dict(model.named_modules())
    pairs: list[tuple[str, str]] = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not _foldable_norm(mods.get(node.target)):
            continue
        src = node.args[0]
        if (
            isinstance(src, fx.Node)
            and src.op == "call_module"
            and isinstance(mods.get(src.target), nn.Conv2d)
            and len(src.users) == 1
        ):
            pairs.append((str(src.target), str(node.target)))
    return pairs


@torch.no_grad()
def fold_bn_into_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Rewrite ``conv`` in place so conv(x) equals bn(conv(x)) in eval mode (per-channel factors in float64)."""
    assert bn.running_mean is not None and bn.running_var is not None  # eval-mode statistics are what is folded
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


# Methods by which re-parameterisable multi-branch blocks fold themselves into one conv for inference: timm's
# RepVGG / MobileOne / FastViT blocks (``reparameterize``), the RepVGG and MobileOne reference code
# (``switch_to_deploy``).
REPARAMETERIZE_METHODS = ("reparameterize", "switch_to_deploy")


def _takes_no_arguments(fn) -> bool:

    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return all(p.default is not inspect.Parameter.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params)


@torch.no_grad()
def reparameterize(model: nn.Module) -> int:
    """Fold every re-parameterisable multi-branch block of ``model`` (in place, eval mode) into its single
    inference conv, by the block's own method; returns how many blocks were folded. Exactness is checked where
    it matters: the prune and the export compare outputs with the unfolded model."""
    folded = 0
    for m in list(model.modules()):
        if m is model:
            continue
        for method in REPARAMETERIZE_METHODS:
            fn = getattr(m, method, None)
            if callable(fn) and _takes_no_arguments(fn):  # a VAE's reparameterize(mu, logvar) is not one
                fn()
                folded += 1
                break
    if folded:
        if has_record(model):  # a checkpoint rebuilds it folded
            set_record(model, dataclasses.replace(record_of(model), reparameterized=True))
    return folded


def fuse_conv_bn(model: nn.Module, inplace: bool = False, example_inputs: torch.Tensor | None = None) -> nn.Module:
    """Return ``model`` in eval mode with each Conv2d->BatchNorm2d pair folded and the BN replaced by Identity.

    BatchNorms not directly after a conv are left in place. The input model is untouched unless ``inplace``.
    ``example_inputs`` lets the trace decide branches on the input's shape (see ``Tracer``).
    """
    if not inplace:
        model = copy.deepcopy(model)
    model.eval()
    reparameterize(model)
    if not any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
        return model  # nothing to fuse: no need to trace
    for conv_name, bn_name in conv_bn_pairs(model, example_inputs=example_inputs):
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        assert isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)  # as conv_bn_pairs chose them
        fold_bn_into_conv(conv, bn)
        model.set_submodule(bn_name, _remainder(model.get_submodule(bn_name)))
    return model
