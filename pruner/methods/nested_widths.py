"""Nested widths: every narrower variant is a prefix of the wider one in every coupled channel group, trained by the
steps of "Self-adaptive neural network for edge devices" (Rapa), sec. 4.2 (the narrowest level fine-tuned, then each
wider level rebuilt from it with the dropped channels' original weights and only those re-added weights
fine-tuned), or all widths at once (Slimmable Networks); with independently tuned widths as the baseline.
"""

from __future__ import annotations

import dataclasses
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar

import numpy as np
import torch
from torch import nn

from edgeshift.core.config import setting
from edgeshift.core.errors import EdgeshiftError

from ..checkpoint import load_checkpoint, save_checkpoint
from ..data import Dataset, model_splits
from ..fuse import fuse_conv_bn
from ..models.record import record_of
from ..models.zoo import input_shape
from ..nested import (
    JointWidths,
    Level,
    check_nestable,
    check_widths,
    freeze_outside,
    learned_scores,
    narrow,
    rebuild,
    reorder_channels,
)
from ..train import train
from .base import MethodContext


def _widths(values: tuple[float, ...]) -> str | None:
    try:
        check_widths(values)
    except Exception as exc:  # the one-line reason, as the config loader prints it
        return str(exc)
    return None


def _targets(values: tuple[float, ...]) -> str | None:
    if not values:
        return None
    return _widths(values) and (
        "latency targets are fractions of the full width's p50 in (0, 1), decreasing, e.g. [0.75, 0.5, 0.25]"
    )


TRAININGS = ("rebuild", "joint", "independent")
RANKINGS = ("l1", "learned")


SWEEP = tuple(i / 20 for i in range(19, 0, -1))  # the widths a latency target is met from: 0.95 .. 0.05


@dataclass(frozen=True)
class NestSettings:
    # settings added after nest runs existed, with their defaults: at those a run folder's hash is unchanged
    LATER: ClassVar[dict[str, object]] = {"joint_weights": (), "ranking": "l1", "ranking_epochs": 0.25}

    widths: tuple[float, ...] = setting(
        (0.75, 0.5, 0.25), "the narrower levels, fractions of every group's channels, decreasing", check=_widths
    )
    finetune_epochs: float = setting(
        1.0,
        "epochs of fine-tuning per level (the narrowest: all its weights; each wider one: only the weights it re-adds)",
        minimum=0,
    )
    latency_targets: tuple[float, ...] = setting(
        (),
        "instead of widths: each level's p50 as a fraction of the full width's under the device profile, "
        "decreasing; each becomes the widest width of a sweep (0.95 .. 0.05, timed against each other in one run) "
        "measured to meet it",
        check=_targets,
    )
    lr: float = setting(0.01, "peak learning rate of each level's fine-tune (cosine)")
    joint_weights: tuple[float, ...] = setting(
        (),
        "joint: per narrower width, widest first, the weight of its distillation loss against the full width's "
        "(empty: 1 each, Slimmable's plain sum); a narrow width's gradients reach every wider width's leading "
        "channels, so weighting the narrowest less leaves the middle widths more of their own",
        check=lambda v: None if all(w > 0 for w in v) else "must be positive numbers",
    )
    ranking: str = setting(
        "l1",
        "what orders every group's channels (the narrower widths keep the first): l1 (the norm of the weights "
        "writing each channel) or learned (learned filter masks: gates learned on the frozen trained model for "
        "ranking_epochs, each channel ranked by its gate)",
        check=lambda v: None if v in RANKINGS else f"must be one of {', '.join(RANKINGS)}",
    )
    ranking_epochs: float = setting(0.25, "learned ranking: epochs of gate learning", minimum=0)
    training: str = setting(
        "rebuild",
        "rebuild: the narrowest tuned, each wider level rebuilt from it and only its re-added weights tuned (nested); "
        "joint: every width tuned at once on the shared weights, each with batch norms of its own, the narrower ones "
        "distilled from the full one (Slimmable Networks; nested, finetune_epochs for each width); independent: each "
        "width cut from the dense model by the same ranking and tuned alone, all its weights, on the same budget "
        "(the baseline nested widths are measured against: its widths share nothing)",
        check=lambda v: None if v in TRAININGS else f"must be one of {', '.join(TRAININGS)}",
    )

    def __post_init__(self) -> None:  # across fields: refused as the configuration is read, before any work
        levels = len(self.latency_targets or self.widths)
        if self.joint_weights and len(self.joint_weights) != levels:
            raise EdgeshiftError(
                f"joint_weights gives {len(self.joint_weights)} weights for {levels} narrower widths: give one per "
                "width, widest first"
            )


