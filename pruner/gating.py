"""Self-supervised channel gating: a decision head per conv-BN-ReLU block predicts, from the block's input, which of
its filters will carry most of its activation mass for this input; the rest are skipped (masked to zero).

"Neural Networks Model Compression" (Elkerdawy), ch. 6 ("Fire Together Wire Together", FTWT): the head is global
max pooling, a softmax over channels and a 1x1 convolution (sec. 6.2.4); its target is the fewest filters whose
share of the block's max responses reaches a ratio r (Algorithm 1, sec. 6.2.3), learned with binary cross-entropy
either decoupled from the task loss (no gradient between heads and backbone) or jointly (straight-through); the
FLOPs an r saves are estimated before training from the targets on the frozen model (sec. 6.3.3).

The head's input is standardised per channel by running statistics by default, not softmaxed: on a trained CIFAR-10
VGG-16 a linear head on the standardised pooled input predicts the targets of 88-97% of (input, filter) pairs per
block against 82-88% after a softmax (the best per-filter constant: 70-85%), and it trains by SGD at the thesis's
head learning rate, where behind a softmax (inputs of about 1/C) the heads learned only each filter's keep rate,
the same mask for every input. ``head_input="softmax"`` is the thesis's head (its sec. 6.4 credits the softmax
with robustness to blur and noise).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from edgeshift.core.errors import EdgeshiftError

from .fuse import trace
from .models.record import has_record, record_of, set_record

MODES = ("decoupled", "joint")
HEAD_INPUTS = ("standardised", "softmax")
HEAD_LR_SCALE = 10.0  # the thesis trains the heads at 0.1 against the backbone's 1e-2 (sec. 6.3)
HEAD_START = 3.0  # every head's bias at the start: sigmoid(3) = 0.95, so a fresh gate keeps every filter

_RELU = (F.relu, torch.relu, torch.relu_, F.relu6)
# ops that act on each channel alone: a filter skipped before one is skipped after it (the MACs it saves downstream)
_CHANNELWISE_MODULES = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Dropout, nn.Identity)
_CHANNELWISE_FUNCTIONS = (F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.dropout)


class NoGatedBlocksError(EdgeshiftError):
    """The model has no conv-BN-ReLU block for a head to gate."""


def mass_targets(outputs: torch.Tensor, ratio: float) -> torch.Tensor:
    """Algorithm 1: per input, 1 for the fewest filters whose max absolute responses reach ``ratio`` of their sum
    (largest first), 0 for the rest; a filter with no response is never kept, so ratio 1 keeps exactly the live
    ones (sec. 6.2.3). ``outputs``: (N, C, H, W) -> (N, C) of 0.0 / 1.0."""
    acts = outputs.detach().abs().amax(dim=(2, 3))
    share = acts / acts.sum(dim=1, keepdim=True).clamp_min(torch.finfo(acts.dtype).tiny)
    ordered, order = share.sort(dim=1, descending=True)
    before = ordered.cumsum(dim=1) - ordered  # the mass of the larger filters: kept while it is short of r
    keep_sorted = (before < ratio - 1e-6) & (ordered > 0)
    return torch.zeros_like(share).scatter(1, order, keep_sorted.to(share.dtype))


class Standardise(nn.BatchNorm2d):
    """Per-channel standardisation by batch statistics in training and running ones in eval (a BatchNorm without
    affine parameters); a training batch of one input, which has no statistics, uses the running ones."""

    def __init__(self, channels: int):
        super().__init__(channels, affine=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and len(x) < 2:
            assert self.running_mean is not None and self.running_var is not None  # track_running_stats
            return F.batch_norm(x, self.running_mean, self.running_var, training=False, eps=self.eps)
        return super().forward(x)


class Gate(nn.Module):
    """One block's decision head and the mask it applies: ``forward(block_input, block_output)``.

    Training: the target of ``mass_targets`` is taken from the unmasked output and the head's binary cross-entropy
    against it kept in ``loss`` for the training loop; decoupled, the head sees a detached input and the mask is a
    constant to the backbone; joint, the mask passes gradients to the head straight through its sigmoid. Either way
    the backbone trains under the predicted mask, as at inference. Eval: the mask is ``logits > 0``; ``kept`` holds
    the filters each input kept."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        ratio: float,
        mode: str = "decoupled",
        head_input: str = "standardised",
    ):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
        if head_input not in HEAD_INPUTS:
            raise ValueError(f"head_input must be one of {', '.join(HEAD_INPUTS)}, not {head_input!r}")
        self.normalise: nn.Module = Standardise(in_channels) if head_input == "standardised" else nn.Softmax(dim=1)
        self.head = nn.Conv2d(in_channels, out_channels, 1)
        if head_input == "standardised":  # unit-scale inputs: any random weight could outweigh the start bias
            nn.init.zeros_(self.head.weight)
        else:
            nn.init.normal_(self.head.weight, std=0.01)
        nn.init.constant_(cast(torch.Tensor, self.head.bias), HEAD_START)
        self.ratio, self.mode, self.head_input = ratio, mode, head_input
        self.loss: torch.Tensor | None = None
        self.agreement: torch.Tensor | None = None  # share of (input, filter) decisions equal to the target
        self.kept: torch.Tensor | None = None
        self.forced = False  # the estimate of sec. 6.3.3: the target itself is the mask (what ideal heads predict)
        self.fixed: torch.Tensor | None = None  # (N, C) masks set from outside (routed signatures): no head, no loss

    def logits(self, block_input: torch.Tensor) -> torch.Tensor:
        pooled = block_input.amax(dim=(2, 3), keepdim=True)  # global max pooling
        return self.head(self.normalise(pooled)).flatten(1)

    def forward(self, block_input: torch.Tensor, block_output: torch.Tensor) -> torch.Tensor:
        if self.fixed is not None:
            self.kept = self.fixed.sum(dim=1)
            return block_output * self.fixed.to(block_output.dtype)[:, :, None, None]
        if self.forced:
            mask = mass_targets(block_output, self.ratio)
            self.kept = mask.sum(dim=1)
            return block_output * mask[:, :, None, None]
        decoupled = self.mode == "decoupled"
        logits = self.logits(block_input.detach() if decoupled and self.training else block_input)
        hard = (logits > 0).to(block_output.dtype)
        if self.training:
            target = mass_targets(block_output, self.ratio)
            # eq. 6.2: summed over the filters (and, in ``loss()``, the blocks); averaged over the batch
            self.loss = F.binary_cross_entropy_with_logits(logits, target, reduction="sum") / len(logits)
            self.agreement = (hard == target).float().mean().detach()
            if decoupled:
                mask = hard.detach()
            else:  # straight through: the forward uses the binary mask, the backward the sigmoid's gradient
                soft = torch.sigmoid(logits)
                mask = hard.detach() + soft - soft.detach()
        else:
            mask = hard
        self.kept = hard.detach().sum(dim=1)
        return block_output * mask[:, :, None, None]


