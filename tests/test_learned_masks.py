"""Learned filter masks: gates trained through their binarisation, priced, hardened into exact zeros."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from typer.testing import CliRunner

from edgeshift.cli import app
from edgeshift.core.errors import EdgeshiftError
from edgeshift.pruner.checkpoint import load_checkpoint
from edgeshift.pruner.learned_masks import GateConfig, LearnedMasks
from edgeshift.pruner.slim import choose_alignment
from edgeshift.pruner.structured import prune_zero_channels

runner = CliRunner()


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def batch(seed=0, n=16):
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_gates_receive_gradients_through_the_binarisation():
    torch.manual_seed(0)
    model = Tiny()
    masks = LearnedMasks(model, batch(), GateConfig(target=0.5))
    assert len(masks.logits) == 2 and masks.cost_ratio() == 1.0
    (model(batch()).square().mean() + masks.loss()).backward()
    for logit in masks.logits:
        assert logit.grad is not None and bool((logit.grad != 0).all())


def test_the_price_is_the_macs_of_the_open_channels():
    torch.manual_seed(0)
    model = Tiny()
    masks = LearnedMasks(model, batch(), GateConfig(target=0.5))
    dense = 8 * 8 * (3 * 8 * 9 + 8 * 8 * 9) + 8 * 4
    assert masks.dense_cost == dense
    with torch.no_grad():
        masks.logits[0][:4] = -5.0  # half of conv1's channels closed: conv1 and conv2 both halve
    assert masks.cost_ratio() == pytest.approx((8 * 8 * (3 * 4 * 9 + 4 * 8 * 9) + 8 * 4) / dense)


def test_a_useless_channel_is_closed_and_closed_gates_go_exactly():
    torch.manual_seed(0)
    model = Tiny()
    with torch.no_grad():
        model.conv2.weight[:, 5] = 0  # nobody reads conv1's channel 5: only the price moves its gate
    model.eval()  # batch norms on running statistics: the gated and the hardened model compare exactly
    x = batch(1, 64)
    with torch.no_grad():
        teacher = model(x)  # the dense model's outputs: any useful channel closed moves away from them
    masks = LearnedMasks(model, batch(), GateConfig(target=0.95, warm_start=False))
    masks.plan(200)
    for _ in range(200):  # only the gates learn: keep what the outputs need, close what costs and does nothing
        loss = 1000 * (model(x) - teacher).square().mean() + masks.loss()
        loss.backward()
        masks.after_step()
    shut = (masks.binary()[0] == 0).nonzero().flatten().tolist()
    assert 5 in shut  # no ordering helped it: every gate started at the same logit
    assert masks.cost_ratio() <= 0.95
    with torch.no_grad():
        gated = model(x)
    held = masks.harden()
    assert held["bn1.weight"].tolist() == [float(i not in shut) for i in range(8)]
    with torch.no_grad():
        assert torch.equal(model(x), gated)  # hardened: the same outputs, no hooks left
    pruned, report = prune_zero_channels(model, x)
    assert pruned.conv1.out_channels == 8 - len(shut)
    assert report.rel_diff < 1e-5


def test_gates_open_in_multiples_of_the_alignment_and_the_target_is_met():
    torch.manual_seed(0)
    model = Tiny()
    masks = LearnedMasks(model, batch(), GateConfig(target=0.5, align=4))
    with torch.no_grad():
        masks.logits[0][:3] = -1.0  # 5 of 8 open by their sigmoid: the alignment opens the 3 again
    assert int(masks.binary()[0].sum()) == 8
    with torch.no_grad():
        masks.logits[0][:5] = -1.0  # 3 of 8 open: rounded up to 4
    assert int(masks.binary()[0].sum()) == 4
    assert masks.meet_target() > 0 and masks.cost_ratio() <= 0.5
    assert all(int(b.sum()) % 4 == 0 for b in masks.binary())
    assert masks.floor_ratio == pytest.approx((8 * 8 * (3 * 4 * 9 + 4 * 4 * 9) + 4 * 4) / masks.dense_cost)


def test_bad_gate_settings_and_models_without_groups_are_refused():
    with pytest.raises(EdgeshiftError, match=r"target must be .* in \(0, 1\]"):
        LearnedMasks(Tiny(), batch(), GateConfig(target=1.5))
    with pytest.raises(EdgeshiftError, match="no prunable channel group"):
        LearnedMasks(nn.Sequential(nn.Conv2d(3, 4, 1)), batch(), GateConfig())
    with pytest.raises(EdgeshiftError, match="align >= 1"):
        LearnedMasks(Tiny(), batch(), GateConfig(align=0))


def test_a_padding_is_kept_only_when_it_measured_faster_by_the_margin():
    assert choose_alignment({8: 1.0, 16: 0.9}, trained=8) == 16
    assert choose_alignment({8: 1.0, 16: 0.98}, trained=8) == 8  # 2% is within the margin: not worth the weights
    assert choose_alignment({8: 1.0, 16: 1.2}, trained=8) == 8
    assert choose_alignment({8: 1.0}, trained=8) == 8


def test_slim_times_its_widths_padded_and_keeps_the_faster_exactly(tmp_path):
    from pathlib import Path

    from edgeshift.exporter.layer_prices import MacsPricer
    from edgeshift.exporter.profile import OrtMeasurer
    from edgeshift.pruner.data import generated_dataset
    from edgeshift.pruner.models import get
    from edgeshift.pruner.slim import SlimConfig, slim

    data, test = generated_dataset(128, size=16, seed=3), generated_dataset(64, size=16, seed=3, split_seed=1)
    torch.manual_seed(0)
    dense = get("resnet20", input_size=16).eval()
    quick = tmp_path / "quick.toml"  # host, timed briefly: which alignment wins does not matter, only consistency
    host = (Path(__file__).parents[1] / "device_profiles" / "host.toml").read_text()
    quick.write_text(
        host.replace('name = "host"', 'name = "quick"')
        .replace("iterations = 2000", "iterations = 40")
        .replace("rounds = 10", "rounds = 4")
        .replace("warmup = 50", "warmup = 5")
    )
    cfg = SlimConfig(target=0.4, pricing="macs", gate_epochs=1, finetune_epochs=0, batch_size=32, align=4, pad_to=16)
    pruned, report = slim(dense, data, test, cfg, pricer=MacsPricer(), measure=OrtMeasurer(str(quick)))
    assert set(report.align_p50_ms) == {"4", "16"}, report.align_p50_ms  # some group is not a multiple of 16
    assert report.align == choose_alignment({int(a): ms for a, ms in report.align_p50_ms.items()}, trained=4)
    assert report.p50_slim_ms == report.align_p50_ms[str(report.align)]
    widths = [m.out_channels for m in pruned.modules() if isinstance(m, nn.Conv2d)]
    dense_widths = [m.out_channels for m in dense.modules() if isinstance(m, nn.Conv2d)]
    assert all(w % report.align == 0 or w == d for w, d in zip(widths, dense_widths)), widths
    assert sum(widths) < sum(dense_widths) and report.max_rel_deviation < 1e-5
    assert f"kept multiples of {report.align}" in report.table()


def test_slim_refuses_a_bad_pad_multiple():
    from edgeshift.pruner.slim import SlimConfig

    with pytest.raises(EdgeshiftError, match="pad_to is a channel multiple >= 1"):
        SlimConfig(pad_to=0).validate()


# -- `edgeshift slim` ----------------------------------------------------------------------------------------

NO_GROUP = """
from torch import nn


