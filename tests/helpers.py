"""Shared test helpers: small zoo models with planted sparsity patterns."""

from __future__ import annotations

import torch
from torch import nn

from edgeshift.pruner.models import get

# (name, kwargs, input size) small enough for a fast suite; every zoo architecture appears.
ZOO_CASES = [
    ("vgg11", {}, 32),
    ("vgg16", {}, 32),
    ("vgg19", {}, 32),
    ("resnet20", {}, 32),
    ("resnet56", {}, 32),
    ("resnet18", {"stem": "cifar"}, 32),
    ("resnet18", {}, 64),
    ("resnet50", {"stem": "cifar"}, 32),
    ("mobilenetv2", {"small_input": True}, 32),
    ("mobilenetv2", {"width_mult": 0.5}, 64),
]


def make(name: str, kw: dict, size: int, num_classes: int = 10, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = get(name, num_classes=num_classes, input_size=size, **kw)
    randomise_bn(model, seed)
    return model.eval()


@torch.no_grad()
def randomise_bn(model: nn.Module, seed: int = 0) -> None:
    """Give BatchNorms trained-looking statistics so fusion is not a no-op."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            assert (
                m.running_mean is not None and m.running_var is not None and m.weight is not None and m.bias is not None
            )
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.copy_(torch.randn(n, generator=g) * 0.1)


def following_bn(model: nn.Module) -> dict[nn.Conv2d, nn.BatchNorm2d]:
    from edgeshift.pruner.fuse import conv_bn_pairs

    pairs = {model.get_submodule(c): model.get_submodule(b) for c, b in conv_bn_pairs(model)}
    return {c: b for c, b in pairs.items() if isinstance(c, nn.Conv2d) and isinstance(b, nn.BatchNorm2d)}


@torch.no_grad()
def zero_filter(conv: nn.Conv2d, bn: nn.BatchNorm2d | None, ch: int, fused_bias: float) -> None:
    """Zero output channel ``ch`` of ``conv`` and set its BN so the fused bias is exactly ``fused_bias``."""
    conv.weight[ch] = 0
    if conv.bias is not None:
        conv.bias[ch] = 0
    if bn is not None:
        assert (
            bn.running_mean is not None and bn.running_var is not None and bn.weight is not None and bn.bias is not None
        )
        bn.running_mean[ch] = 0
        bn.bias[ch] = fused_bias
    elif conv.bias is not None:
        conv.bias[ch] = fused_bias


@torch.no_grad()
def plant_zeros(model: nn.Module, seed: int = 0, frac: float = 0.3) -> None:
    """Plant every removable pattern: zero filters with zero, negative and positive fused bias, zero input
    slices of convs and of the linear head, zero depthwise filters, in every stage."""
    g = torch.Generator().manual_seed(seed)
    bns = following_bn(model)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    for i, conv in enumerate(convs):
        if i == 0:
            continue  # keep the stem whole
        n = conv.out_channels
        chosen = torch.randperm(n, generator=g)[: max(1, int(n * frac))].tolist()
        for j, ch in enumerate(chosen):
            bias = (0.0, -0.5, 0.5)[j % 3]
            zero_filter(conv, bns.get(conv), ch, bias)
        if conv.groups == 1 and conv.in_channels > 4:
            k = torch.randint(0, conv.in_channels, (max(1, conv.in_channels // 8),), generator=g)
            conv.weight[:, k] = 0
    for m in model.modules():
        if isinstance(m, nn.Linear):
            k = torch.randint(0, m.in_features, (max(1, m.in_features // 8),), generator=g)
            m.weight[:, k] = 0


def inputs_for(size: int, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


EXACT_RTOL = 1e-5  # of the output's scale: float64 against float64, far inside the code's own 1e-4 gate


@torch.no_grad()
def assert_same_function(reference: nn.Module, candidate: nn.Module, x: torch.Tensor, rtol: float = EXACT_RTOL):
    """The test's own oracle for 'exact': both models run in float64 (copies; the callers' are untouched) on ``x``,
    inputs the code under test did not see, and agree within ``rtol`` of the reference's output scale."""
    import copy

    ref64, cand64 = copy.deepcopy(reference).eval().double(), copy.deepcopy(candidate).eval().double()
    want, got = ref64(x.double()), cand64(x.double())
    assert got.shape == want.shape, (got.shape, want.shape)
    deviation = float((got - want).abs().max())
    assert deviation <= rtol * max(1.0, float(want.abs().max())), deviation


def assert_onnx_computes(onnx_model, reference: nn.Module, x: torch.Tensor, rtol: float = 1e-4):
    """The test's own oracle for an export: ONNX Runtime's float32 output of ``onnx_model`` (bytes or a path) against
    the torch model in float64, within ``rtol`` of the output scale."""
    import copy

    import numpy as np
    import onnxruntime as ort

    model = onnx_model if isinstance(onnx_model, bytes) else open(onnx_model, "rb").read()
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    with torch.no_grad():
        want = copy.deepcopy(reference).eval().double()(x.double()).numpy()
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0].astype(np.float64)
    deviation = float(np.abs(got - want).max())
    assert deviation <= rtol * max(1.0, float(np.abs(want).max())), deviation
