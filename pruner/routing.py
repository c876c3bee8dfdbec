"""Channel gating made static for ONNX Runtime: the decision heads' per-input masks clustered into K signatures,
each a plain network of its own widths, and a router that picks one per input.

"Neural Networks Model Compression" (Elkerdawy), sec. 6.3.4 and Table 6.7: on a CPU at batch 1, masks applied by
slicing dense weights per input turned 52% fewer FLOPs into only 27% less latency, since the runtime computes on
weights it cannot prepare ahead. Here the slicing happens once, before any session exists:

1. the gated network's masks on training images are clustered (k-means over the concatenated masks) into K
   groups; a group's signature keeps, per block, the filters its heads keep for at least ``vote`` of its inputs;
2. a router (the network up to the first gated block, global max pooling, one linear layer: the heads' own shape)
   learns an input's group from that block's output, so the choice costs the first block alone;
3. the backbone is fine-tuned under the routed masks (a network trained under per-input masks loses most of its
   accuracy on any fixed set of filters), the router's part frozen so that its routes stay what it learned;
4. each signature is the backbone with the BatchNorms of the filters it skips zeroed, then pruned exactly: zeroing
   a block's BN and masking its output after the ReLU are the same function, and the exact pruner removes what
   can no longer change the output.

The exporter writes the router and the signatures as one ONNX graph whose ``If`` branches run, per input, the one
signature chosen (``edgeshift.exporter.routing``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from edgeshift.core.errors import EdgeshiftError

from .fuse import trace
from .gating import Block, Gate, GatedNetwork, block_nodes
from .models.record import has_record, record_of, set_record
from .structured import PruneReport, prune_zero_channels

MAX_SIGNATURES = 16
BATCH = 256
ROUTER_STEPS = 300  # Adam steps of the router's linear layer on the pooled features (seconds on 10,000 images)


@torch.no_grad()
def head_masks(gated: GatedNetwork, x: torch.Tensor, batch: int = BATCH) -> np.ndarray:
    """(N, filters of every block) bool: each input's masks as its heads decide them (eval mode)."""
    was = gated.training
    gated.eval()
    seen: list[list[torch.Tensor]] = [[] for _ in gated.blocks]
    hooks = [
        g.register_forward_hook(lambda m, args, out, i=i: seen[i].append(cast(Gate, m).logits(args[0]) > 0))
        for i, g in enumerate(gated.gate_list())
    ]
    try:
        for i in range(0, len(x), batch):
            gated(x[i : i + batch])
    finally:
        for h in hooks:
            h.remove()
        gated.train(was)
    return torch.cat([torch.cat(s) for s in seen], dim=1).numpy()


def kmeans(points: np.ndarray, k: int, iterations: int = 30, seed: int = 0) -> np.ndarray:
    """Group labels of ``points`` (k-means++ start, Lloyd's iterations); an emptied group keeps its centre."""
    rng = np.random.default_rng(seed)
    centres = [points[rng.integers(len(points))]]
    for _ in range(k - 1):
        d = np.min([((points - c) ** 2).sum(1) for c in centres], axis=0)
        total = d.sum()
        centres.append(points[rng.choice(len(points), p=d / total)] if total > 0 else points[rng.integers(len(points))])
    c = np.stack(centres)
    labels = np.zeros(len(points), np.int64)
    for _ in range(iterations):
        d = (points**2).sum(1)[:, None] - 2 * points @ c.T + (c**2).sum(1)[None]
        labels = d.argmin(1)
        c = np.stack([points[labels == j].mean(0) if (labels == j).any() else c[j] for j in range(k)])
    return labels


@dataclass(frozen=True)
class Signatures:
    """K sets of filters per block, and the group of each input they were voted from."""

    keep: list[list[list[int]]]  # [signature][block] -> the filter indices kept, ascending, never empty
    groups: np.ndarray  # (N,) int64: each clustered input's group


def signatures_of(masks: np.ndarray, sizes: Sequence[int], k: int, vote: float, seed: int = 0) -> Signatures:
    """Cluster ``masks`` (N, sum(sizes)) into ``k`` groups; per group and block, the filters kept by at least
    ``vote`` of the group's inputs (at least the most kept one, so that no block is cut through)."""
    if not 2 <= k <= MAX_SIGNATURES:
        raise EdgeshiftError(f"signatures must be 2..{MAX_SIGNATURES} (0: no routing), got {k}")
    if not 0 < vote <= 1:
        raise EdgeshiftError(f"the signatures' vote must be in (0, 1], got {vote:g}")
    if len(masks) < k:
        raise EdgeshiftError(f"{len(masks)} images cannot be clustered into {k} signatures; give more")
    groups = kmeans(masks.astype(np.float32), k, seed=seed)
    edges = np.cumsum([0, *sizes])
    keep = []
    for j in range(k):
        share = masks[groups == j].mean(0) if (groups == j).any() else masks.mean(0)
        per_block = []
        for b in range(len(sizes)):
            s = share[edges[b] : edges[b + 1]]
            kept = np.flatnonzero(s >= vote - 1e-9)
            per_block.append([int(i) for i in (kept if len(kept) else [int(s.argmax())])])
        keep.append(per_block)
    return Signatures(keep, groups)


