import pytest
import torch
from helpers import ZOO_CASES, inputs_for, make
from torch import nn

from edgeshift.core.errors import UnknownNameError
from edgeshift.pruner.fuse import fuse_conv_bn
from edgeshift.pruner.metrics import count_params
from edgeshift.pruner.models import get, names


def test_unknown_architecture_names_the_known_ones():
    with pytest.raises(UnknownNameError) as err:
        get("vgg17")
    assert "vgg16" in str(err.value) and "resnet20" in str(err.value)


def test_registry_lists_every_architecture():
    assert set(names()) == {
        "vgg11",
        "vgg16",
        "vgg19",
        "resnet20",
        "resnet56",
        "resnet18",
        "resnet50",
        "mobilenetv2",
        "vit_cifar",
    }


@pytest.mark.parametrize(
    "name,classes,expected",
    [
        ("vgg16", 10, 14.72e6),  # the OpenLTH VGG-16 of DNNShifter's Table 4
        ("resnet20", 10, 0.27e6),
        ("resnet56", 10, 0.85e6),
        ("resnet18", 1000, 11.69e6),
        ("resnet50", 1000, 25.56e6),
        ("mobilenetv2", 1000, 3.50e6),
    ],
)
def test_parameter_counts_match_the_literature(name, classes, expected):
    assert count_params(get(name, num_classes=classes)) == pytest.approx(expected, rel=0.01)


@pytest.mark.parametrize("name,kw,size", ZOO_CASES)
def test_every_zoo_model_runs_and_fuses_exactly(name, kw, size):
    model = make(name, kw, size)
    x = inputs_for(size)
    with torch.no_grad():
        ref = model(x)
        fused = fuse_conv_bn(model)
        out = fused(x)
    assert ref.shape == (2, 10)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules()), "fusion must not touch its input"
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()
