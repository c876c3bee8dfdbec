"""The one way a build command turns a model into a checkpoint: load the model (an edgeshift checkpoint, or a model
source with its weights), run one step on it, and write the result (checkpoint and JSON report) atomically;
nothing is written unless the step succeeds."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import torch
from torch import nn

from edgeshift.core.atomic import write_text_atomic

from .checkpoint import load_model, save_checkpoint
from .models.sources import ModelSpec


class Report(Protocol):
    def to_dict(self) -> dict[str, Any]: ...


R = TypeVar("R", bound=Report)


@dataclass(frozen=True)
class CheckpointJob:
    """Where a command's model comes from and where its result goes."""

    checkpoint: Path | None  # an edgeshift checkpoint ...
    spec: ModelSpec | None  # ... or a model source with its weights: exactly one of the two
    out: Path  # the checkpoint to write
    json_out: Path | None = None  # also the step's report as JSON

    @property
    def source(self) -> str:
        """What the result was made from, in words (the checkpoint, the weights or the model source)."""
        if self.checkpoint is not None:
            return str(self.checkpoint)
        assert self.spec is not None
        return str(self.spec.weights or self.spec.source)


@dataclass
class Outcome(Generic[R]):
    """What a step made: the model to save, its report, and what the checkpoint records with it."""

    model: nn.Module
    report: R
    meta: dict[str, Any] = field(default_factory=dict)
    masks: dict[str, torch.Tensor] | None = None


def write_outcome(out: str | os.PathLike, outcome: Outcome[Any], json_out: Path | None = None) -> None:
    """Write the checkpoint (and the JSON report), each atomically."""
    save_checkpoint(outcome.model, out, masks=outcome.masks, meta=outcome.meta)
    if json_out is not None:
        write_text_atomic(json_out, json.dumps(outcome.report.to_dict(), indent=2))


def run_checkpoint(job: CheckpointJob, step: Callable[[nn.Module, dict[str, Any]], Outcome[R]]) -> Outcome[R]:
    """Load the job's model, run ``step(model, checkpoint payload)``, record where the result came from, write it."""
    model, payload = load_model(job.checkpoint, job.spec)
    outcome = step(model, payload)
    outcome.meta["pruned_from"] = job.source
    write_outcome(job.out, outcome, job.json_out)
    return outcome