@dataclass(frozen=True)
class Block:
    """A conv-BN-ReLU block of the traced model: the convolution's module path and its channels."""

    conv: str
    in_channels: int
    out_channels: int


def _single_user(node: fx.Node) -> bool:
    return len(node.users) == 1


def _is_relu(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules.get(str(node.target)), (nn.ReLU, nn.ReLU6))
    if node.op == "call_function":
        return node.target in _RELU
    return node.op == "call_method" and node.target in ("relu", "relu_")


def block_nodes(graph: fx.GraphModule) -> list[tuple[Block, fx.Node, fx.Node]]:
    """(block, the conv's input node, the ReLU node) for every conv -> BatchNorm2d -> ReLU chain whose conv and
    norm feed nothing else."""
    modules = dict(graph.named_modules())
    found = []
    for node in graph.graph.nodes:
        if not _is_relu(node, modules) or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        norm = node.args[0]
        if norm.op != "call_module" or type(modules.get(str(norm.target))) is not nn.BatchNorm2d:
            continue
        conv = norm.args[0] if norm.args else None
        if not isinstance(conv, fx.Node) or conv.op != "call_module" or not _single_user(norm):
            continue
        layer = modules.get(str(conv.target))
        if type(layer) is not nn.Conv2d or not _single_user(conv) or not isinstance(conv.args[0], fx.Node):
            continue
        found.append((Block(str(conv.target), layer.in_channels, layer.out_channels), conv.args[0], node))
    return found


def _other_than(node: fx.Node) -> Callable[[fx.Node], bool]:
    return lambda user: user is not node


