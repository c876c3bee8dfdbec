"""What the pruner needs measured on the device, as a small typed interface.

Pruning at initialisation and layer pruning report latency and accuracy through ONNX Runtime, but the pruner sits
below the exporter, which owns export and timing. So they take a ``ModelMeasurer`` as a parameter; the exporter's
``OrtMeasurer`` (``edgeshift.exporter.profile``) is the implementation, built by the commands and the pipeline.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch
from torch import nn


class ModelMeasurer(Protocol):
    """Measures a torch model as the device will run it (exported to ONNX, under a device profile)."""

    @property
    def profile_name(self) -> str:
        """The device profile the figures are measured under."""
        ...

    @property
    def batch_size(self) -> int:
        """The batch the device serves (the profile's serving.batch_size)."""
        ...

    def latency(self, model: nn.Module, example_inputs: torch.Tensor) -> tuple[dict, int]:
        """(p50_ms/p95_ms/p99_ms/throughput/batch/calls, ONNX bytes) for batches shaped like ``example_inputs``."""
        ...

    def latencies(self, models: dict[str, nn.Module], example_inputs: torch.Tensor) -> dict[str, dict]:
        """Each model's p50_ms/p95_ms/... timed against the others in one interleaved run (for comparisons)."""
        ...

    def top1(self, model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
        """Top-1 accuracy on preprocessed inputs ``x`` (float32 NCHW) and labels ``y``."""
        ...