class NestedWidths:
    """The full width and each narrower one, as checkpoints whose weights nest."""

    name: ClassVar[str] = "nest"
    help: ClassVar[str] = "nested widths: narrower levels are prefixes of wider ones (one network, many widths)"
    Settings: ClassVar[type[NestSettings]] = NestSettings

    def make_variants(self, settings: NestSettings, context: MethodContext) -> list[Path]:
        probe = context.model.build()  # the architecture, before minutes of training: refused if nothing nests
        check_nestable(probe, torch.randn(input_shape(probe, 2), generator=torch.Generator().manual_seed(0)))
        widths = check_widths(settings.widths)
        if settings.latency_targets:
            widths = self.widths_for_latency(probe, check_widths(settings.latency_targets), context)
        levels = (1.0, *widths)
        dense = context.dense()
        prefix = "independent" if settings.training == "independent" else "nest"
        paths = {w: context.folder / f"{prefix}-{w:g}.pt" for w in levels}
        # the levels of one run share a family: the exporter slices the narrower ones from the full one
        done = [load_checkpoint(p)[1].get("meta", {}).get("nest", {}) for p in paths.values() if p.exists()]
        if all(p.exists() for p in paths.values()):
            return list(paths.values())
        model, _ = load_checkpoint(dense)
        family = next((d["family"] for d in done if isinstance(d.get("family"), str)), uuid.uuid4().hex)
        example = torch.randn(input_shape(model, 2), generator=torch.Generator().manual_seed(0))
        d = context.data
        train_ds, test_ds = model_splits(
            d.path, record_of(model), train_samples=d.train_samples, test_samples=d.test_samples, seed=context.seed
        )
        scores = None
        if settings.ranking == "learned":
            scores = self._learned_ranking(model, example, widths[-1], settings, context, train_ds, test_ds)
        nested = reorder_channels(model, example, scores)  # exact: the same function, channels by importance
        # every level from the reordered model's original weights, with where its entries sit in the full model
        shaped = {w: Level(w, model, {}) if w == 1.0 else narrow(model, example, w) for w in levels}
        if settings.training == "joint":
            return self._joint(model, shaped, paths, family, len(nested), settings, context, (train_ds, test_ds))
        narrower: Level | None = None
        for width in reversed(levels):  # narrowest first
            path = paths[width]
            if path.exists():  # a resumed run: this level is done
                narrower = Level(width, load_checkpoint(path)[0], shaped[width].kept)
                continue
            level = shaped[width]
            independent = settings.training == "independent"
            if independent and width == 1.0:  # the dense model, reordered: nothing to tune alone
                save_checkpoint(level.model.eval(), path, meta={"pruned_from": str(dense)})
                continue
            trainable = rebuild(narrower, level, model) if narrower is not None and not independent else None
            context.say(
                f"nest: width {width:g}, fine-tuning "
                + ("all weights" if trainable is None else "the re-added weights only")
            )
            accuracy = self._finetune(level.model, trainable, settings, context, train_ds, test_ds)
            save_checkpoint(
                level.model.eval(),
                path,
                meta={
                    **(
                        {}
                        if independent
                        else {
                            "nest": {
                                "width": width,
                                "widths": list(levels),
                                "groups": len(nested),
                                "family": family,
                                "training": settings.training,
                                "ranking": settings.ranking,
                            }
                        }
                    ),
                    "test_accuracy": accuracy,
                    "pruned_from": str(dense),
                },
            )
            narrower = level
        # the full width is the dense model with its channels reordered: it stands for it (the same function)
        return list(paths.values())

    @staticmethod
    def widths_for_latency(model: nn.Module, targets: tuple[float, ...], context: MethodContext) -> tuple[float, ...]:
        """Per latency target (a fraction of the full width's p50), the widest width of ``SWEEP`` measured to meet
        it: every width of the sweep and the full one fused and timed against each other in one run under the
        profile (latency does not depend on the weights: the untrained architecture is timed)."""
        example = torch.randn(
            input_shape(model, context.measure.batch_size), generator=torch.Generator().manual_seed(0)
        )
        reorder_channels(model, example)
        models = {"1": fuse_conv_bn(model, example_inputs=example[:1])}
        for width in SWEEP:
            models[f"{width:g}"] = fuse_conv_bn(narrow(model, example, width).model, example_inputs=example[:1])
        context.say(
            f"nest: timing {len(models)} widths against each other under profile {context.measure.profile_name}"
        )
        p50 = {name: stats["p50_ms"] for name, stats in context.measure.latencies(models, example).items()}
        return widths_meeting(p50, targets, context.say)

    def _joint(
        self,
        model: nn.Module,
        shaped: dict[float, Level],
        paths: dict[float, Path],
        family: str,
        groups: int,
        settings: NestSettings,
        context: MethodContext,
        data: tuple[Dataset, Dataset],
    ) -> list[Path]:
        """Every width trained at once (``JointWidths``), then each written as a level of its own."""
        joint = JointWidths(model, [level for w, level in shaped.items() if w < 1.0], settings.joint_weights or None)
        context.say(f"nest: {len(shaped)} widths trained jointly, each with batch norms of its own")
        accuracy = self._finetune(joint, None, settings, context, *data, regulariser=joint)
        widths = list(shaped)
        for level in [Level(1.0, model.eval(), {}), *joint.levels()]:
            meta = {
                "width": level.width,
                "widths": widths,
                "groups": groups,
                "family": family,
                "training": "joint",
                "ranking": settings.ranking,
            }
            save_checkpoint(
                level.model,
                paths[level.width],
                meta={"nest": meta, "test_accuracy": accuracy if level.width == 1.0 else None},
            )
        return list(paths.values())

    @staticmethod
    def _learned_ranking(
        model: nn.Module,
        example: torch.Tensor,
        narrowest: float,
        settings: NestSettings,
        context: MethodContext,
        train_ds: Dataset,
        test_ds: Dataset,
    ) -> dict[frozenset[str], np.ndarray]:
        """Gate logits per group (``learned_scores``), priced toward the narrowest width's share of the MACs."""
        steps = max(1, round(settings.ranking_epochs * len(train_ds) / context.train.batch_size))
        context.say(f"nest: learning gates to rank the channels ({steps} steps, the trained weights frozen)")

        def fit(work: nn.Module, masks, count: int) -> None:
            cfg = dataclasses.replace(context.train, iterations=count, lr=settings.lr, warmup_steps=0)
            train(work, train_ds, test_ds, cfg, label="ranking gates", regulariser=masks)

        return learned_scores(model, example, fit, target=max(narrowest**2, 0.02), steps=steps)

    @staticmethod
    def _finetune(
        model: nn.Module,
        trainable: dict[str, torch.Tensor] | None,
        settings: NestSettings,
        context: MethodContext,
        train_ds: Dataset,
        test_ds: Dataset,
        regulariser: JointWidths | None = None,
    ) -> float | None:
        if settings.finetune_epochs <= 0:
            return None
        steps = max(1, round(settings.finetune_epochs * len(train_ds) / context.train.batch_size))
        cfg = dataclasses.replace(context.train, iterations=steps, lr=settings.lr, warmup_steps=0)
        if trainable is not None:  # the shared prefix must not move: no weight decay, its gradients zeroed
            cfg = dataclasses.replace(cfg, weight_decay=0.0)
        hooks = freeze_outside(model, trainable) if trainable is not None else []
        try:
            result = train(model, train_ds, test_ds, cfg, label="fine-tune", regulariser=regulariser)
        finally:
            for hook in hooks:
                hook.remove()
        return result.test_accuracy


