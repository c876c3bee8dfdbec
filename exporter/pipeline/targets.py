"""Latency targets (``[variants] targets``): for each target, candidates made to meet it, and the choice.

A target is a fraction of the dense model's p50 under the deploy profile. The candidates come from one trained
dense model, each trained on the same budget (``[variants] finetune_epochs``):

- ``lp<k>``: the ``k`` least useful blocks removed (``edgeshift layerprune``), then fine-tuned the whole budget;
- ``slim<s>``: learned filter masks to price ``s`` (``edgeshift slim``): half the budget learns the gates, half
  fine-tunes with the closed channels held at zero;
- ``lp<k>-slim<s>``: ``k`` blocks removed, then slimmed to ``s`` of what is left, on the same two halves.

With ``[variants] distill`` every candidate's training also matches the dense model's softened outputs
(knowledge distillation, ``edgeshift.pruner.distill``).

How strong each candidate must be is measured, not guessed from MACs: the dense model with 0..n blocks removed
(and their INT8 forms when ``[deploy] int8``, every format the profile allows, the faster kept per step as the
portfolio keeps it per variant) is exported and timed in one interleaved run under the profile (``removal.json``);
``lp<k>`` takes the least ``k`` whose p50 meets the target, the combination half of it with the slim price making
up the rest, and the slim price for an INT8 form is the target over INT8's measured speed-up of the dense model.
A target the dense INT8 form meets, with its top-1 within ``[variants] int8_loss_ok`` of the dense model's, gets
no FP32-sized candidate. Every candidate then goes into the portfolio (with its INT8 form when enabled), where it
is timed against the others; ``choose`` picks, per target, the most accurate variant whose p50 on the bench meets
it.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgeshift.core.atomic import atomic_path, write_text_atomic
from edgeshift.device_profiles import DeviceProfile
from edgeshift.pruner.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from edgeshift.pruner.data import Dataset, model_splits
from edgeshift.pruner.distill import DistillConfig
from edgeshift.pruner.layers.candidates import Candidate, remove_candidates
from edgeshift.pruner.layers.layerprune import LayerPruneConfig, criterion_data, layerprune, rank_candidates
from edgeshift.pruner.models.record import record_of
from edgeshift.pruner.models.zoo import input_shape
from edgeshift.pruner.slim import SlimConfig, slim
from edgeshift.pruner.train import TrainConfig
from edgeshift.runtime.session import create_session

from ..layer_prices import LatencyPricer
from ..onnx_export import INPUT_NAME, onnx_bytes
from ..profile import OrtMeasurer, TestData, onnx_accuracy, time_interleaved_models
from ..quantize import Calibration, quantize_onnx, schemes_for
from .config import PipelineConfig

__all__ = [
    "CandidatePlan",
    "TargetChoice",
    "plan_candidates",
    "int8_close",
    "int8_cover_lines",
    "removal_ladder",
    "build_target_variants",
    "choose",
    "choice_lines",
]


@dataclass(frozen=True)
class CandidatePlan:
    """One candidate: ``remove`` blocks removed, then slimmed to ``slim`` of the remaining price (1: not slimmed)."""

    remove: int
    slim: float

    @property
    def name(self) -> str:
        parts = ([f"lp{self.remove}"] if self.remove else []) + ([f"slim{self.slim:.3g}"] if self.slim < 1 else [])
        return "-".join(parts) or "dense"


def plan_candidates(
    targets: tuple[float, ...],
    families: tuple[str, ...],
    ratios: dict[str, list[float]],
    *,
    int8_as_accurate: bool = False,
) -> dict[float, list[CandidatePlan]]:
    """Per target, the candidates of each family, sized from the measured p50 ratios of the removal ladder
    (``ratios[form][k]``: ``k`` blocks removed, in that form, over the dense FP32 model; forms "fp32" and, with
    INT8, "int8"). A family that cannot reach a target (no removal count meets it) has no candidate there. With
    ``int8_as_accurate`` (the dense model's INT8 form measured as accurate as it, within ``[variants]
    int8_loss_ok``), a target the dense INT8 form meets gets no FP32-sized candidate: trained on a short budget,
    none comes as close."""
    plans: dict[float, list[CandidatePlan]] = {}
    for t in targets:
        out: list[CandidatePlan] = []
        for form, ladder in ratios.items():
            if form == "fp32" and int8_as_accurate and ratios.get("int8", [math.inf])[0] <= t:
                continue
            # the least k whose form meets the target (the dense model alone counts when it does)
            k = next((i for i, r in enumerate(ladder) if r <= t), None)
            base = ladder[0]  # this form's dense ratio: 1 for FP32, INT8's speed-up for INT8
            if "layerprune" in families and k:
                out.append(CandidatePlan(k, 1.0))
            if "slim" in families and t < base:
                out.append(CandidatePlan(0, round(t / base, 3)))
            reach = k if k is not None else len(ladder) - 1  # past the ladder's end the combination still tries
            half = math.ceil(reach / 2)
            if "layerprune+slim" in families and half and t < ladder[half]:
                out.append(CandidatePlan(half, round(t / ladder[half], 3)))
        unique = {p.name: p for p in out if p.name != "dense"}
        plans[t] = list(unique.values())
    return plans


def int8_close(ladder: dict, loss_ok: float) -> bool:
    """Whether the removal ladder measured the dense model's INT8 form within ``loss_ok`` points of its FP32 top-1
    (False where it did not measure it: INT8 off, or a ladder cached before it was measured; and where ``loss_ok``
    is negative)."""
    top1 = ladder.get("dense_top1") or {}
    return loss_ok >= 0 and bool(top1) and 100 * (top1["fp32"] - top1["int8"]) <= loss_ok


def int8_cover_lines(targets: tuple[float, ...], ladder: dict, loss_ok: float) -> list[str]:
    """Why a target has no FP32-sized candidate: the dense INT8 form meets it, as accurate as the dense model."""
    if not int8_close(ladder, loss_ok):
        return []
    ratio, top1 = ladder["ratios"]["int8"][0], ladder["dense_top1"]
    return [
        f"target {t:g}: the dense model's INT8 form meets it ({ratio:.2f}x, top-1 {100 * top1['int8']:.2f}% vs "
        f"{100 * top1['fp32']:.2f}% FP32, within {loss_ok:g} points): no FP32-sized candidate trained"
        for t in targets
        if ratio <= t
    ]


def removal_ladder(
    dense: nn.Module, train: Dataset, test: Dataset, cfg: PipelineConfig, out: Path, profile: DeviceProfile
) -> dict:
    """The dense model with its least useful 0..n blocks removed, exported and timed interleaved under the profile
    (FP32, and INT8 when enabled: every format the profile allows, as the portfolio's ``fastest_int8`` would choose,
    the faster kept per step); with INT8, also the dense model's top-1 in both forms on ``test``. Cached in ``out``
    (a resumed run reuses the measurement)."""
    if out.is_file():
        return json.loads(out.read_text())
    order: list[str] = []
    candidates: list[Candidate] = []
    if "layerprune" in cfg.variants.candidates or "layerprune+slim" in cfg.variants.candidates:
        lp = LayerPruneConfig(criterion=cfg.variants.criterion, remove=1, seed=cfg.train.seed)
        candidates, scores = rank_candidates(dense, lp.criterion, criterion_data(train, train.num_classes, lp))
        order = sorted((c.name for c in candidates), key=lambda n: scores[n])
    batch = profile.serving.batch_size
    steps = range(len(order) + 1)
    x = torch.randn(input_shape(dense, batch), generator=torch.Generator().manual_seed(0))
    graphs = {f"fp32-{k}": onnx_bytes(remove_candidates(dense, order[:k], candidates).eval(), x) for k in steps}
    schemes = schemes_for(profile.quantization) if cfg.deploy.int8 else []
    if schemes:
        calibration = Calibration(
            train.normalised(np.arange(min(cfg.deploy.calibration_samples, len(train)))),
            cfg.deploy.calibration_method,
            train.name,
        )
        graphs.update(
            {
                f"int8-{s.label}-{k}": quantize_onnx(graphs[f"fp32-{k}"], calibration, s, name=f"lp{k}")
                for s in schemes
                for k in steps
            }
        )
    stats = time_interleaved_models(graphs, {INPUT_NAME: x.numpy()}, profile, batch=batch)
    dense_p50 = stats["fp32-0"].p50_ms
    doc: dict = {
        "profile": profile.name,
        "order": order,
        "dense_p50_ms": dense_p50,
        "p50_ms": {name: s.p50_ms for name, s in stats.items()},
        "ratios": {"fp32": [stats[f"fp32-{k}"].p50_ms / dense_p50 for k in steps]},
    }
    if schemes:  # per step the faster format, as the portfolio keeps per variant
        formats = [min((s.label for s in schemes), key=lambda label: stats[f"int8-{label}-{k}"].p50_ms) for k in steps]
        doc["int8_formats"] = formats
        doc["ratios"]["int8"] = [stats[f"int8-{formats[k]}-{k}"].p50_ms / dense_p50 for k in steps]
        held_out = TestData(test.normalised(), test.labels, test.name)
        doc["dense_top1"] = {
            "fp32": onnx_accuracy(create_session(graphs["fp32-0"], profile), held_out)[0],
            "int8": onnx_accuracy(create_session(graphs[f"int8-{formats[0]}-0"], profile), held_out)[0],
        }
    write_text_atomic(out, json.dumps(doc, indent=2))
    return doc


def build_target_variants(cfg: PipelineConfig, variants: Path, dense_path: Path, profile: DeviceProfile) -> list[Path]:
    """Every target's candidates as checkpoints in ``variants`` (each skipped when it exists); returns the dense
    checkpoint and theirs, for the exporter."""
    v = cfg.variants
    dense, _ = load_checkpoint(dense_path)
    train, test = model_splits(
        cfg.data.path,
        record_of(dense),
        train_samples=cfg.data.train_samples or None,
        test_samples=cfg.data.test_samples or None,
        seed=cfg.train.seed,
    )
    print(f"timing the dense model with 0..n blocks removed under profile {profile.name}", flush=True)
    ladder = removal_ladder(dense, train, test, cfg, variants / "removal.json", profile)
    plans = plan_candidates(
        v.targets, v.candidates, ladder["ratios"], int8_as_accurate=int8_close(ladder, v.int8_loss_ok)
    )
    for line in int8_cover_lines(v.targets, ladder, v.int8_loss_ok):
        print(line, flush=True)
    write_text_atomic(
        variants / "plan.json",
        json.dumps({f"{t:g}": [asdict(p) | {"name": p.name} for p in ps] for t, ps in plans.items()}, indent=2),
    )
    unique = {p.name: p for ps in plans.values() for p in ps}
    steps = max(1, round(v.finetune_epochs * len(train) / cfg.train.batch_size))
    measure, pricer = OrtMeasurer(profile), LatencyPricer(profile)
    sources = [dense_path]
    for i, (name, plan) in enumerate(sorted(unique.items()), 1):
        path = variants / f"{name}.pt"
        sources.append(path)
        if path.exists():
            continue
        print(f"candidate {i}/{len(unique)} {name}: {steps} training steps", flush=True)
        model = dense
        meta: dict[str, Any] = {}
        if plan.remove:
            lp = LayerPruneConfig(
                criterion=cfg.variants.criterion, remove=plan.remove, profile=profile.name, seed=cfg.train.seed
            )
            tune = (
                None
                if plan.slim < 1
                else TrainConfig(
                    iterations=steps,
                    batch_size=cfg.train.batch_size,
                    lr=v.lr,
                    weight_decay=cfg.train.weight_decay,
                    seed=cfg.train.seed,
                )
            )
            model, report = layerprune(
                dense, lp, train, test, tune, measure=measure, distill=DistillConfig(weight=v.distill)
            )
            meta["layerprune"] = {"removed": report.removed, "accuracy_after": report.accuracy_after}
            meta["test_accuracy"] = report.accuracy_after
        if plan.slim < 1:
            sc = SlimConfig(
                target=plan.slim,
                gate_epochs=v.finetune_epochs / 2,
                finetune_epochs=v.finetune_epochs / 2,
                lr=v.lr,
                batch_size=cfg.train.batch_size,
                align=v.align,
                pad_to=v.pad_to,
                distill=v.distill,
                seed=cfg.train.seed,
            )
            model, sr = slim(model, train, test, sc, pricer=pricer, measure=measure, teacher=dense)
            meta["slim"] = {k: val for k, val in sr.to_dict().items() if k != "history"}
            meta["test_accuracy"] = sr.accuracy_after
        meta["pruned_from"], meta["distill"] = str(dense_path), v.distill
        with atomic_path(path) as tmp:
            save_checkpoint(model, tmp, meta=meta)
    return sources


@dataclass
class TargetChoice:
    """What serves one target: the most accurate variant whose p50 on the bench is within it, or none."""

    target: float
    variant: str | None
    p50_ms: float | None
    ratio: float | None
    top1: float | None
    met_by: int  # how many variants meet it
    fastest: str = ""  # when none met it: the fastest variant, and its ratio
    fastest_ratio: float | None = None


def choose(
    targets: tuple[float, ...], bench: dict, top1: dict[str, float | None], dense: str = "dense"
) -> list[TargetChoice]:
    """Per target, from one bench run (every variant timed against the others): the most accurate variant with
    p50 <= target x the dense variant's p50 (ties: the faster)."""
    p50 = {v["name"]: v["p50_ms"] for v in bench["variants"]}
    if dense not in p50:
        raise KeyError(f"the bench has no {dense!r} variant to measure targets against")
    base = p50[dense]
    fastest = min(p50, key=lambda n: p50[n])
    choices = []
    for t in targets:
        within = [n for n in p50 if p50[n] <= t * base]  # the dense variant itself only at target 1
        if within:
            best = max(within, key=lambda n: ((top1.get(n) or 0.0), -p50[n]))
            choices.append(TargetChoice(t, best, p50[best], p50[best] / base, top1.get(best), len(within)))
        else:
            choices.append(TargetChoice(t, None, None, None, None, 0, fastest, p50[fastest] / base))
    return choices


