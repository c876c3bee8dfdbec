"""Knowledge distillation (Hinton, Vinyals and Dean, 2015) from the model a variant was made from.

A pruned variant fine-tunes toward its source model's softened outputs as well as the labels: the dense model's
outputs carry what it learned about every class, which a short fine-tune on labels alone relearns slowly. The
teacher runs in eval mode without gradients; only the student trains.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from edgeshift.core.errors import EdgeshiftError

__all__ = ["DistillConfig", "Teacher"]


@dataclass(frozen=True)
class DistillConfig:
    """How much of the training loss matches the teacher, and how softened."""

    weight: float = 0.0  # share of the loss matching the teacher's softened outputs, in [0, 1); 0 = labels only
    temperature: float = 4.0  # softmax temperature applied to both models' logits

    def validate(self) -> None:
        if not 0 <= self.weight < 1:
            raise EdgeshiftError(f"the distillation weight is a share of the loss in [0, 1), got {self.weight}")
        if self.temperature <= 0:
            raise EdgeshiftError(f"the distillation temperature must be > 0, got {self.temperature}")

    @property
    def enabled(self) -> bool:
        return self.weight > 0


class Teacher:
    """A frozen model whose softened outputs a student is trained toward."""

    def __init__(self, model: nn.Module, cfg: DistillConfig):
        cfg.validate()
        self.model, self.cfg = model, cfg

    def loss(self, x: torch.Tensor, student_logits: torch.Tensor, task_loss: torch.Tensor) -> torch.Tensor:
        """``(1 - w) * task + w * T^2 * KL(teacher || student)`` at temperature T on the batch ``x``."""
        was = self.model.training
        self.model.eval()
        with torch.no_grad():
            teacher_logits = self.model(x)
        self.model.train(was)
        t = self.cfg.temperature
        kl = F.kl_div(
            F.log_softmax(student_logits / t, dim=1),
            F.log_softmax(teacher_logits / t, dim=1),
            reduction="batchmean",
            log_target=True,
        )
        w = self.cfg.weight
        return (1 - w) * task_loss + w * t * t * kl