def widths_meeting(
    p50: dict[str, float], targets: tuple[float, ...], say: Callable[[str], None] = print
) -> tuple[float, ...]:
    """Per target, the widest width of ``SWEEP`` whose p50 (``p50[f"{width:g}"]``, the full width's under "1") is
    at most that fraction of the full width's; refused in one line when none is, or when two targets share one."""
    chosen = []
    for target in targets:
        meeting = [w for w in SWEEP if p50[f"{w:g}"] <= target * p50["1"]]
        if not meeting:
            raise EdgeshiftError(
                f"no width down to {SWEEP[-1]:g} meets the latency target {target:g} (the narrowest measured "
                f"{p50[f'{SWEEP[-1]:g}'] / p50['1']:.2f}x the full width's p50); ask for a larger target"
            )
        width = meeting[0]
        say(
            f"nest: latency target {target:g} -> width {width:g} (p50 {p50[f'{width:g}']:.3f} ms, "
            f"{p50[f'{width:g}'] / p50['1']:.2f}x the full width's {p50['1']:.3f} ms)"
        )
        chosen.append(width)
    if len(set(chosen)) != len(chosen):
        raise EdgeshiftError(
            f"latency targets {list(targets)} give widths {chosen}: two targets met by the same width; space the "
            "targets further apart"
        )
    return tuple(chosen)
