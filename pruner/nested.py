"""Nested widths: one network whose every narrower width is a prefix of the wider one in every coupled channel group.

"Self-adaptive neural network for edge devices" (Rapa), sec. 4.2: channels are ranked by magnitude and removed in
steps, the history of what went kept (sec. 4.2.1); the smallest model is fine-tuned; each larger level is rebuilt
from the tuned narrower one plus the dropped channels' original weights (sec. 4.2.2), and only the re-added weights
are fine-tuned (sec. 4.2.3). Here the history is an order: every unblocked coupled group's channels are permuted so
the most important come first (``reorder_channels``, which leaves the function unchanged), so a width is the first
``ceil(fraction x size)`` channels of each group (``narrow``), and a narrower level's weights are the leading slices
of the wider level's. Groups the coupling analysis keeps whole (grouped convs, channel splits, outputs) keep every
channel at every width.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from edgeshift.core.errors import EdgeshiftError

from .learned_masks import GateConfig, LearnedMasks
from .structured.groups import _GroupSpec, coupled_groups

NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


def check_widths(widths: Sequence[float]) -> tuple[float, ...]:
    """Widths as fractions of the full model, each in (0, 1), strictly decreasing; refused in one line otherwise."""
    values = tuple(float(w) for w in widths)
    if not values:
        raise EdgeshiftError("give at least one width, a fraction of the full model in (0, 1), e.g. 0.75,0.5,0.25")
    bad = [w for w in values if not 0 < w < 1]
    if bad:
        raise EdgeshiftError(f"widths are fractions of the full model in (0, 1); got {bad[0]:g}")
    if any(b >= a for a, b in zip(values, values[1:])):
        raise EdgeshiftError(f"widths must decrease (each level narrower than the last), got {list(values)}")
    return values


def _nestable(model: nn.Module, example: torch.Tensor) -> list[_GroupSpec]:
    specs = [s for s in coupled_groups(model, example) if not s.blocked and s.size > 1]
    specs = [s for s in specs if any(it.role == "producer" for it in s.items)]
    if not specs:
        raise EdgeshiftError(
            "the model has no channel group that can be narrowed (every group is coupled to an operation that must "
            "keep its channels); nested widths need one"
        )
    return specs


def check_nestable(model: nn.Module, example: torch.Tensor) -> int:
    """How many of the model's channel groups nest; refused in one line when none does."""
    return len(_nestable(model, example))


def _importance(model: nn.Module, spec: _GroupSpec) -> np.ndarray:
    """Per root channel: the L1 norm of the weights producing it, over every layer writing the group."""
    mods = dict(model.named_modules())
    score = np.zeros(spec.size)
    for it in spec.items:
        if it.role == "producer":
            weight = mods[it.name].weight.detach()
            per_channel = weight.abs().reshape(weight.shape[0], -1).sum(1).double().numpy()
            np.add.at(score, it.roots, per_channel[it.idxs])
    return score


def _local_tensors(module: nn.Module, role: str) -> list[tuple[str, int]]:
    """The tensors an item's channel indices address (by attribute), with the dimension they index: a consumer's
    weight along its inputs; a producer's or a per-channel layer's weight, bias and statistics along channels."""
    if role == "consumer":
        return [("weight", 1)] if isinstance(module, (nn.Conv2d, nn.Linear)) else []
    names = ["weight", "bias"] + (["running_mean", "running_var"] if isinstance(module, NORMS) else [])
    return [(n, 0) for n in names if isinstance(getattr(module, n, None), torch.Tensor)]


def _tensors(module: nn.Module, role: str) -> list[tuple[torch.Tensor, int]]:
    return [(getattr(module, n), d) for n, d in _local_tensors(module, role)]


@dataclass(frozen=True)
class NestedGroup:
    """One coupled group as nested: its root layer, its size, and the importance of its channels in their new order
    (non-increasing)."""

    root: str
    size: int
    importance: tuple[float, ...]