def router_prefix(model: nn.Module, example: torch.Tensor, block: str) -> fx.GraphModule:
    """``model`` up to the ReLU of its conv-BN-ReLU block ``block`` (whose conv has that path), as a graph sharing
    ``model``'s modules."""
    graph = trace(model, example)
    relus = [relu for b, _, relu in block_nodes(graph) if b.conv == block]
    if not relus:
        raise EdgeshiftError(f"the model has no conv-BN-ReLU block {block!r} for the router to read")
    out = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in graph.graph.nodes:
        env[node] = out.node_copy(node, lambda n: env[n])
        if node is relus[0]:
            break
    out.output(env[relus[0]])
    prefix = fx.GraphModule(graph, out)
    prefix.graph.eliminate_dead_code()
    prefix.recompile()
    return prefix


class Router(nn.Module):
    """The logits of the K signatures for an input: the model's first gated block, global max pooling (what the
    heads read), one linear layer."""

    def __init__(self, prefix: nn.Module, linear: nn.Linear):
        super().__init__()
        self.prefix, self.linear = prefix, linear

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.prefix(x).amax(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.features(x))


@torch.no_grad()
def _features(router: Router, x: torch.Tensor) -> torch.Tensor:
    router.eval()
    return torch.cat([router.features(x[i : i + BATCH]) for i in range(0, len(x), BATCH)])


