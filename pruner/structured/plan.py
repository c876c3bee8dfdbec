"""Deciding and executing removals: the exact plan (to a fixpoint), the published drop rule, folding
constant channels into consumers' biases, and rebuilding the layers in one batch."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from ..channel_states import ELEMENTWISE_FUNCTIONS, ELEMENTWISE_METHODS, used_weights
from ..fuse import NormActRemainder
from .groups import _Group, _is_grouped


def _plan_exact(groups: list[_Group]) -> None:
    """Mark removable channels, iterating until removing outputs stops freeing inputs.

    A grouped conv loses whole blocks only (one block: a group's inputs and its outputs, which live in two coupled
    groups): a block where either side is not wholly removable is kept, and the plan reruns with those channels
    held, until every grouped conv's blocks are all-or-nothing."""
    held = [np.zeros(g.size, dtype=bool) for g in groups]
    for _ in range(64):
        _plan_fixpoint(groups, held)
        if not _hold_unequal(groups, held):
            return
    for g in groups:  # not settled (never seen): keep everything rather than guess
        g.removable = np.zeros(g.size, dtype=bool)


def _plan_fixpoint(groups: list[_Group], held: list[np.ndarray]) -> None:
    removed_out: dict[nn.Module, np.ndarray] = {}
    for g in groups:
        g.removable = np.zeros(g.size, dtype=bool)
        for layer, idxs, roots in g.producers:
            removed_out.setdefault(layer, np.zeros(layer.weight.shape[0], dtype=bool))
    changed = True
    while changed:
        changed = False
        for g, hold in zip(groups, held):
            if g.blocked or g.size <= 1:
                continue
            ok = ~hold
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


def _grouped_sides(groups: list[_Group]) -> dict[nn.Conv2d, dict[str, list[tuple[int, np.ndarray, np.ndarray]]]]:
    """For each grouped conv: where its inputs and its outputs sit, as (group index, channel idxs, roots)."""
    sides: dict[nn.Conv2d, dict[str, list[tuple[int, np.ndarray, np.ndarray]]]] = {}
    for gi, g in enumerate(groups):
        for c in g.consumers:
            if _is_grouped(c.layer):
                sides.setdefault(c.layer, {"in": [], "out": []})["in"].append((gi, c.idxs, c.roots))
        for layer, idxs, roots in g.producers:
            if _is_grouped(layer):
                sides.setdefault(layer, {"in": [], "out": []})["out"].append((gi, idxs, roots))
    return sides