def reorder_channels(
    model: nn.Module, example: torch.Tensor, scores: Mapping[frozenset[str], np.ndarray] | None = None
) -> list[NestedGroup]:
    """Permute, in place, every nestable group's channels so the most important come first; every layer reading or
    writing the group moves with it, so the model computes the same function. Importance: ``scores`` per group
    (keyed and indexed as ``learned_scores`` gives them, e.g. learned gate logits), ties and groups without one by
    the L1 norm of the weights writing the channel, then the earlier channel."""
    mods = dict(model.named_modules())
    nested = []
    for spec in _nestable(model, example):  # the coupling analysis traces with autograd: no no_grad around it
        l1 = _importance(model, spec)
        key, roots, channels = _canonical(spec)
        given = None if scores is None else scores.get(key)
        if given is not None and len(given) != spec.size:
            raise ValueError(f"{len(given)} scores for the {spec.size} channels of group {spec.root}")
        score = l1
        if given is not None:
            score = np.empty(spec.size)
            score[roots] = np.asarray(given, np.float64)[channels]
        order = np.lexsort((np.arange(spec.size), -l1, -score))
        rank = np.empty(spec.size, dtype=np.int64)
        rank[order] = np.arange(spec.size)
        done: set[tuple[int, int]] = set()
        for it in spec.items:
            positions, roots = np.asarray(it.idxs), np.asarray(it.roots)
            source = torch.as_tensor(positions[np.lexsort((positions, rank[roots]))])
            target = torch.as_tensor(np.sort(positions))
            for tensor, dim in _tensors(mods[it.name], it.role):
                if (id(tensor), dim) in done:  # a module listed twice (its in and out side): moved once
                    continue
                done.add((id(tensor), dim))
                with torch.no_grad():
                    tensor.index_copy_(dim, target, tensor.index_select(dim, source).clone())
        nested.append(NestedGroup(spec.root, spec.size, tuple(float(s) for s in score[order])))
    return nested


GroupKey = frozenset[str]  # a group by the layers writing it: the same however the coupling analysis reached it


def _canonical(spec: _GroupSpec) -> tuple[GroupKey, np.ndarray, np.ndarray]:
    """(key, roots, channels): the group by its producers, and how its roots map to the output channels of the
    first producer by name (root indices depend on where the analysis started; that producer's channels do not)."""
    producers = [it for it in spec.items if it.role == "producer"]
    first = min(producers, key=lambda it: it.name)
    return frozenset(it.name for it in producers), np.asarray(first.roots), np.asarray(first.idxs)


def learned_scores(
    model: nn.Module,
    example: torch.Tensor,
    fit: Callable[[nn.Module, LearnedMasks, int], None],
    target: float,
    steps: int,
) -> dict[GroupKey, np.ndarray]:
    """Per prunable group (by the layers writing it), each channel's gate logit after learning gates on a copy of
    ``model`` whose weights stay frozen (learned filter masks, "Neural Networks Model Compression", ch. 3: a channel's
    gate rises with its pull on the task loss and falls with its price): a ranking by what the trained network
    uses, where L1 ranks by weight size alone. ``fit(copy, masks, steps)`` runs the training loop with ``masks`` as
    its regulariser; ``model`` is not changed."""
    work = copy.deepcopy(model)
    masks = LearnedMasks(work, example, GateConfig(target=target, warm_start=False))  # traces with autograd: first
    for p in work.parameters():
        p.requires_grad_(False)
    masks.plan(steps)
    fit(work, masks, steps)
    masks.detach_hooks()
    out: dict[GroupKey, np.ndarray] = {}
    for spec, logits in zip(masks.group_specs, masks.logits):
        if any(it.role == "producer" for it in spec.items):
            key, roots, channels = _canonical(spec)
            by_channel = np.empty(spec.size)
            by_channel[channels] = logits.detach().double().numpy()[roots]
            out[key] = by_channel
    return out


def kept_channels(size: int, width: float) -> int:
    """The channels a group of ``size`` keeps at ``width``: at least one."""
    return max(1, math.ceil(width * size - 1e-9))


# per tensor name (a parameter or buffer of the full model), per dimension: the positions a level keeps, in the full
# model's coordinates (a dimension not listed is kept whole)
KeptIndex = dict[str, dict[int, np.ndarray]]


@dataclass
class Level:
    """One width of a nested network: the model at that width and where its tensors sit in the full model's."""

    width: float
    model: nn.Module
    kept: KeptIndex


