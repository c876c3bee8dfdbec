"""Knowledge distillation from the model a variant was made from: the loss, and its effect."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from device_helpers import ROOT
from torch import nn

from edgeshift.core.errors import EdgeshiftError
from edgeshift.pruner.data import generated_dataset
from edgeshift.pruner.distill import DistillConfig, Teacher
from edgeshift.pruner.train import TrainConfig, to_tensor, train


def small(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )


def test_the_loss_blends_the_task_with_the_teachers_softened_outputs():
    teacher = small(0).eval()
    x = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    task = torch.tensor(2.0)
    with torch.no_grad():
        same = teacher(x)
    assert float(Teacher(teacher, DistillConfig(weight=0.75)).loss(x, same, task)) == pytest.approx(0.5, abs=1e-6)
    other = torch.zeros_like(same)  # uniform student: the KL term is what the teacher's softened outputs differ by
    t = 4.0
    expected_kl = float(
        (F.softmax(same / t, 1) * (F.log_softmax(same / t, 1) + torch.log(torch.tensor(4.0)))).sum(1).mean()
    )
    got = float(Teacher(teacher, DistillConfig(weight=0.5, temperature=t)).loss(x, other, task))
    assert got == pytest.approx(0.5 * 2.0 + 0.5 * t * t * expected_kl, rel=1e-5) and expected_kl > 0


@pytest.mark.parametrize(
    "cfg, message",
    [
        (DistillConfig(weight=1.0), "in [0, 1), got 1.0"),
        (DistillConfig(weight=-0.5), "got -0.5"),
        (DistillConfig(weight=0.5, temperature=0), "temperature must be > 0"),
    ],
)
def test_bad_settings_are_refused(cfg, message):
    with pytest.raises(EdgeshiftError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        cfg.validate()


def test_a_distilled_student_agrees_with_its_teacher_more_than_one_trained_on_labels():
    data = generated_dataset(256, num_classes=4, size=8, seed=3)
    test = generated_dataset(128, num_classes=4, size=8, seed=3, split_seed=1)
    teacher = small(0)
    train(teacher, data, test, TrainConfig(iterations=60, batch_size=32, lr=0.05, augment=False), progress=False)
    teacher.eval()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    data.labels = torch.randint(0, 4, (len(data.labels),), generator=torch.Generator().manual_seed(2)).numpy()
    cfg = TrainConfig(iterations=80, batch_size=32, lr=0.05, augment=False)  # labels now noise: only the teacher helps
    agreement = {}
    for weight in (0.0, 0.9):
        student = small(1)
        train(
            student,
            data,
            test,
            cfg,
            progress=False,
            teacher=Teacher(teacher, DistillConfig(weight=weight)) if weight else None,
        )
        x, _ = to_tensor(test)
        with torch.no_grad():
            agreement[weight] = float((student.eval()(x).argmax(1) == teacher(x).argmax(1)).float().mean())
    assert agreement[0.9] > agreement[0.0] + 0.2, agreement
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())  # weights and BN stats untouched
    assert not teacher.training


class Constant(nn.Module):
    """A teacher certain of one class whatever the image."""

    def __init__(self, label: int):
        super().__init__()
        self.label = label

    def forward(self, x):
        return F.one_hot(torch.full((len(x),), self.label), 10).float() * 20


def test_slim_distills_from_the_teacher_it_is_given(tmp_path):
    """The pipeline slims a block-removed model that has not been fine-tuned; it must learn from the dense model,
    not from that damaged input: ``slim(teacher=...)`` is the one distilled from."""
    from edgeshift.exporter.layer_prices import MacsPricer
    from edgeshift.exporter.profile import OrtMeasurer
    from edgeshift.pruner.models import get
    from edgeshift.pruner.slim import SlimConfig, slim

    data = generated_dataset(200, size=16, seed=5)
    test = generated_dataset(100, size=16, seed=5, split_seed=1)
    torch.manual_seed(0)
    model = get("resnet20", width=8, input_size=16).eval()
    x, _ = to_tensor(test)
    with torch.no_grad():
        rare = int(torch.bincount(model(x).argmax(1), minlength=10).argmin())  # a class the input model rarely says
    quick = tmp_path / "quick.toml"  # host, timed briefly: only the outputs matter here
    host = (Path(ROOT) / "device_profiles" / "host.toml").read_text()
    quick.write_text(
        host.replace('name = "host"', 'name = "quick"')
        .replace("iterations = 2000", "iterations = 20")
        .replace("rounds = 10", "rounds = 2")
        .replace("warmup = 50", "warmup = 2")
    )
    measure = OrtMeasurer(str(quick))
    cfg = SlimConfig(target=0.9, pricing="macs", gate_epochs=1, finetune_epochs=1, lr=0.1, batch_size=50, distill=0.95)
    share = {}
    for name, teacher in (("given", Constant(rare)), ("default", None)):
        student, _ = slim(model, data, test, cfg, pricer=MacsPricer(), measure=measure, teacher=teacher)
        with torch.no_grad():
            share[name] = float((student.eval()(x).argmax(1) == rare).float().mean())
    assert share["given"] > 0.9 and share["default"] < 0.5, share
