"""One-shot layer pruning: rank the candidates, remove the lowest to a budget, fine-tune, measure.

Budgets: remove the ``N`` lowest-ranked candidates, or keep removing (lowest first) until the p95 latency measured
through ONNX Runtime under a device profile meets a target. Accuracy figures in the report are ONNX Runtime top-1
on the test split; latencies are under the profile's session settings, batch size and benchmark settings.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn

from edgeshift.core.errors import EdgeshiftError

from ..data import Dataset, model_splits
from ..distill import DistillConfig, Teacher
from ..measure import ModelMeasurer
from ..metrics import count_macs, count_params
from ..models.record import record_of
from ..models.zoo import input_shape
from ..runner import CheckpointJob, Outcome, run_checkpoint
from ..train import config_dict
from ..train import train as run_training
from .candidates import Candidate, find_candidates, remove_candidates
from .criteria import CriterionData, get


@dataclass(frozen=True)
class LayerPruneConfig:
    """What to remove and how to rank it."""

    criterion: str = "imprint"  # a layer criterion: imprint | weight-norm | taylor | bn-scale | ensemble
    remove: int | None = None  # remove this many lowest-ranked candidates ...
    latency_budget_ms: float | None = None  # ... or remove until the p95 under `profile` is at most this
    profile: str = "host"  # device profile (name or TOML path) for every latency figure
    imprint_samples: int = 2000  # training images the data-driven criteria see
    heldout_samples: int = 1000  # other training images the imprint proxy accuracy is measured on
    batch_size: int = 128  # for the criteria's forward passes
    seed: int = 0  # which training images the criteria see

    def validate(self) -> None:
        get(self.criterion)
        if (self.remove is None) == (self.latency_budget_ms is None):
            raise EdgeshiftError("give exactly one budget: remove N candidates, or a latency budget in ms")
        if self.remove is not None and self.remove < 1:
            raise EdgeshiftError(f"remove must be at least 1, got {self.remove}")
        if self.latency_budget_ms is not None and not self.latency_budget_ms > 0:
            raise EdgeshiftError(f"the latency budget must be positive, got {self.latency_budget_ms} ms")


@dataclass
class CandidateScore:
    name: str
    kind: str
    score: float  # the criterion's importance (higher: kept longer)
    rank: int  # 0 = least important = removed first
    removed: bool


@dataclass
class LayerPruneReport:
    criterion: str
    budget: dict
    candidates: list[CandidateScore]
    removed: list[str]
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    latency_before: dict  # ONNX Runtime percentiles under the profile
    latency_after: dict
    profile: str
    accuracy_before: float | None = None  # ONNX Runtime top-1 on the test split
    accuracy_removed: float | None = None  # right after removal, before fine-tuning
    accuracy_after: float | None = None  # after fine-tuning
    finetune: dict = field(default_factory=dict)
    tried: list[dict] = field(default_factory=list)  # latency budget: p95 after removing k candidates
    seconds_ranking: float = 0.0

    @property
    def latency_reduction(self) -> float:
        return 1.0 - self.latency_after["p50_ms"] / self.latency_before["p50_ms"]

    def to_dict(self) -> dict:
        return {**asdict(self), "latency_reduction": self.latency_reduction}

    def table(self) -> str:
        rows = [f"{'candidate':<20} {'kind':<6} {self.criterion + ' score':>18} {'rank':>5}  removed"]
        for c in self.candidates:
            rows.append(f"{c.name:<20} {c.kind:<6} {c.score:>18.6g} {c.rank:>5}  {'yes' if c.removed else ''}")
        rows.append("")
        rows.append(f"removed  {len(self.removed)}: {', '.join(self.removed)}")
        rows.append(
            f"params   {self.params_before:,} -> {self.params_after:,}; MACs {self.macs_before:,} -> "
            f"{self.macs_after:,} ({self.macs_before / max(self.macs_after, 1):.2f}x fewer)"
        )
        rows.append(
            f"latency  p50 {self.latency_before['p50_ms']:.3f} -> {self.latency_after['p50_ms']:.3f} ms, p95 "
            f"{self.latency_before['p95_ms']:.3f} -> {self.latency_after['p95_ms']:.3f} ms "
            f"({100 * self.latency_reduction:.1f}% lower p50, profile {self.profile}, ONNX Runtime)"
        )
        if self.accuracy_before is not None and self.accuracy_removed is not None:
            acc = f"top-1    {100 * self.accuracy_before:.2f}% -> {100 * self.accuracy_removed:.2f}% after removal"
            if self.accuracy_after is not None:
                acc += f" -> {100 * self.accuracy_after:.2f}% after fine-tuning"
            rows.append(acc + " (ONNX Runtime, test split)")
        return "\n".join(rows)


def _example(model: nn.Module, batch: int = 1) -> torch.Tensor:
    return torch.randn(input_shape(model, batch), generator=torch.Generator().manual_seed(0))


def measure_latency(model: nn.Module, measure: ModelMeasurer) -> dict:
    """p50/p95/p99 through ONNX Runtime under the measurer's device profile, at its batch size."""
    return measure.latency(model, _example(model, measure.batch_size))[0]