def narrow(model: nn.Module, example: torch.Tensor, width: float) -> Level:
    """A copy of a reordered ``model`` keeping the first ``kept_channels(size, width)`` channels of every nestable
    group (structurally: the layers are rebuilt smaller), with where each tensor's entries came from; ``model`` is
    untouched. A layer reading one group keeps a leading slice; one reading a concatenation of groups keeps the
    leading slice of each group's segment."""
    small = copy.deepcopy(model)
    mods = dict(small.named_modules())
    kept: dict[str, dict[int, list[int]]] = {}
    # one call per layer and dimension with every group's positions, all in the layer's coordinates before any cut
    # (a layer reading a concatenation is in several groups)
    pending: dict[tuple[int, object], tuple[nn.Module, Any, set[int]]] = {}
    for spec in _nestable(small, example):
        keep = kept_channels(spec.size, width)
        for it in spec.items:
            roots, positions = np.asarray(it.roots), np.asarray(it.idxs)
            for tensor_name, dim in _tensor_names(mods[it.name], it.name, it.role):
                kept.setdefault(tensor_name, {}).setdefault(dim, []).extend(positions[roots < keep].tolist())
            if keep < spec.size and (roots >= keep).any():
                module = mods[it.name]
                entry = pending.setdefault((id(module), it.handler), (module, it.handler, set()))
                entry[2].update(positions[roots >= keep].tolist())
    for module, handler, gone in pending.values():
        with torch.no_grad():
            handler(module, sorted(gone))
    index = {
        name: {dim: np.unique(np.asarray(p, dtype=np.int64)) for dim, p in dims.items()} for name, dims in kept.items()
    }
    return Level(width, small, index)


def _tensor_names(module: nn.Module, name: str, role: str) -> list[tuple[str, int]]:
    """The names (in the model) and dimensions of the tensors an item's channel indices address."""
    return [(f"{name}.{local}" if name else local, dim) for local, dim in _local_tensors(module, role)]


@torch.no_grad()
def rebuild(narrower: Level, wider: Level, full: nn.Module) -> dict[str, torch.Tensor]:
    """Put the narrower level's (tuned) tensors into the wider level, in place, where they sit in it; the re-added
    channels keep the wider level's weights (the original ones), sec. 4.2.2. The weights by which a shared channel
    would read a re-added one start at zero, so the wider level starts out computing the narrower one's outputs
    exactly (its shared channels' normalisation, frozen, stays right) and its fine-tune starts from the narrower
    level's accuracy rather than from a network whose shared channels suddenly read new inputs. Returns, per
    parameter of the wider level, a mask of the re-added entries (1) against the shared ones (0): what its
    fine-tune may change, sec. 4.2.3. ``full`` is the full-width model both levels were narrowed from (it gives
    the full shapes)."""
    shapes = {**{n: p.shape for n, p in full.named_parameters()}, **{n: b.shape for n, b in full.named_buffers()}}
    tensors = {**dict(wider.model.named_parameters()), **dict(wider.model.named_buffers())}
    small = {**dict(narrower.model.named_parameters()), **dict(narrower.model.named_buffers())}
    trainable = {name: torch.ones_like(p) for name, p in wider.model.named_parameters()}
    for name, values in small.items():
        if name not in tensors or name not in shapes or values.dim() == 0:
            continue
        # positions of the narrower level's entries within the wider level: its kept positions, renumbered
        where = []
        for d, n in enumerate(shapes[name]):
            outer = wider.kept.get(name, {}).get(d, np.arange(n))
            inner = narrower.kept.get(name, {}).get(d, np.arange(n))
            where.append(torch.as_tensor(np.searchsorted(outer, inner)))
        index = torch.meshgrid(*where, indexing="ij")
        tensors[name][index] = values
        if name in trainable:
            trainable[name][index] = 0
            if values.dim() > 1:  # a shared channel's weights on re-added inputs: zero
                rows = tensors[name][where[0]]
                rows[trainable[name][where[0]].bool()] = 0
                tensors[name][where[0]] = rows
    return trainable


def freeze_outside(model: nn.Module, trainable: dict[str, torch.Tensor]) -> list[torch.utils.hooks.RemovableHandle]:
    """Zero every gradient outside ``trainable`` (train without weight decay, so the frozen entries do not move);
    returns the hooks, to remove after training. Batch norms normalise by the batch and keep running statistics as
    in any fine-tune, so each level has statistics of its own: after conv-BN fusion a narrower level's weights are
    the wider one's slices scaled per output channel, which is how a portfolio stores them. (Running the norms on
    frozen statistics instead keeps the fused weights plain slices, but the fine-tune then diverges: measured on
    CIFAR-10, a ResNet-20 rebuilt from width 0.125 to 0.25 fell from 31.3% to 24.6% in 78 steps at lr 0.01.)"""
    handles = []
    for name, param in model.named_parameters():
        mask = trainable.get(name)
        if mask is not None and not bool(mask.all()):
            handles.append(param.register_hook(lambda grad, m=mask: grad * m))
    return handles


