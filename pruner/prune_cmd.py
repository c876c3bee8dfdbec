"""Library side of ``edgeshift prune``: checkpoint in, pruned checkpoint out."""

from __future__ import annotations

from pathlib import Path

import torch

from .models.sources import ModelSpec
from .models.zoo import input_shape
from .runner import CheckpointJob, Outcome, run_checkpoint
from .structured import PruneReport, prune_zero_channels


def example_inputs_for(model: torch.nn.Module, batch: int = 2, seed: int = 0) -> torch.Tensor:
    """Seeded random inputs shaped like the model's recorded input."""
    return torch.randn(input_shape(model, batch), generator=torch.Generator().manual_seed(seed))


def prune_checkpoint(
    checkpoint: Path | None,
    out: Path,
    *,
    mode: str = "exact",
    batch: int = 2,
    seed: int = 0,
    align: int = 1,
    spec: ModelSpec | None = None,
) -> PruneReport:
    """Prune a checkpoint, or a model source with its weights (``spec``), and save the result."""

    def step(model: torch.nn.Module, payload: dict) -> Outcome[PruneReport]:
        pruned, report = prune_zero_channels(model, example_inputs_for(model, batch, seed), mode=mode, align=align)
        meta = dict(payload.get("meta", {}))
        meta["prune_report"] = {k: v for k, v in report.to_dict().items() if k != "layers"}
        return Outcome(pruned, report, meta)

    return run_checkpoint(CheckpointJob(checkpoint, spec, out), step).report