def onnx_top1(model: nn.Module, test: Dataset, measure: ModelMeasurer) -> float:
    """Top-1 of the model exported to ONNX and run by ONNX Runtime on ``test``."""
    return measure.top1(model, test.normalised(), test.labels)


def criterion_data(train: Dataset, num_classes: int, cfg: LayerPruneConfig) -> CriterionData:
    """Two disjoint, seeded slices of the training split: one to imprint / take gradients on, one held out."""
    rng = np.random.default_rng(cfg.seed)
    order = rng.permutation(len(train))
    n_imprint = min(cfg.imprint_samples, len(train) // 2)
    a, b = order[:n_imprint], order[n_imprint : n_imprint + min(cfg.heldout_samples, len(train) - n_imprint)]
    return CriterionData(
        torch.from_numpy(train.normalised(np.sort(a))),
        torch.from_numpy(train.labels[np.sort(a)]),
        torch.from_numpy(train.normalised(np.sort(b))),
        torch.from_numpy(train.labels[np.sort(b)]),
        num_classes,
        cfg.batch_size,
    )


def removable_candidates(model: nn.Module, remove: int | None = None) -> list[Candidate]:
    """The model's candidates (forward order); none, or fewer than ``remove``, is an error saying what is possible.
    Cheap (one forward pass of one example), so commands check it before loading data."""
    candidates = find_candidates(model, _example(model, 1))
    if not candidates:
        raise EdgeshiftError(
            f"{record_of(model).name} has no removable layers or blocks: no submodule maps its "
            "input to an output of the same shape as y = f(x) + x (an identity residual block), and "
            "no conv layer of a sequential stage keeps its input's shape after another conv"
        )
    if remove is not None and remove > len(candidates):
        raise EdgeshiftError(
            f"cannot remove {remove}: {record_of(model).name} has {len(candidates)} "
            f"removable candidates; pass --remove 1..{len(candidates)}"
        )
    return candidates


def rank_candidates(
    model: nn.Module, criterion: str, data: CriterionData | None, remove: int | None = None
) -> tuple[list[Candidate], dict[str, float]]:
    """The model's candidates (forward order) and the criterion's score for each; a ``remove`` count larger
    than the candidates is refused before any scoring."""
    candidates = removable_candidates(model, remove)
    crit = get(criterion)
    if crit.needs_data and data is None:
        raise EdgeshiftError(f"criterion {criterion!r} needs training data; pass --data")
    return candidates, crit.score(model, candidates, data)


def choose_removal(
    model: nn.Module,
    candidates: list[Candidate],
    scores: dict[str, float],
    cfg: LayerPruneConfig,
    measure: ModelMeasurer,
) -> tuple[list[str], list[dict]]:
    """Names to remove (lowest score first) under the config's budget; the latency tried at each step."""
    order = sorted((c.name for c in candidates), key=lambda n: scores[n])
    if cfg.remove is not None:
        return order[: cfg.remove], []
    tried = []
    for k in range(len(order) + 1):
        trial = remove_candidates(model, order[:k], candidates)
        lat = measure_latency(trial, measure)
        tried.append({"removed": k, "p50_ms": lat["p50_ms"], "p95_ms": lat["p95_ms"]})
        if lat["p95_ms"] <= cfg.latency_budget_ms:
            return order[:k], tried
    raise EdgeshiftError(
        f"latency budget {cfg.latency_budget_ms:g} ms is out of reach under profile {measure.profile_name}: p95 is "
        f"{tried[0]['p95_ms']:.3f} ms unpruned and {tried[-1]['p95_ms']:.3f} ms with all {len(order)} candidates "
        f"removed; pass a budget of at least {tried[-1]['p95_ms']:.3f} ms"
    )


def layerprune(
    model: nn.Module,
    cfg: LayerPruneConfig,
    train: Dataset | None,
    test: Dataset | None = None,
    finetune=None,
    mask: dict | None = None,
    *,
    measure: ModelMeasurer,
    distill: DistillConfig | None = None,
    say: Callable[[str], None] = lambda message: None,
) -> tuple[nn.Module, LayerPruneReport]:
    """Rank ``model``'s candidates with ``cfg.criterion``, remove to the budget, optionally fine-tune.

    ``finetune`` is a ``edgeshift.pruner.train.TrainConfig`` (None: no fine-tuning; it then needs ``train`` and
    ``test``), enforcing ``mask`` (a sparse model's, restricted to the layers that remain) if given. The input
    model is not modified. With ``distill`` the fine-tune also learns from ``model``'s softened outputs
    (knowledge distillation). Accuracies are measured when ``test`` is given. ``measure`` times and scores the
    models through ONNX Runtime under the device profile (``edgeshift.exporter.profile.OrtMeasurer(cfg.profile)``).
    """
    cfg.validate()
    model = model.eval()
    num_classes = record_of(model).classes
    t0 = time.perf_counter()
    say(f"ranking layers and blocks by {cfg.criterion}")
    data = criterion_data(train, num_classes, cfg) if train is not None else None
    candidates, scores = rank_candidates(model, cfg.criterion, data, cfg.remove)
    seconds_ranking = time.perf_counter() - t0
    say(f"choosing what to remove ({len(candidates)} candidates), timed under profile {measure.profile_name}")
    removed, tried = choose_removal(model, candidates, scores, cfg, measure)
    pruned = remove_candidates(model, removed, candidates).eval()
    r = {name: i for i, name in enumerate(sorted((c.name for c in candidates), key=lambda n: scores[n]))}
    example = _example(model, 1)
    report = LayerPruneReport(
        criterion=cfg.criterion,
        budget={"remove": cfg.remove} if cfg.remove is not None else {"latency_budget_ms": cfg.latency_budget_ms},
        candidates=[CandidateScore(c.name, c.kind, scores[c.name], r[c.name], c.name in removed) for c in candidates],
        removed=removed,
        params_before=count_params(model),
        params_after=count_params(pruned),
        macs_before=count_macs(model, example),
        macs_after=count_macs(pruned, example),
        latency_before=measure_latency(model, measure),
        latency_after=measure_latency(pruned, measure),
        profile=measure.profile_name,
        tried=tried,
        seconds_ranking=seconds_ranking,
    )
    if test is not None:
        say(f"removed {', '.join(removed)}; top-1 before and after through ONNX Runtime on {len(test)} test images")
        report.accuracy_before = onnx_top1(model, test, measure)
        report.accuracy_removed = onnx_top1(pruned, test, measure)
    if finetune is not None:
        if train is None or test is None:
            raise EdgeshiftError("fine-tuning needs the training and test data")
        params = dict(pruned.named_parameters())
        kept = {k: v for k, v in (mask or {}).items() if k in params} or None
        teacher = Teacher(model, distill) if distill is not None and distill.enabled else None
        result = run_training(pruned, train, test, finetune, mask=kept, label="fine-tune", teacher=teacher)
        pruned.eval()
        report.accuracy_after = onnx_top1(pruned, test, measure)
        report.finetune = {
            **config_dict(finetune),
            **({"distill": asdict(distill)} if teacher and distill else {}),
            "seconds": result.seconds,
            "steps": result.steps,
            "train_samples": len(train),
        }
    return pruned, report


def layerprune_checkpoint(
    checkpoint,
    out,
    cfg: LayerPruneConfig,
    *,
    data: str,
    finetune=None,
    train_samples: int | None = None,
    test_samples: int | None = None,
    json_out=None,
    measure: ModelMeasurer,
    distill: DistillConfig | None = None,
    say: Callable[[str], None] = lambda message: None,
    spec=None,
) -> LayerPruneReport:
    """``edgeshift layerprune``: checkpoint in, layer-pruned checkpoint (and JSON report) out, atomically."""

    cfg.validate()

    def step(model: nn.Module, payload: dict) -> Outcome[LayerPruneReport]:
        removable_candidates(model, cfg.remove)  # an impossible budget is refused before minutes of loading
        say(f"loading {data}")
        train, test = model_splits(
            data, record_of(model), train_samples=train_samples, test_samples=test_samples, seed=cfg.seed
        )
        pruned, report = layerprune(
            model,
            cfg,
            train,
            test,
            finetune,
            mask=payload.get("masks") or None,
            measure=measure,
            distill=distill,
            say=say,
        )
        params = dict(pruned.named_parameters())
        masks = {k: v for k, v in (payload.get("masks") or {}).items() if k in params}
        meta = {k: v for k, v in payload.get("meta", {}).items() if k in ("test_accuracy",)}
        meta["layerprune"] = {k: v for k, v in report.to_dict().items() if k not in ("candidates", "tried")}
        if report.accuracy_after is not None or report.accuracy_removed is not None:
            meta["test_accuracy"] = (
                report.accuracy_after if report.accuracy_after is not None else report.accuracy_removed
            )
        return Outcome(pruned, report, meta, masks)

    return run_checkpoint(CheckpointJob(checkpoint, spec, out, json_out), step).report