def _realisable(
    gone_in: np.ndarray,
    gone_out: np.ndarray,
    blocks: int,
    whole_ok: bool = True,
    in_ok: bool = True,
    out_ok: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Of a grouped conv's planned input and output removals, those one grouped conv can still express: whole
    groups (inputs and outputs together, one group always kept), and in every other group the same number of
    inputs and the same number of outputs (ONNX's Conv needs equal groups), at least one of each kept."""
    g_in, g_out = gone_in.reshape(blocks, -1), gone_out.reshape(blocks, -1)
    whole = np.asarray(g_in.all(1) & g_out.all(1) & whole_ok)
    if whole.all():
        whole[0] = False
    keep_in, keep_out = np.zeros_like(g_in), np.zeros_like(g_out)
    keep_in[whole], keep_out[whole] = True, True
    rest = np.flatnonzero(~whole)
    for side, gone, keep, ok in ((0, g_in, keep_in, in_ok), (1, g_out, keep_out, out_ok)):
        k = min(int(gone[rest].sum(1).min()), gone.shape[1] - 1) if ok else 0
        for g in rest if k else ():
            keep[g, np.flatnonzero(gone[g])[:k]] = True
    return keep_in.reshape(-1), keep_out.reshape(-1)


def _hold_partial_blocks(groups: list[_Group], held: list[np.ndarray]) -> bool:
    """Hold every planned channel of a grouped conv that one grouped conv cannot lose (``_realisable``); True
    when anything was held."""
    any_held = False
    for layer, sides in _grouped_sides(groups).items():
        n_in, n_out = layer.in_channels, layer.out_channels
        gone_in, gone_out = np.zeros(n_in, dtype=bool), np.zeros(n_out, dtype=bool)
        seen_in, seen_out = np.zeros(n_in, dtype=bool), np.zeros(n_out, dtype=bool)
        for side, gone, seen in (("in", gone_in, seen_in), ("out", gone_out, seen_out)):
            for gi, idxs, roots in sides[side]:
                gone[idxs] |= groups[gi].removable[roots] & (not groups[gi].blocked)
                seen[idxs] = True
        ok_in, ok_out = _realisable(
            gone_in,
            gone_out,
            layer.groups,
            bool(seen_in.all() and seen_out.all()),
            bool(seen_in.all()),
            bool(seen_out.all()),
        )
        for side, partial in (("in", gone_in & ~ok_in), ("out", gone_out & ~ok_out)):
            for gi, idxs, roots in sides[side]:
                hit = partial[idxs] & groups[gi].removable[roots]
                if hit.any():
                    held[gi][roots[hit]] = True
                    any_held = True
    return any_held


def _hold_uneven_chunks(groups: list[_Group], held: list[np.ndarray]) -> bool:
    """Hold planned channels of a channel split beyond the fewest any of its chunks loses: the model's code
    splits at one width (Res2Net: ``torch.split(x, self.width, 1)``) or into equal parts (``chunk``), so every
    chunk must lose equally many. True when anything was held."""
    any_held = False
    for g, hold in zip(groups, held):
        for roots, chunk, n_chunks in g.splits:
            gone = g.removable[roots] & (not g.blocked)
            per_chunk = [np.unique(roots[(chunk == c) & gone]) for c in range(n_chunks)]
            widths = [len(np.unique(roots[chunk == c])) for c in range(n_chunks)]
            k = min(min(len(p) for p in per_chunk), min(widths) - 1)
            for p in per_chunk:
                extra = p[max(k, 0) :]
                if len(extra) and not hold[extra].all():
                    hold[extra] = True
                    any_held = True
    return any_held


def _hold_unequal(groups: list[_Group], held: list[np.ndarray]) -> bool:
    """Hold what grouped convs and channel splits cannot lose (both run: their holds interact)."""
    return _hold_partial_blocks(groups, held) | _hold_uneven_chunks(groups, held)


def _plan_drop(groups: list[_Group]) -> None:
    """The published rule: a channel goes when all its producing filters are zero (their bias is ignored); a
    grouped conv's channels only as ``_realisable`` allows."""
    held = [np.zeros(g.size, dtype=bool) for g in groups]
    for _ in range(64):
        for g, hold in zip(groups, held):
            if g.blocked or g.size <= 1 or not g.producers:
                continue
            ok = ~hold
            for layer, idxs, roots in g.producers:
                zero = ~used_weights(layer)[idxs].any(1)
                np.logical_and.at(ok, roots, zero)
            if ok.all():
                ok[g.keep_one] = False
            g.removable = ok
        if not _hold_unequal(groups, held):
            return
    for g in groups:
        g.removable = np.zeros(g.size, dtype=bool)


@torch.no_grad()
def _fold_constants(groups: list[_Group], removed: dict | None = None) -> int:
    """Move constant channels that are about to be removed into their consumers' biases (``removed`` as in
    ``_execute``: input channels the consumers already lost)."""
    folded, removed = 0, {} if removed is None else removed
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
            handler = next((h for m, h, i, _ in g.actions if m is c.layer and i is c.idxs), None)
            before = np.asarray(sorted(removed.get((id(c.layer), handler), ())), dtype=np.int64)
            cols = idx[mask] - np.searchsorted(before, idx[mask])  # positions in the layer as it is
            w = c.layer.weight.detach().double()
            w = w.reshape(w.shape[0], w.shape[1], -1).sum(-1)  # [out, in]
            delta = (w[:, torch.as_tensor(cols)] * torch.as_tensor(s[mask])).sum(1)
            if c.layer.bias is None:
                c.layer.bias = nn.Parameter(torch.zeros(c.layer.weight.shape[0], dtype=c.layer.weight.dtype))
            c.layer.bias.add_(delta.to(c.layer.bias.dtype))
            folded += int(mask.sum())
    return folded


def _execute(groups: list[_Group], removed: dict | None = None) -> None:
    """Rebuild every layer without its planned channels (each group's handlers, one pass; grouped convs here,
    since Torch-Pruning's handler keeps the group count and equal widths). ``removed`` carries, between calls
    on parts of one plan, the original indices each layer already lost, so that later calls hit the right ones."""
    removed = {} if removed is None else removed
    grouped: dict[nn.Conv2d, dict[str, np.ndarray]] = {}
    # one call per layer and dimension with every group's indices: a layer reading a concatenation is in several
    # groups, and indices are positions in the layer as it was
    pending: dict[tuple[int, object], tuple[nn.Module, Callable[..., Any], set[int]]] = {}
    for g in groups:
        if not g.removable.any():
            continue
        for module, handler, idxs, roots in g.actions:
            hit = g.removable[roots]
            if hit.any() and not _is_grouped(module):
                pending.setdefault((id(module), handler), (module, handler, set()))[2].update(idxs[hit].tolist())
        sides = [(layer, idxs, roots, "out_channels") for layer, idxs, roots in g.producers] + [
            (c.layer, c.idxs, c.roots, "in_channels") for c in g.consumers
        ]
        for layer, idxs, roots, width in sides:
            hit = g.removable[roots]
            if _is_grouped(layer) and hit.any():
                gone = grouped.setdefault(
                    layer,
                    {
                        "in_channels": np.zeros(layer.in_channels, dtype=bool),
                        "out_channels": np.zeros(layer.out_channels, dtype=bool),
                    },
                )
                gone[width][idxs[hit]] = True
    for key, (module, handler, channels) in pending.items():
        before = np.asarray(sorted(removed.get(key, ())), dtype=np.int64)
        wanted = np.asarray(sorted(channels), dtype=np.int64)
        handler(module, (wanted - np.searchsorted(before, wanted)).tolist())  # positions in the layer as it is
        removed[key] = set(before.tolist()) | channels
    for module, gone in grouped.items():
        _shrink_grouped(module, gone["in_channels"], gone["out_channels"])


@torch.no_grad()
def _shrink_grouped(conv: nn.Conv2d, gone_in: np.ndarray, gone_out: np.ndarray) -> None:
    """Remove from a grouped conv whole groups (inputs and outputs gone together) and, from every other group,
    the same number of inputs and of outputs; any other pattern is a planning error."""
    blocks = conv.groups
    g_in, g_out = gone_in.reshape(blocks, -1), gone_out.reshape(blocks, -1)
    whole = g_in.all(1) & g_out.all(1)
    keep = np.flatnonzero(~whole)
    n_in, n_out = {int(n) for n in g_in[keep].sum(1)}, {int(n) for n in g_out[keep].sum(1)}
    if len(keep) == 0 or len(n_in) != 1 or len(n_out) != 1:
        raise RuntimeError(f"planned removals leave unequal groups in a grouped conv ({conv})")
    k_out = conv.out_channels // blocks
    rows = np.concatenate([g * k_out + np.flatnonzero(~g_out[g]) for g in keep])
    cols = np.stack([np.flatnonzero(~g_in[g]) for g in keep])  # [kept groups, inputs kept per group]
    per_group = len(rows) // len(keep)
    weight = conv.weight.detach()[torch.as_tensor(rows)]
    index = torch.as_tensor(np.repeat(cols, per_group, axis=0))[:, :, None, None].expand(-1, -1, *weight.shape[2:])
    conv.weight = nn.Parameter(torch.gather(weight, 1, index).clone())
    if conv.bias is not None:
        conv.bias = nn.Parameter(conv.bias.detach()[torch.as_tensor(rows)].clone())
    conv.groups, conv.out_channels, conv.in_channels = len(keep), len(rows), len(keep) * cols.shape[1]


_PASS_THROUGH = (
    nn.Identity,
    nn.ReLU,
    nn.ReLU6,
    nn.SiLU,
    nn.GELU,
    nn.Hardswish,
    nn.LeakyReLU,
    nn.Dropout,
    nn.BatchNorm2d,
    NormActRemainder,
)


def _producer_width(model: nn.Module, node: fx.Node) -> int | None:
    """The channel count now reaching ``node``: the out channels of the conv behind a chain of per-channel
    modules (what a split in a block's code splits)."""
    mods = dict(model.named_modules())
    while (
        isinstance(node, fx.Node)
        and node.args
        and (
            node.op == "call_module"
            and isinstance(mods.get(node.target), _PASS_THROUGH)
            or node.op == "call_function"
            and node.target in ELEMENTWISE_FUNCTIONS
            or node.op == "call_method"
            and node.target in ELEMENTWISE_METHODS
        )
    ):
        arg = node.args[0]
        if not isinstance(arg, fx.Node):
            return None
        node = arg
    conv = mods.get(node.target) if isinstance(node, fx.Node) and node.op == "call_module" else None
    return conv.out_channels if isinstance(conv, nn.Conv2d) else None


def _resize_splits(model: nn.Module, gm: fx.GraphModule) -> None:
    """After channels went equally from every chunk of a ``torch.split(x, width, 1)``, give the module whose
    code splits the new chunk width: its one integer attribute equal to the old one (Res2Net's ``self.width``).
    The new widths are recorded on the module (``edgeshift_split_widths``) for checkpoints. ``chunk`` needs
    nothing; a split the planner cannot resize this way is caught by the output check (kept whole there)."""
    for node in gm.graph.nodes:
        if not (
            node.op == "call_function"
            and node.target is torch.split
            or node.op == "call_method"
            and node.target == "split"
        ):
            continue
        size = (
            node.args[1]
            if len(node.args) > 1
            else node.kwargs.get("split_size_or_sections", node.kwargs.get("split_size"))
        )
        metas, stack = node.meta.get("tensor_meta"), node.meta.get("nn_module_stack") or {"": ("", None)}
        if not isinstance(size, int) or not isinstance(metas, (tuple, list)):
            continue
        width = _producer_width(model, node.args[0])
        if width is None or width % len(metas) or any(int(m.shape[1]) != size for m in metas):
            continue
        owner = model.get_submodule(list(stack.values())[-1][0])
        recorded = vars(owner).get("edgeshift_split_widths", {})
        names = list(recorded) or [
            a for a, v in vars(owner).items() if type(v) is int and v == size and not a.startswith("_")
        ]
        if len(names) == 1 and getattr(owner, names[0]) != width // len(metas):
            setattr(owner, names[0], width // len(metas))
            setattr(owner, "edgeshift_split_widths", {names[0]: width // len(metas)})  # a plain attribute


def _explain(groups: list[_Group], limit: int = 12) -> list[str]:
    """Why channels that are zero or constant were kept: one line per blocked group holding some, and per
    grouped conv whose zero channels are more in some groups than in others."""
    notes: list[str] = []
    for g in groups:
        const = np.zeros(g.size, dtype=bool)
        for c in g.consumers:
            np.logical_or.at(const, c.roots, ~np.isnan(c.states[c.idxs]))
        kept = const & ~g.removable
        if g.blocked and g.reason:  # said whether or not its channels are known zero: the analysis stopped here
            notes.append(f"kept the {g.size} channels of {g.root} whole: {g.reason}")
            continue
        if not kept.any():
            continue
        if g.splits:
            notes.append(
                f"kept {int(kept.sum())} zero/constant channel(s) of {g.root}: they pass a channel split, "
                "whose chunks must lose equally many"
            )
        if any(_is_grouped(c.layer) for c in g.consumers) or any(_is_grouped(p[0]) for p in g.producers):
            layer = (
                next(c.layer for c in g.consumers if _is_grouped(c.layer))
                if any(_is_grouped(c.layer) for c in g.consumers)
                else next(p[0] for p in g.producers if _is_grouped(p[0]))
            )
            notes.append(
                f"kept {int(kept.sum())} zero/constant channel(s) of {g.size}: a grouped conv "
                f"({layer.groups} groups) loses whole groups or the same number of channels from every "
                "group, and these are beyond that"
            )
    unique = list(dict.fromkeys(notes))
    return unique[:limit] + ([f"... and {len(unique) - limit} more"] if len(unique) > limit else [])


def _units(groups: list[_Group]) -> list[list[_Group]]:
    """Groups that must be rebuilt together: those joined by a grouped conv (its blocks span two groups)."""
    parent = list(range(len(groups)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for sides in _grouped_sides(groups).values():
        members = [gi for side in ("in", "out") for gi, _, _ in sides[side]]
        for gi in members[1:]:
            parent[find(gi)] = find(members[0])
    units: dict[int, list[_Group]] = {}
    for gi, g in enumerate(groups):
        units.setdefault(find(gi), []).append(g)
    return list(units.values())


def _execute_verified(groups: list[_Group], check, resize_splits) -> tuple[int, list[str]]:
    """Rebuild unit by unit, running ``check`` (None when the model still computes its reference output, else
    the problem in words) after each; a unit that breaks the output is put back as it was and named.

    The slow path, taken only when the one-batch rebuild was not exact: it finds the groups whose mapping the
    planner got wrong (an op it does not understand) and keeps those whole, so the rest is still pruned."""
    folded, notes = 0, []
    removed: dict[tuple[int, object], set[int]] = {}
    for unit in _units(groups):
        if not any(g.removable.any() for g in unit):
            continue
        touched = {id(m): m for g in unit for m in [a[0] for a in g.actions] + [c.layer for c in g.consumers]}
        saved = {key: copy.deepcopy(m.__dict__) for key, m in touched.items()}
        n = _fold_constants(unit, removed)
        removed_before = {key: set(v) for key, v in removed.items()}
        _execute(unit, removed)
        resize_splits()
        problem = check()
        if problem is None:
            folded += n
            continue
        for key, m in touched.items():
            m.__dict__.clear()
            m.__dict__.update(saved[key])
        removed.clear()
        removed.update(removed_before)
        resize_splits()
        for g in unit:
            g.removable = np.zeros(g.size, dtype=bool)
        notes.append(
            f"kept the channels of {', '.join(g.root for g in unit)}: removing them {problem} "
            "(an operation the planner does not understand is near)"
        )
    return folded, notes
