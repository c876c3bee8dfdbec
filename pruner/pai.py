"""Structured pruning at initialisation with layer sensitivity ("Rapid Deployment of DNNs for Edge Computing via
Structured Pruning at Initialization": Reconvene, Phase 4).

``pai(config)`` builds a freshly initialised zoo model and
  1. pre-processes it: profiles the dense model (params, MACs, ONNX bytes, ONNX Runtime latency) and prunes it
     unstructured to sparsity P with a scorer from ``edgeshift.pruner.sparse`` (global magnitude by default);
  2. evaluates sensitivity: each prunable layer's sparsity S_l against the average S_avg over the prunable layers;
     S_l >= S_avg is *resilient*, otherwise *sensitive*. A resilient layer is planned to keep
     ceil(N_channels * (1 - S_l)) output channels; a sensitive one keeps its channels and its mask;
  3. rectifies: shrinks the planned layers structurally over Torch-Pruning's coupled groups (a residual stream
     shrinks only when every layer writing to it may shrink, to the largest of their plans; BN and the next
     layer's inputs follow), reinitialises the whole model the way its architecture does (so the shrunk layers
     are dense Kaiming layers) and re-applies the sliced masks of the layers that kept them.
The result is an initialised model plus masks, ready for the trainer (``edgeshift train --init``), and a report.

Modes (``MODES``) change only which layers step 3 shrinks: ``reconvene`` the resilient ones, ``all-layers`` every
layer (plain structured PaI), ``inverted`` the sensitive ones, ``unstructured`` none (unstructured PaI).
"""

from __future__ import annotations

import math
import resource
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn

from edgeshift.core.errors import EdgeshiftError, UnknownNameError
from edgeshift.core.registry import Registry

from . import sparse
from .measure import ModelMeasurer
from .metrics import count_macs, count_params
from .models import sources, zoo
from .runner import Outcome, write_outcome
from .structured import coupled_groups

AVERAGES = ("layer-mean", "global")


@dataclass(frozen=True)
class PaiMode:
    """Which layers the rectifier shrinks, given whether the sensitivity rule called them resilient."""

    name: str
    shrinks: Callable[[bool], bool]
    help: str


MODES: Registry[PaiMode] = Registry("pai mode")
for _mode in (
    PaiMode(
        "reconvene",
        lambda resilient: resilient,
        "shrink the resilient layers, keep the sensitive ones sparse (the method)",
    ),
    PaiMode(
        "all-layers", lambda resilient: True, "shrink every layer to its density: plain structured PaI (a control)"
    ),
    PaiMode(
        "inverted",
        lambda resilient: not resilient,
        "shrink the sensitive layers, keep the resilient ones sparse (a control)",
    ),
    PaiMode(
        "unstructured",
        lambda resilient: False,
        "shrink nothing, keep every mask: unstructured PaI (the accuracy reference)",
    ),
):
    MODES.add(_mode.name, _mode, _mode.help)


def get_mode(name: str) -> PaiMode:
    return MODES.get(name)


@dataclass(frozen=True)
class PaiConfig:
    """Hyper-parameters of one pruning-at-initialisation step."""

    arch: str  # zoo architecture to initialise
    sparsity: float  # target fraction P of prunable (conv + linear) weights removed by the scorer, in (0, 1)
    scorer: str = "magnitude"  # unstructured scorer from edgeshift.pruner.sparse: magnitude | synflow | random
    mode: str = "reconvene"  # which layers are shrunk: reconvene | all-layers | inverted | unstructured
    average: str = "layer-mean"  # S_avg: mean of the per-layer sparsities, or 'global' (zeros / all weights)
    num_classes: int | None = None  # default: the architecture's
    input_size: int | None = None  # default: the architecture's
    arch_kwargs: tuple[tuple[str, object], ...] = ()  # extra zoo options, e.g. (("width_mult", 0.5),)
    seed: int = 0  # initialisation, scorer and re-initialisation
    measure_latency: bool = True  # time the dense and the pruned model through ONNX Runtime
    latency_batch: int = 1  # batch size of the latency measurement
    latency_threads: int = 1  # ONNX Runtime intra-op threads for the latency measurement
    latency_iterations: int = 50  # timed calls per model (after warm-up), capped at 3 s each

    def validate(self) -> None:
        if not 0.0 < float(self.sparsity) < 1.0:
            raise EdgeshiftError(
                f"sparsity must be in (0, 1), got {self.sparsity}; e.g. 0.95 removes 95% of the weights"
            )
        sources.parse(self.arch)
        sparse.get(self.scorer)
        get_mode(self.mode)
        if self.average not in AVERAGES:
            raise UnknownNameError("sparsity average", self.average, AVERAGES)