def _mangled(name: str) -> str:
    return name.replace(".", "__")


def _sliced(tensor: torch.Tensor, kept: dict[int, np.ndarray]) -> torch.Tensor:
    """``tensor`` (a full-width parameter) at a level's kept positions, differentiably."""
    for dim, positions in sorted(kept.items()):
        tensor = tensor.index_select(dim, torch.as_tensor(positions, device=tensor.device))
    return tensor


class JointWidths(nn.Module):
    """Every width trained at once on shared weights, each with batch norms of its own: Slimmable Networks (Yu et
    al., sec. 3.2, switchable batch normalisation), with the sandwich rule's in-place distillation of Universally
    Slimmable Networks (sec. 3.3) over a few fixed widths. ``forward`` runs the full width and returns its logits
    (what training's loss and evaluation see); each narrower width runs on slices of the full width's weights
    (``torch.func.functional_call`` on the level's structure, so gradients reach the shared weights) and its
    distillation loss toward the full width's detached prediction, times its ``weights`` entry (default 1), is kept
    for ``loss()``, added by the training loop as a regulariser. ``levels()`` gives each width as a model of its own."""

    def __init__(self, full: nn.Module, levels: Sequence[Level], weights: Sequence[float] | None = None):
        super().__init__()
        self.full = full
        self._levels = list(levels)  # structures only: their weights are the full width's, sliced
        self._weights = [1.0] * len(self._levels) if weights is None else [float(w) for w in weights]
        if len(self._weights) != len(self._levels):
            raise ValueError(f"{len(self._weights)} loss weights for {len(self._levels)} narrower widths")
        self.norms = nn.ModuleDict()
        for level in self._levels:
            own = nn.ParameterDict()
            for name, module in level.model.named_modules():
                if isinstance(module, NORMS):
                    for attr in ("weight", "bias"):
                        p = getattr(module, attr, None)
                        if isinstance(p, torch.Tensor):
                            own[_mangled(f"{name}.{attr}")] = nn.Parameter(p.detach().clone())
                    for attr in ("running_mean", "running_var", "num_batches_tracked"):
                        b = getattr(module, attr, None)
                        if isinstance(b, torch.Tensor):
                            self.register_buffer(_mangled(f"w{level.width:g}.{name}.{attr}"), b.detach().clone())
            self.norms[_mangled(f"w{level.width:g}")] = own
        self._extra: torch.Tensor | None = None

    def _tensors(self, level: Level) -> dict[str, torch.Tensor]:
        full = dict(self.full.named_parameters())
        own = self.norms[_mangled(f"w{level.width:g}")]
        assert isinstance(own, nn.ParameterDict)
        out: dict[str, torch.Tensor] = {}
        for name, _ in level.model.named_parameters():
            key = _mangled(name)
            out[name] = own[key] if key in own else _sliced(full[name], level.kept.get(name, {}))
        prefix = _mangled(f"w{level.width:g}.")
        for key, buffer in self.named_buffers():
            if key.startswith(prefix):
                out[key[len(prefix) :].replace("__", ".")] = buffer
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.full(x)
        if self.training:
            target = torch.softmax(logits.detach(), dim=1)
            extra = logits.new_zeros(())
            for weight, level in zip(self._weights, self._levels):
                level.model.train()
                out = torch.func.functional_call(level.model, self._tensors(level), (x,))
                kl = torch.nn.functional.kl_div(torch.log_softmax(out, dim=1), target, reduction="batchmean")
                extra = extra + weight * kl
            self._extra = extra
        return logits

    # the training loop's regulariser interface
    def loss(self, labels: torch.Tensor | None = None) -> torch.Tensor:
        extra, self._extra = self._extra, None
        return extra if extra is not None else torch.zeros(())

    def after_step(self) -> None:
        pass

    def log(self) -> dict:
        return {}

    @torch.no_grad()
    def levels(self) -> list[Level]:
        """Each narrower width as a model of its own (its weights the full width's slices, its norms its own), in
        eval mode."""
        out = []
        for level in self._levels:
            model = copy.deepcopy(level.model)
            tensors = self._tensors(level)
            for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
                if name in tensors:  # a buffer outside the norms stays as the level was cut
                    tensor.copy_(tensors[name].detach())
            out.append(Level(level.width, model.eval(), level.kept))
        return out
