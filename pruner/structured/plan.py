"""Deciding and executing removals: the exact plan (to a fixpoint), the published drop rule, folding
constant channels into consumers' biases, and rebuilding the layers in one batch."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..channel_states import used_weights
from .groups import _Group


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