@dataclass
class PaiLayer:
    """One prunable layer: its sparsity after unstructured pruning, the decision, and what happened."""

    name: str
    sparsity: float  # S_l: zero fraction of the layer's weights after the scorer
    resilient: bool  # S_l >= S_avg
    structured: bool  # pruned structurally: dense at its planned width (``planned_channels``), mask dropped
    channels_before: int
    planned_channels: int  # what the rule asks for: ceil(N (1 - S_l)) where the mode shrinks the layer, else N
    channels_after: int
    note: str = ""  # why a planned shrink did not happen (coupling, output layer)


@dataclass
class PaiReport:
    """What a pai step produced, measured."""

    arch: str
    mode: str
    scorer: str
    sparsity_target: float
    average_sparsity: float  # S_avg
    params_dense: int
    params_after: int  # stored parameters (zeros of masked layers included)
    nonzero_after: int  # parameters that survive the masks
    macs_dense: int
    macs_after: int
    compression: float  # params_dense / params_after: what storage and memory shrink by
    onnx_bytes_dense: int | None
    onnx_bytes_after: int | None
    latency_dense: dict | None  # ONNX Runtime CPU percentiles
    latency_after: dict | None
    cpu_speedup: float | None  # dense p50 / pruned p50 through ONNX Runtime
    seconds: float  # the whole step: build, score, plan, rectify, profile
    seconds_prune: float  # without the two ONNX Runtime profiles
    peak_memory_bytes: int  # the process's peak resident set so far
    layers: list[PaiLayer] = field(default_factory=list)
    collapsed_layers: list[str] = field(default_factory=list)  # layers the scorer left with no weight at all

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        rows = [f"{'layer':<28} {'S_l':>6} {'decision':<10} {'channels':>16}"]
        for layer in self.layers:
            decision = "resilient" if layer.resilient else "sensitive"
            chans = f"{layer.channels_before} -> {layer.channels_after}"
            rows.append(
                f"{layer.name:<28} {layer.sparsity:>6.3f} {decision:<10} {chans:>16}"
                + (f"  ({layer.note})" if layer.note else "")
            )
        rows.append("")
        rows.append(
            f"mode {self.mode}, scorer {self.scorer}, P={self.sparsity_target:g}, S_avg={self.average_sparsity:.3f}"
        )
        rows.append(
            f"params   {self.params_dense:>12,} -> {self.params_after:>12,} stored "
            f"({self.compression:.2f}x smaller), {self.nonzero_after:,} nonzero"
        )
        rows.append(
            f"MACs     {self.macs_dense:>12,} -> {self.macs_after:>12,} "
            f"({self.macs_dense / max(self.macs_after, 1):.2f}x fewer)"
        )
        if self.cpu_speedup is not None and self.latency_dense is not None and self.latency_after is not None:
            rows.append(
                f"ORT CPU  p50 {self.latency_dense['p50_ms']:.2f} ms -> {self.latency_after['p50_ms']:.2f} ms "
                f"({self.cpu_speedup:.2f}x faster, batch {self.latency_after['batch']})"
            )
        rows.append(
            f"time     {self.seconds:.2f} s ({self.seconds_prune:.2f} s pruning), "
            f"peak memory {self.peak_memory_bytes / 2**20:.0f} MiB"
        )
        if self.collapsed_layers:
            rows.append(
                f"WARNING  layer collapse: the scorer left no weight in {', '.join(self.collapsed_layers)}; "
                "this model cannot learn. Lower the sparsity or use --scorer synflow."
            )
        return "\n".join(rows)


def layer_sparsities(model: nn.Module, mask: sparse.Mask) -> dict[str, float]:
    """S_l for every masked layer, keyed by module name."""
    return {k[: -len(".weight")]: 1.0 - float(m.sum()) / m.numel() for k, m in mask.items()}


def average_sparsity(sparsities: dict[str, float], mask: sparse.Mask, how: str = "layer-mean") -> float:
    """S_avg: the mean of the per-layer sparsities, or the global zero fraction (``how="global"``)."""
    if how == "global":
        return 1.0 - sparse.density(mask)
    return float(np.mean(list(sparsities.values())))


def planned_channels(channels: int, layer_sparsity: float) -> int:
    """ceil(N (1 - S_l)), at least one channel, computed so float noise never adds a channel."""
    return max(1, min(channels, math.ceil(round(channels * (1.0 - layer_sparsity), 9))))