def find_blocks(model: nn.Module, example: torch.Tensor) -> list[Block]:
    """The model's conv-BN-ReLU blocks, in graph order; refused in one line when it has none."""
    blocks = [b for b, _, _ in block_nodes(trace(model, example))]
    if not blocks:
        raise NoGatedBlocksError(
            f"{type(model).__name__} has no conv-BN-ReLU block (a Conv2d feeding only a BatchNorm2d feeding only a "
            "ReLU or ReLU6) for a decision head to gate; gating needs a CNN built of such blocks (VGG, ResNet, "
            "MobileNet)"
        )
    return blocks


class GatedNetwork(nn.Module):
    """``model`` with a ``Gate`` after every conv-BN-ReLU block; the model's own modules are shared, not copied.

    It is the training loop's regulariser too: ``loss()`` is the sum over gates of their binary cross-entropy."""

    backbone: nn.Module

    def __init__(
        self,
        model: nn.Module,
        example: torch.Tensor,
        ratio: float,
        mode: str = "decoupled",
        head_input: str = "standardised",
        head_lr_scale: float = HEAD_LR_SCALE,
    ):
        super().__init__()
        # the backbone as the caller holds it (to save it), not a submodule: the graph below holds its layers in
        # containers of its own, and a fuser or pruner must meet each layer once, by one path
        object.__setattr__(self, "backbone", model)
        graph = trace(model, example)
        found = block_nodes(graph)
        if not found:
            find_blocks(model, example)  # raises, naming what a block is
        self.blocks = [b for b, _, _ in found]
        masked: dict[fx.Node, fx.Node] = {}  # a block's ReLU -> its gate: what every later reader sees
        for i, (block, block_input, relu) in enumerate(found):
            name = f"gate_{i}"
            graph.add_submodule(name, Gate(block.in_channels, block.out_channels, ratio, mode, head_input))
            with graph.graph.inserting_after(relu):
                # the head reads the block's input as the conv does: masked by the gate before, if it is one's
                gated = graph.graph.call_module(name, (masked.get(block_input, block_input), relu))
            relu.replace_all_uses_with(gated, delete_user_cb=_other_than(gated))
            masked[relu] = gated
        graph.graph.lint()
        graph.recompile()
        self.net = graph
        self.ratio, self.mode, self.head_input, self.head_lr_scale = ratio, mode, head_input, head_lr_scale
        if has_record(model):  # the model source's record (input size, classes, normalisation) stands for both
            set_record(self, record_of(model))
        self._macs = _gate_costs(graph, example, self.blocks)
        self.dense_macs = sum(macs for macs, _, _ in self._macs.values())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def gate_list(self) -> list[Gate]:
        return [cast(Gate, self.net.get_submodule(f"gate_{i}")) for i in range(len(self.blocks))]

    def parameter_groups(self) -> list[dict]:
        """The backbone's parameters, and the heads' at ``head_lr_scale`` times its learning rate (the trainer's
        ``lr_scale``)."""
        heads = [p for g in self.gate_list() for p in g.parameters()]
        own = {id(p) for p in heads}
        return [
            {"params": [p for p in self.parameters() if id(p) not in own]},
            {"params": heads, "lr_scale": self.head_lr_scale},
        ]

    # the training loop's regulariser protocol
    def loss(self, labels: torch.Tensor | None = None) -> torch.Tensor:
        losses = [g.loss for g in self.gate_list() if g.loss is not None]
        return torch.stack(losses).sum() if losses else torch.zeros(())

    def after_step(self) -> None:
        for g in self.gate_list():
            g.loss = None

    def log(self) -> dict:
        agreements = [float(g.agreement) for g in self.gate_list() if g.agreement is not None]
        return {"gate_agreement": sum(agreements) / len(agreements)} if agreements else {}

    @torch.no_grad()
    def macs_per_input(self, x: torch.Tensor) -> torch.Tensor:
        """The multiply-accumulates each input of ``x`` costs with its masks: a layer's dense MACs scaled by the
        share of its output filters its own gate kept and of its input channels the gate before it kept (across
        pooling, which acts per channel), plus the heads'. (N,) float64."""
        was = self.training
        self.eval()
        try:
            self(x)
        finally:
            self.train(was)
        kept = {b.conv: g.kept.double() / b.out_channels for b, g in zip(self.blocks, self.gate_list())}  # type: ignore[union-attr]
        total = torch.zeros(len(x), dtype=torch.float64)
        for layer, (macs, own, before) in self._macs.items():
            share = torch.ones(len(x), dtype=torch.float64)
            if own is not None:
                share = share * kept[own]
            if before is not None:
                share = share * kept[before]
            total += macs * share
        return total + sum(b.in_channels * b.out_channels for b in self.blocks)

    def state_of_heads(self) -> dict[str, dict[str, torch.Tensor]]:
        """Each gate's head and input statistics by its block's conv: ``head.weight``, ``head.bias`` and, for a
        standardised input, ``normalise.running_mean`` and the like."""
        return {
            b.conv: {k: v.detach().clone() for k, v in g.state_dict().items()}
            for b, g in zip(self.blocks, self.gate_list())
        }

    def load_heads(self, heads: dict[str, dict[str, torch.Tensor]]) -> None:
        names = [b.conv for b in self.blocks]
        if sorted(heads) != sorted(names):
            raise EdgeshiftError(
                f"the checkpoint's heads gate blocks {sorted(heads)}, the model has {sorted(names)}: not this model's"
            )
        for b, g in zip(self.blocks, self.gate_list()):
            state = heads[b.conv]
            if not any(k.startswith("head.") for k in state):  # written before the heads' input was a choice
                state = {f"head.{k}": v for k, v in state.items()}
            g.load_state_dict(state)


