"""Residual blocks found by what they compute, whatever the model's code looks like: a ResNet written the plain way
(blocks in an ``nn.ModuleList``, the add in ``forward``, no ``shortcut`` attribute) and one written as torchvision
writes it (``out += identity``, a ``downsample`` attribute) both lose blocks through ``layerprune``; without
fine-tuning the result is exactly the input model with those blocks' residual branches at zero (the test's own
oracle), and downsampling blocks are never candidates."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_same_function
from torch import nn
from typer.testing import CliRunner

from edgeshift.cli import app
from edgeshift.pruner.checkpoint import load_checkpoint
from edgeshift.pruner.layers import find_candidates

MODELS = '''
import torch
from torch import nn


class Plain(nn.Module):
    """The way a user writes one: a list of blocks, the identity added in forward."""

    def __init__(self, width):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU(), nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width))

    def forward(self, x):
        return torch.relu(self.body(x) + x)


class PlainResNet(nn.Module):
    def __init__(self, num_classes=10, width=8, depth=3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.blocks = nn.ModuleList(Plain(width) for _ in range(depth))
        self.down = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.more = nn.ModuleList(Plain(2 * width) for _ in range(depth))
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        x = torch.relu(self.down(x))
        for block in self.more:
            x = block(x)
        return self.fc(x.mean((2, 3)))


class BasicBlock(nn.Module):
    """torchvision's BasicBlock, as torchvision writes it."""

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out


class TorchvisionStyle(nn.Module):
    def __init__(self, num_classes=10, width=8):
        super().__init__()
        self.conv1, self.bn1, self.relu = nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), \\
            nn.ReLU(inplace=True)
        down = nn.Sequential(nn.Conv2d(width, 2 * width, 1, 2, bias=False), nn.BatchNorm2d(2 * width))
        self.layer1 = nn.Sequential(BasicBlock(width, width), BasicBlock(width, width))
        self.layer2 = nn.Sequential(BasicBlock(width, 2 * width, 2, down), BasicBlock(2 * width, 2 * width))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def plain(num_classes=10, width=8):
    return PlainResNet(num_classes, width)


def torchvision_style(num_classes=10, width=8):
    return TorchvisionStyle(num_classes, width)
'''

BLOCKS = {
    "plain": ["blocks.0", "blocks.1", "blocks.2", "more.0", "more.1", "more.2"],
    "torchvision_style": ["layer1.0", "layer1.1", "layer2.1"],
}  # layer2.0 downsamples: never a candidate


@pytest.fixture
def user_dir(tmp_path, monkeypatch):
    (tmp_path / "resnets.py").write_text(MODELS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def last_bn(block: nn.Module) -> nn.BatchNorm2d:
    return [m for m in block.modules() if isinstance(m, nn.BatchNorm2d)][-1]


@pytest.mark.parametrize("factory", ["plain", "torchvision_style"])
def test_identity_blocks_are_candidates_whatever_the_code_looks_like(user_dir, factory):
    import resnets

    model = getattr(resnets, factory)().eval()
    found = find_candidates(model, torch.randn(1, 3, 16, 16))
    assert [c.name for c in found if c.kind == "block"] == BLOCKS[factory]


@pytest.mark.parametrize("factory", ["plain", "torchvision_style"])
def test_layerprune_removes_two_blocks_exactly_without_fine_tuning(user_dir, factory):
    import resnets

    torch.manual_seed(0)
    model = getattr(resnets, factory)().eval()
    with torch.no_grad():  # trained-looking statistics, so the branches are not near zero by accident
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
    torch.save(model.state_dict(), user_dir / "w.pt")
    result = CliRunner().invoke(
        app,
        [
            "layerprune",
            "--arch",
            f"resnets:{factory}",
            "--weights",
            "w.pt",
            "--input-size",
            "16",
            "--num-classes",
            "10",
            "--criterion",
            "weight-norm",
            "--remove",
            "2",
            "--epochs",
            "0",
            "--data",
            "generated",
            "--test-samples",
            "20",
            "--imprint-samples",
            "20",
            "--json",
            "lp.json",
            "-o",
            "lp.pt",
        ],
    )
    assert result.exit_code == 0, result.output
    pruned, _ = load_checkpoint(user_dir / "lp.pt")
    removed = [name for name in BLOCKS[factory] if isinstance(pruned.get_submodule(name), nn.Identity)]
    assert len(removed) == 2, removed
    # the oracle: the input model with those blocks' residual branches at zero (each adds onto a ReLU's output,
    # so relu(0 + x) = x): exactly what removing them computes
    zeroed = getattr(resnets, factory)().eval()
    zeroed.load_state_dict(model.state_dict())
    with torch.no_grad():
        for name in removed:
            bn = last_bn(zeroed.get_submodule(name))
            bn.weight.zero_()
            bn.bias.zero_()
    assert_same_function(zeroed, pruned, torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(9)))


def test_a_model_without_identity_blocks_is_refused_naming_what_was_looked_for(user_dir):
    (user_dir / "flat.py").write_text(
        "from torch import nn\n"
        "def build(num_classes=10):\n"
        "    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.LazyLinear(num_classes))\n"
    )
    result = CliRunner().invoke(
        app,
        [
            "layerprune",
            "--arch",
            "flat:build",
            "--input-size",
            "16",
            "--criterion",
            "weight-norm",
            "--remove",
            "1",
            "--epochs",
            "0",
            "--data",
            "generated",
            "-o",
            "x.pt",
        ],
    )
    assert result.exit_code == 2 and "y = f(x) + x" in result.output, result.output