def build(num_classes=10):
    return nn.Sequential(nn.Conv2d(3, num_classes, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """ResNet-20 trained briefly on the generated data (a checkpoint, as `edgeshift train` writes it)."""
    path = tmp_path_factory.mktemp("slim") / "dense.pt"
    result = runner.invoke(
        app,
        [
            "train",
            "--arch",
            "resnet20",
            "--data",
            "generated",
            "--iterations",
            "40",
            "--batch-size",
            "32",
            "--lr",
            "0.05",
            "--train-samples",
            "400",
            "-o",
            str(path),
        ],
    )
    assert result.exit_code == 0, result.output
    return path


def test_slim_meets_the_target_under_host_and_prunes_exactly(trained, tmp_path):
    out, js = tmp_path / "slim.pt", tmp_path / "slim.json"
    result = runner.invoke(
        app,
        [
            "slim",
            str(trained),
            "--target",
            "0.8",
            "--data",
            "generated",
            "--align",
            "1",
            "--gate-epochs",
            "4",
            "--epochs",
            "1",
            "--train-samples",
            "400",
            "--test-samples",
            "100",
            "-o",
            str(out),
            "--json",
            str(js),
        ],
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(js.read_text())
    assert doc["pricing"] == "latency" and doc["price_unit"] == "ms" and doc["profile"] == "host"
    assert 0.72 <= doc["predicted_ratio"] <= 0.8  # the target met within 10% by the price measured under host
    assert doc["max_rel_deviation"] < 1e-5 and doc["gates_closed"] > 0
    assert set(doc["shares"]) and all(0 < v <= 1 for v in doc["shares"].values())
    model, payload = load_checkpoint(out)
    assert payload["meta"]["slim"]["target"] == 0.8
    assert sum(p.numel() for p in model.parameters()) == doc["params_after"] < doc["params_before"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--target", "1.5"], "the target is a fraction of the dense model's cost in (0, 1], got 1.5"),
        (["--target", "0"], "in (0, 1], got 0.0"),
        (["--target", "0.5", "--data", "no/such/folder"], "no/such/folder"),
        (["--target", "0.5", "--distill", "-0.1"], "distillation weight is a share of the loss in [0, 1), got -0.1"),
    ],
)
def test_slim_bad_input_is_one_line_and_writes_nothing(trained, args, message, tmp_path):
    data = [] if "--data" in args else ["--data", "generated"]
    result = runner.invoke(app, ["slim", str(trained), *data, *args, "-o", str(tmp_path / "x.pt")])
    lines = [line for line in result.output.splitlines() if line.strip() and not line.startswith("loading")]
    assert result.exit_code == 2 and len(lines) == 1 and message in lines[0], result.output
    assert not (tmp_path / "x.pt").exists()


def test_slim_refuses_a_model_with_no_prunable_group(tmp_path, monkeypatch):
    (tmp_path / "nogroup.py").write_text(NO_GROUP)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    result = runner.invoke(
        app,
        [
            "slim",
            "--arch",
            "nogroup:build",
            "--input-size",
            "16",
            "--target",
            "0.5",
            "--data",
            "generated",
            "-o",
            str(tmp_path / "x.pt"),
        ],
    )
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and "no prunable channel group" in lines[0], result.output
    assert not (tmp_path / "x.pt").exists()
