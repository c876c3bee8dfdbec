"""``edgeshift slim``: a trained model's widths chosen by learned filter masks, priced by device latency.

"Neural Networks Model Compression: The Static, the Dynamic and the Shallow" (Elkerdawy), ch. 3: learnable
filter masks; here each channel is priced by what it costs under the device profile.

The gates (``learned_masks.LearnedMasks``) train with the model for ``gate_epochs`` until the priced cost meets the
target; the closed gates become exact zeros; the model fine-tunes ``finetune_epochs`` with those zeros held
(``train(mask=...)``); ``prune_zero_channels`` removes them exactly. The report gives the widths training chose,
the deviation of the pruned model from the gated one, and the dense and slim p50 measured under the profile. The
widths as trained and the same rounded up to multiples of ``pad_to`` (zero channels: exact) are timed together
with the dense model, and the padding is kept only where it measured faster (``choose_alignment``).
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Protocol

import torch
from torch import nn

from edgeshift.core.errors import EdgeshiftError

from .data import Dataset, model_splits
from .distill import DistillConfig, Teacher
from .learned_masks import GateConfig, LayerPrice, LearnedMasks
from .measure import ModelMeasurer
from .metrics import count_macs, count_params
from .models.record import record_of
from .models.zoo import input_shape
from .runner import CheckpointJob, Outcome, run_checkpoint
from .structured import prune_zero_channels
from .train import TrainConfig
from .train import train as run_training

__all__ = ["SlimConfig", "SlimReport", "LayerPricer", "choose_alignment", "slim", "slim_checkpoint", "PRICINGS"]

PRICINGS = ("latency", "macs")


class PriceModelLike(Protocol):
    layers: dict[str, tuple[float, float]]
    overhead: float
    unit: str

    def to_dict(self) -> dict: ...


class LayerPricer(Protocol):
    """Prices every conv/linear layer of a model as ``fixed + per_mac * MACs`` (``edgeshift.exporter.layer_prices``:
    measured through ONNX Runtime under a device profile, or MACs alone)."""

    name: str

    def prices(self, model: nn.Module, example_inputs: torch.Tensor) -> PriceModelLike: ...


@dataclass(frozen=True)
class SlimConfig:
    """Learned masks on a trained model: the target and the training budgets."""

    target: float = 0.5  # the slim model's priced cost as a fraction of the dense model's, in (0, 1]
    pricing: str = "latency"  # latency: each layer timed under the profile over a width sweep | macs
    gate_epochs: float = 1.0  # epochs the gates learn with the model (the target is met by their end)
    finetune_epochs: float = 1.0  # epochs the model then fine-tunes with the closed channels held at zero
    lr: float = 0.01  # the weights' peak learning rate in both phases (cosine)
    batch_size: int = 128
    gate_lr: float = GateConfig.gate_lr  # the gates' SGD learning rate
    weight: float | None = None  # initial pull of the sparsity loss on the dearest gate (None: from the steps)
    adapt: float = GateConfig.adapt  # per-step factor (1 + adapt) by which the pull moves toward the target
    align: int = 8  # every group keeps a multiple of this many channels while the gates learn
    pad_to: int = 16  # also time the widths rounded up to multiples of this (zero channels, exact); kept if faster
    distill: float = 0.0  # share of the loss matching the dense model's softened outputs, both phases; 0 = off
    seed: int = 0

    def validate(self) -> None:
        if not 0 < self.target <= 1:
            raise EdgeshiftError(f"the target is a fraction of the dense model's cost in (0, 1], got {self.target}")
        if self.pricing not in PRICINGS:
            raise EdgeshiftError(f"unknown pricing {self.pricing!r}; known: {', '.join(PRICINGS)}")
        if self.gate_epochs <= 0 or self.finetune_epochs < 0:
            raise EdgeshiftError("gate epochs must be > 0 and fine-tune epochs >= 0")
        if self.pad_to < 1:
            raise EdgeshiftError(
                f"pad_to is a channel multiple >= 1 (1 or <= align: widths kept as trained), got {self.pad_to}"
            )
        self.gates().validate()
        self.distillation().validate()

    def distillation(self) -> DistillConfig:
        return DistillConfig(weight=self.distill)

    def gates(self) -> GateConfig:
        return GateConfig(
            target=self.target, gate_lr=self.gate_lr, weight=self.weight, adapt=self.adapt, align=self.align
        )


@dataclass
class SlimReport:
    """What slimming did, measured."""

    target: float
    pricing: str
    price_unit: str
    predicted_ratio: float  # the slim model's priced cost over the dense model's
    floor_ratio: float  # the least the gates could reach (one channel per group)
    macs_ratio: float
    params_before: int
    params_after: int
    p50_dense_ms: float | None = None
    p50_slim_ms: float | None = None  # of the widths kept (as trained, or padded where that measured faster)
    align: int = 1  # the widths kept are multiples of this (the chosen one of align_p50_ms)
    align_p50_ms: dict[str, float] = field(default_factory=dict)  # p50 per channel multiple, one interleaved run
    accuracy_dense: float | None = None
    accuracy_gated: float | None = None  # after gate training, closed channels zeroed, before fine-tuning
    accuracy_after: float | None = None  # after fine-tuning (the pruned model, through ONNX Runtime)
    max_rel_deviation: float = 0.0  # pruned model vs the gated model it came from
    shares: dict[str, float] = field(default_factory=dict)  # per coupled group: the share of channels kept
    widths: dict[str, list[int]] = field(default_factory=dict)  # per layer: [before, after]
    gates_closed: int = 0
    distill: float = 0.0  # share of the training loss that matched the dense model (knowledge distillation)
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    profile: str = ""

    @property
    def measured_ratio(self) -> float | None:
        if self.p50_dense_ms and self.p50_slim_ms:
            return self.p50_slim_ms / self.p50_dense_ms
        return None

    def to_dict(self) -> dict:
        return {**asdict(self), "measured_ratio": self.measured_ratio}

    def table(self) -> str:
        def pct(a):
            return "-" if a is None else f"{100 * a:.2f}%"

        lines = [
            f"target {self.target:g} of the dense model's {self.pricing} price (profile {self.profile}): "
            f"predicted {self.predicted_ratio:.3f}, MACs {self.macs_ratio:.3f}"
            + (
                f", measured p50 {self.p50_dense_ms:.3f} -> {self.p50_slim_ms:.3f} ms ({self.measured_ratio:.3f})"
                if self.measured_ratio is not None
                else ""
            ),
            f"top-1 dense {pct(self.accuracy_dense)}, gated {pct(self.accuracy_gated)}, fine-tuned "
            f"{pct(self.accuracy_after)}; params {self.params_before:,} -> {self.params_after:,}; "
            f"deviation {self.max_rel_deviation:.1e} of the largest output",
            "channels kept per group: " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in self.shares.items()),
        ]
        if len(self.align_p50_ms) > 1:
            lines.append(
                "widths in multiples of "
                + ", ".join(f"{a}: p50 {ms:.3f} ms" for a, ms in self.align_p50_ms.items())
                + f" (measured together); kept multiples of {self.align}"
            )
        if self.floor_ratio > self.target:
            lines.append(
                f"the target is below what widths alone reach ({self.floor_ratio:.3f}: one channel per "
                "group); remove layers too (edgeshift layerprune) to go further"
            )
        return "\n".join(lines)


def _example(model: nn.Module, batch: int = 2) -> torch.Tensor:
    return torch.randn(input_shape(model, batch), generator=torch.Generator().manual_seed(0))


PAD_MARGIN = 0.03  # padded widths carry more weights: kept only if their p50 is at least this much lower


def choose_alignment(p50_ms: dict[int, float], trained: int, margin: float = PAD_MARGIN) -> int:
    """The channel multiple to keep: the fastest measured, but a padding (any multiple other than ``trained``)
    only when it beats the widths as trained by more than ``margin`` (a smaller gain is within a shared machine's
    noise and not worth the extra weights)."""
    best = min(p50_ms, key=lambda a: p50_ms[a])
    if best != trained and p50_ms[best] > (1 - margin) * p50_ms[trained]:
        return trained
    return best


def prepare(model: nn.Module, cfg: SlimConfig, pricer: LayerPricer) -> tuple[LearnedMasks, PriceModelLike]:
    """The gates on ``model``, priced: refuses a model with no prunable group before anything is measured."""
    cfg.validate()
    example = _example(model)
    masks = LearnedMasks(model, example, cfg.gates())  # no prunable group: refused before the sweep
    masks.detach_hooks()  # the dense model is what is timed, without the gates' multiplications
    prices = pricer.prices(model, example)
    masks.attach()
    masks.set_prices({k: LayerPrice(a, b) for k, (a, b) in prices.layers.items()}, prices.overhead)
    return masks, prices


def slim(
    model: nn.Module,
    train: Dataset,
    test: Dataset,
    cfg: SlimConfig,
    *,
    pricer: LayerPricer,
    measure: ModelMeasurer,
    teacher: nn.Module | None = None,
    say: Callable[[str], None] = lambda message: None,
) -> tuple[nn.Module, SlimReport]:
    """Learn ``model``'s widths to the target, fine-tune, prune exactly; returns (pruned model, report). The input
    model is not modified. With ``cfg.distill`` both phases also learn from ``teacher`` (default: ``model``; pass
    the original dense model when ``model`` is itself a pruned, not yet fine-tuned one)."""

    t0 = time.perf_counter()
    dense = model.eval()
    work = copy.deepcopy(dense)
    say(
        f"pricing every layer ({cfg.pricing}"
        + (f", timed under profile {measure.profile_name})" if cfg.pricing == "latency" else ")")
    )
    masks, prices = prepare(work, cfg, pricer)
    steps = max(1, int(cfg.gate_epochs * len(train) / cfg.batch_size))
    say(
        f"learning the gates: {steps} steps on {len(train)} images, target {cfg.target:g} "
        f"(floor {masks.floor_ratio:.3f})"
    )
    masks.plan(steps)
    gate_cfg = TrainConfig(iterations=steps, batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed)
    tutor = Teacher(teacher if teacher is not None else dense, cfg.distillation()) if cfg.distill > 0 else None
    result = run_training(work, train, test, gate_cfg, regulariser=masks, label="gates", teacher=tutor)
    history = list(result.history)
    masks.meet_target()
    shares, closed, predicted = masks.shares(), masks.closed(), masks.cost_ratio()
    work.eval()
    example = _example(dense)
    with torch.no_grad():
        gated_out = work(example)
    held = masks.harden()
    with torch.no_grad():
        drift = float((work(example) - gated_out).abs().max()) / max(float(gated_out.abs().max()), 1e-12)
    if drift > 1e-5:
        raise RuntimeError(f"hardening the gates changed the model's outputs ({drift:.1e})")  # a bug of ours
    x, y = test.normalised(), test.labels
    accuracy_gated = measure.top1(work, x, y)
    if cfg.finetune_epochs > 0:
        ft_steps = max(1, int(cfg.finetune_epochs * len(train) / cfg.batch_size))
        say(f"fine-tuning {ft_steps} steps with the {closed} closed channels held at zero")
        ft = TrainConfig(iterations=ft_steps, batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed)
        history += list(run_training(work, train, test, ft, mask=held, label="fine-tune", teacher=tutor).history)
    work.eval()
    versions = {cfg.align: prune_zero_channels(work, example)}
    if cfg.pad_to > cfg.align:
        padded = prune_zero_channels(work, example, align=cfg.pad_to)
        if padded[1].channels_padded and count_params(padded[0]) < count_params(dense):  # a padding back to dense
            versions[cfg.pad_to] = padded  # widths is not a slim model
    say(
        "measuring the dense and the slim model under the profile"
        + (f", widths as trained and padded to multiples of {cfg.pad_to}" if len(versions) > 1 else "")
    )
    timed = measure.latencies(
        {"dense": dense, **{str(a): m for a, (m, _) in versions.items()}}, _example(dense, measure.batch_size)
    )
    align_p50 = {a: timed[str(a)]["p50_ms"] for a in versions}
    kept = choose_alignment(align_p50, cfg.align)
    pruned, prune_report = versions[kept]
    report = SlimReport(
        target=cfg.target,
        pricing=cfg.pricing,
        price_unit=prices.unit,
        predicted_ratio=predicted,
        floor_ratio=masks.floor_ratio,
        macs_ratio=count_macs(pruned, example[:1]) / count_macs(dense, example[:1]),
        params_before=count_params(dense),
        params_after=count_params(pruned),
        p50_dense_ms=timed["dense"]["p50_ms"],
        p50_slim_ms=align_p50[kept],
        align=kept,
        align_p50_ms={str(a): ms for a, ms in align_p50.items()},
        accuracy_dense=measure.top1(dense, x, y),
        accuracy_gated=accuracy_gated,
        accuracy_after=measure.top1(pruned, x, y),
        max_rel_deviation=prune_report.rel_diff,
        shares=shares,
        widths={c.name: [c.channels_before, c.channels_after] for c in prune_report.layers},
        gates_closed=closed,
        distill=cfg.distill,
        history=history,
        seconds=time.perf_counter() - t0,
        profile=measure.profile_name,
    )
    return pruned, report


def slim_checkpoint(
    checkpoint,
    out,
    cfg: SlimConfig,
    *,
    data: str,
    pricer: LayerPricer,
    measure: ModelMeasurer,
    train_samples: int | None = None,
    test_samples: int | None = None,
    json_out=None,
    spec=None,
    say: Callable[[str], None] = lambda message: None,
) -> SlimReport:
    """``edgeshift slim``: checkpoint (or model source) in, slim checkpoint (and JSON report) out, atomically;
    nothing is written unless the whole run succeeds."""

    cfg.validate()

    def step(model: nn.Module, payload: dict) -> Outcome[SlimReport]:
        LearnedMasks(model, _example(model), cfg.gates()).detach_hooks()  # no prunable group: refused before data
        say(f"loading {data}")
        train, test = model_splits(
            data, record_of(model), train_samples=train_samples, test_samples=test_samples, seed=cfg.seed
        )
        pruned, report = slim(model, train, test, cfg, pricer=pricer, measure=measure, say=say)
        meta = {
            "test_accuracy": report.accuracy_after,
            "slim": {k: v for k, v in report.to_dict().items() if k != "history"},
        }
        return Outcome(pruned, report, meta)

    return run_checkpoint(CheckpointJob(checkpoint, spec, out, json_out), step).report