def choice_lines(choices: list[TargetChoice], dense_p50: float) -> list[str]:
    lines = []
    for c in choices:
        if c.variant is None:
            lines.append(
                f"target {c.target:g} ({c.target * dense_p50:.3f} ms): not met; the fastest variant, "
                f"{c.fastest}, is at {c.fastest_ratio:.2f}x the dense p50"
            )
        else:
            top1 = "-" if c.top1 is None else f"{100 * c.top1:.2f}%"
            lines.append(
                f"target {c.target:g} ({c.target * dense_p50:.3f} ms): {c.variant}, p50 {c.p50_ms:.3f} ms "
                f"({c.ratio:.2f}x dense), top-1 {top1}, best of {c.met_by} that meet it"
            )
    return lines


def candidate_lines(variants: Path) -> list[str]:
    """One line per candidate in ``variants`` (its checkpoint's meta): the blocks removed, the widths training chose
    (share of channels kept per coupled group, named by its first layer), the channel multiple kept with the p50s
    that chose it, the deviation of the exact prune, the distillation weight and the top-1 measured after training
    (on the run's test subset)."""
    plan = json.loads((variants / "plan.json").read_text())
    lines = []
    for name in sorted({p["name"] for ps in plan.values() for p in ps}):
        path = variants / f"{name}.pt"
        if not path.exists():
            continue
        meta = read_checkpoint(path).get("meta", {})
        parts = []
        if "layerprune" in meta:
            parts.append(f"removed {', '.join(meta['layerprune']['removed'])}")
        if "slim" in meta:
            s = meta["slim"]
            kept = ", ".join(f"{group.split(',')[0]} {100 * share:.0f}%" for group, share in s["shares"].items())
            measured = s.get("measured_ratio")
            parts.append(
                f"widths priced {s['predicted_ratio']:.2f} of dense (MACs {s['macs_ratio']:.2f}"
                + (f", measured {measured:.2f}x" if measured else "")
                + f"), kept {kept}; "
                + (
                    f"widths multiples of {s['align']} (p50 "
                    + ", ".join(f"{a}: {ms:.3f} ms" for a, ms in s["align_p50_ms"].items())
                    + "); "
                    if len(s.get("align_p50_ms", {})) > 1
                    else ""
                )
                + f"exact to {s['max_rel_deviation']:.1e}"
            )
        if meta.get("distill"):
            parts.append(f"distilled {meta['distill']:g}")
        if meta.get("test_accuracy") is not None:
            parts.append(f"top-1 {100 * meta['test_accuracy']:.2f}% after training")
        lines.append(f"{name}: " + "; ".join(parts))
    return lines