def fit_router(router: Router, x: torch.Tensor, groups: np.ndarray, steps: int = ROUTER_STEPS) -> float:
    """Train ``router.linear`` to predict ``groups`` from ``x``'s pooled features (standardised, Adam, cross-entropy;
    the standardisation then folded into the layer); its agreement with the groups on ``x``."""
    feats = _features(router, x)
    mean, std = feats.mean(0), feats.std(0) + 1e-6
    z = (feats - mean) / std
    target = torch.from_numpy(groups)
    linear = nn.Linear(feats.shape[1], router.linear.out_features)
    opt = torch.optim.Adam(linear.parameters(), lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(linear(z), target).backward()
        opt.step()
    with torch.no_grad():
        router.linear.weight.copy_(linear.weight / std)
        cast(torch.Tensor, router.linear.bias).copy_(linear.bias - (linear.weight / std) @ mean)
        return float((router.linear(feats).argmax(1) == target).float().mean())


def _masks_by_block(keep: list[list[list[int]]], blocks: Sequence[Block]) -> list[torch.Tensor]:
    """Per block, a (K, filters) 0/1 tensor: signature k's mask of that block."""
    masks = [torch.zeros(len(keep), b.out_channels) for b in blocks]
    for k, per_block in enumerate(keep):
        for b, rows in enumerate(per_block):
            masks[b][k, rows] = 1.0
    return masks


class RoutedTraining(nn.Module):
    """The gated network trained under its routed signatures: each input's masks are those of the signature its
    router chooses. The router (and the part of the backbone it reads, in eval mode) and the heads stay frozen."""

    def __init__(self, gated: GatedNetwork, router: Router, keep: list[list[list[int]]]):
        super().__init__()
        self.gated, self.router = gated, router
        self.masks = _masks_by_block(keep, gated.blocks)
        frozen = {id(p) for p in router.parameters()} | {id(p) for g in gated.gate_list() for p in g.parameters()}
        self._trained = [p for p in gated.parameters() if id(p) not in frozen]
        if has_record(gated):
            set_record(self, record_of(gated))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            route = self.router(x).argmax(1)
        for gate, mask in zip(self.gated.gate_list(), self.masks):
            gate.fixed = mask[route]
        try:
            return self.gated(x)
        finally:
            for gate in self.gated.gate_list():
                gate.fixed = None

    def train(self, mode: bool = True) -> RoutedTraining:
        super().train(mode)
        self.router.eval()  # its BatchNorms keep the statistics its routes were learned on
        return self

    def parameter_groups(self) -> list[dict]:
        return [{"params": self._trained}]


def signature_network(
    backbone: nn.Module, example: torch.Tensor, blocks: Sequence[Block], keep: list[list[int]]
) -> tuple[nn.Module, PruneReport]:
    """``backbone`` keeping, per block, the filters of ``keep``: the others' BatchNorm scale and shift zeroed (what
    the mask after the ReLU does), then pruned exactly; with the prune's report (its max deviation from the zeroed
    model, measured)."""
    zeroed = copy.deepcopy(backbone).eval()
    modules = dict(zeroed.named_modules())
    graph = trace(zeroed, example)
    norms = {b.conv: str(relu.args[0].target) for b, _, relu in block_nodes(graph) if isinstance(relu.args[0], fx.Node)}
    with torch.no_grad():
        for block, rows in zip(blocks, keep):
            norm = cast(nn.BatchNorm2d, modules[norms[block.conv]])
            drop = torch.ones(block.out_channels, dtype=torch.bool)
            drop[rows] = False
            norm.weight[drop] = 0.0
            norm.bias[drop] = 0.0
    pruned, report = prune_zero_channels(zeroed, example)
    return pruned.eval(), report


class RoutedNetwork(nn.Module):
    """Per input, the router's choice of signature, and that signature's logits."""

    def __init__(
        self,
        router: Router,
        signatures: Sequence[nn.Module],
        shares: Sequence[float] = (),
        prune_report: PruneReport | None = None,
    ):
        super().__init__()
        self.router, self.signatures = router, nn.ModuleList(signatures)
        self.shares = tuple(float(s) for s in shares)  # of the test images routed to each (for the mean MACs)
        self.prune_report = prune_report  # the signatures' exact prune that deviated the most

    def routes(self, x: torch.Tensor) -> torch.Tensor:
        return self.router(x).argmax(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        route = self.routes(x)
        out: torch.Tensor | None = None
        for k, net in enumerate(self.signatures):
            chosen = (route == k).nonzero().flatten()
            if len(chosen):
                logits = net(x[chosen])
                if out is None:
                    out = logits.new_zeros((len(x), logits.shape[1]))
                out[chosen] = logits
        assert out is not None, "an empty batch"
        return out


def _index_lists(value: object, size: int) -> list[int] | None:
    if not isinstance(value, list) or not value or len(value) > size:
        return None
    if not all(isinstance(i, int) and 0 <= i < size for i in value) or value != sorted(set(value)):
        return None
    return value


def routed_network(model: nn.Module, routing: object, example: torch.Tensor, where: str) -> RoutedNetwork:
    """The ``RoutedNetwork`` a checkpoint's ``meta["routing"]`` describes over ``model`` (the fine-tuned backbone);
    a malformed entry is refused in one line naming ``where``."""
    fix = "write it with `edgeshift gate --signatures K`"
    if not isinstance(routing, dict):
        raise EdgeshiftError(f"{where}: its routing entry is not a table; {fix}")
    blocks = {b.conv: b for b, _, _ in block_nodes(trace(model, example))}
    names, keep, weight, bias = (routing.get(k) for k in ("blocks", "signatures", "router_weight", "router_bias"))
    if (
        not isinstance(names, list)
        or not names
        or not all(isinstance(n, str) and n in blocks for n in names)
        or not isinstance(keep, list)
        or not 2 <= len(keep) <= MAX_SIGNATURES
    ):
        raise EdgeshiftError(
            f"{where}: its routing entry needs the gated blocks of this model and 2..{MAX_SIGNATURES} signatures; {fix}"
        )
    chosen = [blocks[n] for n in names]
    lists = [
        [_index_lists(rows, b.out_channels) for rows, b in zip(per, chosen)] if isinstance(per, list) else [None]
        for per in keep
    ]
    if any(len(per) != len(chosen) or any(rows is None for rows in per) for per in lists):
        raise EdgeshiftError(
            f"{where}: each routing signature needs, per gated block, ascending filter indices of that block; {fix}"
        )
    first = chosen[0]
    if (
        not isinstance(weight, torch.Tensor)
        or not isinstance(bias, torch.Tensor)
        or tuple(weight.shape) != (len(keep), first.out_channels)
        or tuple(bias.shape) != (len(keep),)
        or not bool(torch.isfinite(weight).all() and torch.isfinite(bias).all())
    ):
        raise EdgeshiftError(
            f"{where}: its router needs a finite ({len(keep)}, {first.out_channels}) weight and {len(keep)} biases; "
            f"{fix}"
        )
    shares = routing.get("shares", [])  # of the test images routed to each; absent: the MACs weigh them evenly
    if not isinstance(shares, list) or (
        shares
        and (
            len(shares) != len(keep)
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in shares)
            or not all(math.isfinite(v) and 0 <= v <= 1 for v in shares)
        )
    ):
        raise EdgeshiftError(f"{where}: its routing shares must be {len(keep)} fractions in [0, 1], one per signature")
    linear = nn.Linear(first.out_channels, len(keep))
    with torch.no_grad():
        linear.weight.copy_(weight)
        cast(torch.Tensor, linear.bias).copy_(bias)
    model = model.eval()
    router = Router(router_prefix(model, example, first.conv), linear).eval()
    made = [signature_network(model, example, chosen, cast(list[list[int]], per)) for per in lists]
    worst = max((report for _, report in made), key=lambda r: r.max_abs_diff)
    routed = RoutedNetwork(router, [net for net, _ in made], [float(s) for s in shares], worst)
    if has_record(model):
        set_record(routed, record_of(model))
    return routed.eval()
