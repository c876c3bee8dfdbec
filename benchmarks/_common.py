"""Shared benchmark helpers: synthetic sparse models, the VGG-16 portfolio the runtime benchmarks use, and the
uniform L1 width-pruning baseline the CIFAR-10 comparisons measure against.

Synthetic sparsity: each filter gets a log-normal scale, then global magnitude pruning keeps 1/compression of
the conv+linear weights, so whole filters die as they do in trained sparse models. It stands in for trained
IMP checkpoints where only the runtime's behaviour (sizes, memory, switching) is measured, never accuracy.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from edgeshift.pruner.models import get
from edgeshift.pruner.models.record import record_of, set_record


@torch.no_grad()
def synthetic_sparse(
    arch: str = "vgg16", compression: float = 16.0, seed: int = 0, filter_sigma: float = 1.0, **kw
) -> nn.Module:
    torch.manual_seed(seed)
    model = get(arch, **kw).eval()
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    for m in layers:
        scale = torch.exp(torch.randn(m.weight.shape[0]) * filter_sigma)
        m.weight.mul_(scale.reshape(-1, *[1] * (m.weight.dim() - 1)))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert (
                m.running_mean is not None and m.running_var is not None and m.weight is not None and m.bias is not None
            )
            m.running_var.uniform_(0.5, 1.5)
            m.bias.normal_(0, 0.1)
    if compression > 1:
        scores = torch.cat([m.weight.abs().flatten() for m in layers])
        k = int(scores.numel() * (1 - 1 / compression))
        threshold = torch.kthvalue(scores, k).values
        for m in layers:
            m.weight.mul_(m.weight.abs() > threshold)
    return model


def vgg16_variants(compressions=(1, 4, 16, 64), prune: bool = True, filter_sigma: float = 2.0):
    from edgeshift.pruner.structured import prune_zero_channels

    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    models, reports = {}, {}
    for c in compressions:
        m = synthetic_sparse("vgg16", c, filter_sigma=filter_sigma)
        name = f"c{c}x"
        if prune and c > 1:
            m, reports[name] = prune_zero_channels(m, x)
        models[name] = m
    return models, reports, x


def build_vgg16_portfolio(
    out: Path,
    compressions=(1, 4, 16, 64),
    prune: bool = True,
    force: bool = True,
    measure_memory: bool = False,
    latency_iterations: int = 30,
) -> Path:
    from edgeshift.exporter.portfolio import BuildSettings, VariantFacts, build_portfolio

    models, reports, x = vgg16_variants(compressions, prune)
    return build_portfolio(
        models,
        x,
        out,
        facts=VariantFacts(
            prune_reports=reports,
            compressions={f"c{c}x": float(c) for c in compressions},
            reference="c1x",
            architecture="vgg16",
        ),
        settings=BuildSettings(latency_iterations=latency_iterations, measure_memory=measure_memory, force=force),
    )


def ensure_vgg16_portfolio(path: str | None, default: str = "/tmp/edgeshift-bench/vgg16-4.zip") -> Path:
    p = Path(path or default)
    if not p.exists():
        p.parent.mkdir(parents=True, exist_ok=True)
        print(f"building {p} (synthetic sparse VGG-16 at 1x, 4x, 16x, 64x, exactly pruned) ...", flush=True)
        build_vgg16_portfolio(p)
    return p


def width_pruned(model: nn.Module, ratio: float) -> nn.Module:
    """Uniform L1-norm filter pruning of every prunable group (Torch-Pruning's ``MagnitudePruner``, p=1), the
    classifier (the last Linear) kept: the baseline the CIFAR-10 comparisons measure edgeshift against."""
    import copy

    import torch_pruning as tp

    from edgeshift.pruner.models.zoo import input_shape

    m = copy.deepcopy(model).eval()
    last = [x for x in m.modules() if isinstance(x, nn.Linear)][-1:]
    pruner = tp.pruner.MagnitudePruner(
        m,
        torch.randn(input_shape(m, 1)),
        importance=tp.importance.MagnitudeImportance(p=1),
        pruning_ratio=ratio,
        ignored_layers=last,
    )
    pruner.step()
    set_record(m, record_of(model))
    return m
