"""Unstructured sparsity: masks over conv and linear weights, exact global pruning, and a registry of scorers.

A mask is ``dict[str, BoolTensor]`` keyed by parameter name (``features.0.0.weight``), covering every Conv2d and
Linear weight. ``prune_global`` keeps exactly the highest-scoring fraction of the weights still alive.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from edgeshift.core.registry import Registry

from .models.zoo import input_shape

Mask = dict[str, torch.Tensor]


def _grad(p: torch.Tensor) -> torch.Tensor:
    assert p.grad is not None  # every prunable weight takes part in the forward pass
    return p.grad


def prunable(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights pruning acts on: every Conv2d and Linear weight, by parameter name."""
    out: dict[str, torch.Tensor] = {}
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            out[f"{name}.weight" if name else "weight"] = m.weight
    return out


def full_mask(model: nn.Module) -> Mask:
    return {k: torch.ones_like(p, dtype=torch.bool) for k, p in prunable(model).items()}


def density(mask: Mask) -> float:
    total = sum(m.numel() for m in mask.values())
    return sum(int(m.sum()) for m in mask.values()) / max(total, 1)


@torch.no_grad()
def apply_mask(model: nn.Module, mask: Mask) -> None:
    """Zero every masked parameter in place (conv and linear weights; batch-norm scales and shifts too)."""
    params = dict(model.named_parameters())
    for k, m in mask.items():
        params[k].mul_(m.to(params[k].dtype))


@torch.no_grad()
def prune_global(scores: dict[str, torch.Tensor], mask: Mask, keep: int) -> Mask:
    """A new mask keeping exactly ``keep`` of the currently alive weights: those with the highest scores
    (ties at the threshold broken by position)."""
    names = list(mask)
    alive = torch.cat([mask[k].flatten() for k in names])
    dtype = torch.promote_types(torch.float32, scores[names[0]].dtype)
    flat = torch.cat([scores[k].detach().flatten().to(dtype) for k in names])
    flat.masked_fill_(~alive, -float("inf"))
    keep = max(0, min(int(keep), int(alive.sum())))
    if keep == 0:
        new = torch.zeros_like(alive)
    else:
        threshold = torch.kthvalue(flat, flat.numel() - keep + 1).values  # the keep-th largest
        new = flat > threshold
        missing = keep - int(new.sum())
        if missing > 0:  # ties at the threshold: the first ones by position
            new[torch.nonzero(flat == threshold).flatten()[:missing]] = True
        new &= alive
    out, i = {}, 0
    for k in names:
        n = mask[k].numel()
        out[k] = new[i : i + n].reshape(mask[k].shape).clone()
        i += n
    return out


def target_keep(mask_or_model, sparsity: float) -> int:
    """How many weights a global sparsity leaves, counted over all prunable weights."""
    total = sum(
        m.numel()
        for m in (mask_or_model.values() if isinstance(mask_or_model, dict) else prunable(mask_or_model).values())
    )
    return int(round(total * (1.0 - sparsity)))


# --- scorers: (model, mask, target_keep, data) -> scores ------------------------------------------------------


@dataclass(frozen=True)
class Scorer:
    name: str
    score: Callable  # (model, mask, keep, seed) -> Mask, pruning to ``keep`` weights
    data_free: bool
    help: str


def _magnitude(model: nn.Module, mask: Mask, keep: int, seed: int = 0) -> Mask:
    return prune_global({k: p.abs() for k, p in prunable(model).items()}, mask, keep)


def _random(model: nn.Module, mask: Mask, keep: int, seed: int = 0) -> Mask:
    g = torch.Generator().manual_seed(seed)
    return prune_global({k: torch.rand(p.shape, generator=g) for k, p in prunable(model).items()}, mask, keep)


def _synflow(model: nn.Module, mask: Mask, keep: int, seed: int = 0, iterations: int = 100) -> Mask:
    """SynFlow (Tanaka et al., 2020): data-free, iterative; scores |w * dR/dw| with R the summed output of the
    network with |weights| on an all-ones input, pruning to an exponentially shrinking density."""
    net = copy.deepcopy(model).double().eval()
    params = prunable(net)
    with torch.no_grad():
        for weight in net.parameters():
            weight.abs_()
    shape = _input_shape(model)
    x = torch.ones(shape, dtype=torch.float64)
    total_alive = sum(int(m.sum()) for m in mask.values())
    current: dict[str, torch.Tensor] = {k: v.clone() for k, v in mask.items()}
    originals = {k: p.detach().clone() for k, p in params.items()}
    for it in range(1, iterations + 1):
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(originals[k] * current[k])
        net.zero_grad()
        net(x).sum().backward()
        scores = {k: (_grad(p) * p).abs() for k, p in params.items()}
        k_keep = int(round(total_alive * (keep / max(total_alive, 1)) ** (it / iterations)))
        current = prune_global(scores, current, k_keep)
    return current


def _input_shape(model: nn.Module) -> tuple:

    return input_shape(model, 1)


SCORERS: Registry[Scorer] = Registry("scorer")
for _scorer in (
    Scorer("magnitude", _magnitude, False, "global |w| of the trained weights"),
    Scorer("random", _random, True, "uniformly random, seeded"),
    Scorer("synflow", _synflow, True, "SynFlow, data-free, 100 iterations"),
):
    SCORERS.add(_scorer.name, _scorer, _scorer.help)


def names() -> list[str]:
    return SCORERS.names()


def get(name: str) -> Scorer:
    return SCORERS.get(name)