def _producer_gate(node: fx.Node, modules: dict[str, nn.Module], gated: dict[fx.Node, str]) -> str | None:
    """The block whose gate wrote ``node`` (through per-channel ops only), or None."""
    while True:
        if node in gated:
            return gated[node]
        passes = (
            (node.op == "call_module" and isinstance(modules.get(str(node.target)), _CHANNELWISE_MODULES))
            or (node.op == "call_function" and node.target in (*_CHANNELWISE_FUNCTIONS, torch.flatten, *_RELU))
            or (node.op == "call_method" and node.target in ("flatten", "relu", "view", "reshape"))
        )
        if not passes or not node.args or not isinstance(node.args[0], fx.Node):
            return None
        if node.target in ("view", "reshape", torch.flatten, "flatten") and not _flattens_channels(node):
            return None
        node = node.args[0]


def _flattens_channels(node: fx.Node) -> bool:
    shape = _shape(node.args[0]) if isinstance(node.args[0], fx.Node) else None
    return shape is not None and len(shape) == 4 and shape[2] * shape[3] == 1


def _gate_costs(
    graph: fx.GraphModule, example: torch.Tensor, blocks: list[Block]
) -> dict[str, tuple[int, str | None, str | None]]:
    """Per Conv2d / Linear node: (its dense MACs for one input, the block whose gate masks its output, the block
    whose gate masks its input)."""
    modules = dict(graph.named_modules())
    _record_shapes(graph, example[:1])
    gated = {n: blocks[int(str(n.target).split("_")[1])].conv for n in graph.graph.nodes if _is_gate(n)}
    costs: dict[str, tuple[int, str | None, str | None]] = {}
    own_of = {b.conv for b in blocks}
    for node in graph.graph.nodes:
        layer = modules.get(str(node.target)) if node.op == "call_module" else None
        if not isinstance(layer, (nn.Conv2d, nn.Linear)):
            continue
        out = _shape(node)
        assert out is not None  # every layer ran in the propagation
        if isinstance(layer, nn.Conv2d):
            kh, kw = layer.kernel_size
            macs = math.prod(out[1:]) * (layer.in_channels // layer.groups) * kh * kw
        else:
            macs = math.prod(out[1:]) * layer.in_features
        before = _producer_gate(node.args[0], modules, gated) if isinstance(node.args[0], fx.Node) else None
        grouped = isinstance(layer, nn.Conv2d) and 1 < layer.groups != layer.in_channels
        if grouped:
            before = None  # a grouped (not depthwise) conv: its input channels are not one per filter
        name = str(node.target)
        costs[name] = (macs, name if name in own_of else None, before)
    return costs


def _is_gate(node: fx.Node) -> bool:
    return node.op == "call_module" and str(node.target).startswith("gate_")


@torch.no_grad()
def _record_shapes(graph: fx.GraphModule, example: torch.Tensor) -> None:
    """Each node's output shape into ``node.meta["tensor_meta"]`` (one eval-mode forward: batch norms keep their
    statistics)."""
    was = graph.training
    graph.eval()
    try:
        ShapeProp(graph).propagate(example)
    finally:
        graph.train(was)


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


@torch.no_grad()
def estimated_reduction(
    gated: GatedNetwork, images: torch.Tensor, ratios: list[float], batch: int = 256
) -> dict[float, float]:
    """Sec. 6.3.3's one-shot estimate: per ratio, the share of the dense MACs saved on ``images`` when every block's
    mask is its own target (what ideally trained heads would predict), on the model as it is; no training."""
    gates = gated.gate_list()
    saved = {}
    original = [g.ratio for g in gates]
    try:
        for g in gates:
            g.forced = True
        for ratio in ratios:
            for g in gates:
                g.ratio = ratio
            macs = torch.cat([gated.macs_per_input(images[i : i + batch]) for i in range(0, len(images), batch)])
            heads = sum(b.in_channels * b.out_channels for b in gated.blocks)
            saved[ratio] = 1.0 - float((macs - heads).mean()) / gated.dense_macs
    finally:
        for g, r in zip(gates, original):
            g.forced, g.ratio = False, r
    return saved


RATIO_GRID = tuple(round(1.0 - i / 100, 2) for i in range(0, 41))  # 1.00, 0.99 .. 0.60


def ratio_for(
    saved_at: Callable[[float], float], flops_reduction: float, grid: tuple[float, ...] = RATIO_GRID
) -> tuple[float, dict[float, float]]:
    """The largest ratio of ``grid`` (the most of each block's mass kept) whose estimate ``saved_at(ratio)`` saves
    at least ``flops_reduction``, found by bisection (the saving grows as the ratio falls: a smaller share of
    every block's mass needs no more filters); with the estimates made. Refused in one line, naming the most the
    smallest ratio saves, when none does."""
    ratios = sorted(grid, reverse=True)
    estimates: dict[float, float] = {}

    def saved(i: int) -> float:
        if ratios[i] not in estimates:
            estimates[ratios[i]] = saved_at(ratios[i])
        return estimates[ratios[i]]

    if saved(len(ratios) - 1) < flops_reduction:
        raise EdgeshiftError(
            f"no mass ratio down to {ratios[-1]:g} saves {flops_reduction:.0%} of the MACs by the one-shot estimate "
            f"(at most {estimates[ratios[-1]]:.1%}, at ratio {ratios[-1]:g}); ask for a smaller reduction"
        )
    low, high = 0, len(ratios) - 1  # the first index meeting the target lies in [low, high]
    while low < high:
        middle = (low + high) // 2
        if saved(middle) >= flops_reduction:
            high = middle
        else:
            low = middle + 1
    return ratios[low], estimates


def gated_network(model: nn.Module, gate: object, example: torch.Tensor, where: str) -> GatedNetwork:
    """The ``GatedNetwork`` a checkpoint's ``meta["gate"]`` describes, its trained heads loaded; a malformed entry
    is refused in one line naming ``where``."""
    if not isinstance(gate, dict):
        raise EdgeshiftError(f"{where}: its gate entry is not a table; write it with `edgeshift gate`")
    ratio, mode, heads = gate.get("ratio"), gate.get("mode"), gate.get("heads")
    head_input = gate.get("head_input", "softmax")  # the only head before it was a choice
    if (
        not isinstance(ratio, float)
        or not 0 < ratio <= 1
        or mode not in MODES
        or head_input not in HEAD_INPUTS
        or not isinstance(heads, dict)
    ):
        raise EdgeshiftError(
            f"{where}: its gate entry needs ratio in (0, 1], mode one of {', '.join(MODES)}, head_input one of "
            f"{', '.join(HEAD_INPUTS)} and the heads' tensors"
        )
    gated = GatedNetwork(model, example, ratio, str(mode), str(head_input))
    try:
        gated.load_heads(heads)
    except (RuntimeError, AttributeError, TypeError) as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise EdgeshiftError(f"{where}: its heads do not fit the model's blocks ({first[:160]})") from None
    return gated.eval()