def _peak_rss() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _example(model: nn.Module, batch: int) -> torch.Tensor:
    return torch.randn(zoo.input_shape(model, batch), generator=torch.Generator().manual_seed(0))


def _latency(model: nn.Module, cfg: PaiConfig, measure: ModelMeasurer) -> tuple[dict, int]:
    return measure.latency(model.eval(), _example(model, cfg.latency_batch))


def rectify(
    model: nn.Module, mask: sparse.Mask, shrink: dict[str, bool], sparsities: dict[str, float], seed: int = 0
) -> tuple[sparse.Mask, dict[str, tuple[int, str]]]:
    """Shrink the layers ``shrink`` names (in place), reinitialise the model, re-apply the surviving masks.

    Returns (the new mask: all-true for the structurally pruned layers, sliced for the others; per layer
    (planned width, why it was not pruned or "")).
    Channels are removed per coupled group: a group shrinks when every layer producing it is to be shrunk, to the
    largest of their planned widths, keeping the channels with the most surviving weights.
    """

    groups = coupled_groups(model, _example(model, 1))
    modules = dict(model.named_modules())
    params = sparse.prunable(model)
    plans: dict[str, tuple[int, str]] = {}
    cuts = []  # (group spec, removed root channels)
    structured: set[str] = set()  # layers made dense at their planned width
    for spec in groups:
        producers = [it for it in spec.items if it.role == "producer"]
        if not producers:
            continue
        wanted = [it.name for it in producers if shrink.get(it.name, False)]
        if not wanted:
            continue
        if spec.blocked or len(wanted) < len(producers):
            why = (
                "its channels are coupled to an operation that cannot be pruned"
                if spec.blocked
                else "coupled with kept layer(s) " + ", ".join(it.name for it in producers if it.name not in wanted)
            )
            for name in wanted:
                plans[name] = (planned_channels(modules[name].weight.shape[0], sparsities[name]), why)
            continue
        keep_n = 1
        for it in producers:
            n = planned_channels(modules[it.name].weight.shape[0], sparsities[it.name])
            plans[it.name] = (n, "")
            keep_n = max(keep_n, n)
        keep_n = min(keep_n, spec.size)
        structured.update(it.name for it in producers)
        # The producers are re-drawn dense, so which channels survive matters only to the layers that read them
        # and keep their masks: keep the channels those masks use most (ties: most surviving producer weights).
        reads = np.zeros(spec.size)
        writes = np.zeros(spec.size)
        for it in spec.items:
            if it.role not in ("producer", "consumer"):
                continue
            w = mask[f"{it.name}.weight"]
            if it.role == "producer":
                np.add.at(writes, it.roots, w.reshape(w.shape[0], -1).sum(1).numpy()[it.idxs])
            elif not shrink.get(it.name, False):
                np.add.at(reads, it.roots, w.transpose(0, 1).reshape(w.shape[1], -1).sum(1).numpy()[it.idxs])
        order = np.lexsort((np.arange(spec.size), -writes, -reads))
        removed = np.zeros(spec.size, dtype=bool)
        removed[order[keep_n:]] = True
        if removed.any():
            cuts.append((spec, removed))
    # carry the masks through the surgery as the weights themselves: 1 alive, 0 pruned
    for k, p in params.items():
        p.data = mask[k].to(p.dtype)
    for spec, removed in cuts:
        for it in spec.items:
            hit = removed[it.roots]
            if hit.any():
                it.handler(modules[it.name], it.idxs[hit].tolist())
    params = sparse.prunable(model)
    new_mask = {}
    for k, p in params.items():
        layer = k[: -len(".weight")]
        new_mask[k] = torch.ones_like(p, dtype=torch.bool) if layer in structured else p.data != 0
    zoo.reinitialise(model, seed)
    sparse.apply_mask(model, new_mask)
    return new_mask, plans


def prune_at_init(
    model: nn.Module, mask: sparse.Mask, *, mode: str = "reconvene", average: str = "layer-mean", seed: int = 0
) -> tuple[sparse.Mask, list[PaiLayer], float]:
    """Steps 2 and 3 on a model and its unstructured mask: decide per layer, shrink, reinitialise, re-mask.

    Modifies ``model`` in place (left in eval mode); returns (its new mask, one PaiLayer per masked layer, S_avg).
    """
    if average not in AVERAGES:
        raise UnknownNameError("sparsity average", average, AVERAGES)
    shrinks = get_mode(mode).shrinks
    sparsities = layer_sparsities(model, mask)
    s_avg = average_sparsity(sparsities, mask, average)
    resilient = {name: s >= s_avg for name, s in sparsities.items()}
    shrink = {name: shrinks(r) for name, r in resilient.items()}
    widths_before = {name: m.weight.shape[0] for name, m in model.named_modules() if name in sparsities}
    new_mask, plans = rectify(model, mask, shrink, sparsities, seed)
    model.eval()
    widths_after = {name: m.weight.shape[0] for name, m in model.named_modules() if name in sparsities}
    layers = []
    for name, s in sparsities.items():
        planned, note = plans.get(name, (widths_before[name], ""))
        if shrink[name] and name not in plans:
            note = "output layer: its channels are the model's outputs"
        dense = bool(new_mask[f"{name}.weight"].all())
        layers.append(
            PaiLayer(
                name,
                s,
                resilient[name],
                shrink[name] and not note and dense,
                widths_before[name],
                planned,
                widths_after[name],
                note,
            )
        )
    return new_mask, layers, s_avg


def pai(cfg: PaiConfig, measure: ModelMeasurer | None = None) -> tuple[nn.Module, sparse.Mask, PaiReport]:
    """Prune a freshly initialised ``cfg.arch`` at initialisation; returns (model, mask, report).

    The model is in eval mode with masked weights zeroed; train it with the mask enforced
    (``edgeshift.pruner.train.train(..., mask=mask)`` or ``edgeshift train --init``). With ``cfg.measure_latency``,
    ``measure`` (e.g. ``edgeshift.exporter.profile.cpu_measurer(cfg.latency_threads, cfg.latency_iterations)``)
    times the dense and the pruned model.
    """
    cfg.validate()
    if cfg.measure_latency and measure is None:
        raise ValueError("pai(cfg) with measure_latency needs a measurer (edgeshift.exporter.profile.cpu_measurer)")
    measurer = measure if cfg.measure_latency else None
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    model = sources.create(
        cfg.arch, num_classes=cfg.num_classes, input_size=cfg.input_size, kwargs=dict(cfg.arch_kwargs)
    )
    model.eval()
    example = _example(model, 1)
    params_dense, macs_dense = count_params(model), count_macs(model, example)
    profile_seconds = 0.0
    latency_dense: dict | None = None
    bytes_dense: int | None = None
    if measurer is not None:
        tp = time.perf_counter()
        latency_dense, bytes_dense = _latency(model, cfg, measurer)
        profile_seconds += time.perf_counter() - tp

    mask = sparse.full_mask(model)
    mask = sparse.get(cfg.scorer).score(model, mask, sparse.target_keep(mask, cfg.sparsity), cfg.seed)
    new_mask, layers, s_avg = prune_at_init(model, mask, mode=cfg.mode, average=cfg.average, seed=cfg.seed + 1)
    params_after, macs_after = count_params(model), count_macs(model, example)
    nonzero = params_after - sum(int((~m).sum()) for m in new_mask.values())

    latency_after: dict | None = None
    bytes_after: int | None = None
    speedup: float | None = None
    if measurer is not None and latency_dense is not None:
        tp = time.perf_counter()
        latency_after, bytes_after = _latency(model, cfg, measurer)
        profile_seconds += time.perf_counter() - tp
        speedup = latency_dense["p50_ms"] / latency_after["p50_ms"]
    seconds = time.perf_counter() - t0
    report = PaiReport(
        arch=cfg.arch,
        mode=cfg.mode,
        scorer=cfg.scorer,
        sparsity_target=float(cfg.sparsity),
        average_sparsity=s_avg,
        params_dense=params_dense,
        params_after=params_after,
        nonzero_after=nonzero,
        macs_dense=macs_dense,
        macs_after=macs_after,
        compression=params_dense / max(params_after, 1),
        onnx_bytes_dense=bytes_dense,
        onnx_bytes_after=bytes_after,
        latency_dense=latency_dense,
        latency_after=latency_after,
        cpu_speedup=speedup,
        seconds=seconds,
        seconds_prune=seconds - profile_seconds,
        peak_memory_bytes=_peak_rss(),
        layers=layers,
        collapsed_layers=[layer.name for layer in layers if layer.sparsity >= 1.0],
    )
    return model, new_mask, report


def save_pai(cfg: PaiConfig, out, json_out=None, measure: ModelMeasurer | None = None) -> PaiReport:
    """Run ``pai(cfg)`` and write the checkpoint (model + masks, the report in its meta) and optionally the JSON
    report, both atomically."""

    model, mask, report = pai(cfg, measure)
    summary = {k: v for k, v in report.to_dict().items() if k != "layers"}
    write_outcome(out, Outcome(model, report, {"pai": summary, "config": asdict(cfg)}, mask), json_out)
    return report
