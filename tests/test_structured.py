"""Exact structured pruning: every prune is measured against the input model, and re-checked here."""

import pytest
import torch
from helpers import ZOO_CASES, assert_same_function, following_bn, inputs_for, make, plant_zeros, zero_filter
from torch import nn

from edgeshift.core.errors import EdgeshiftError, ModelNotTraceableError
from edgeshift.pruner.checkpoint import load_checkpoint, save_checkpoint
from edgeshift.pruner.structured import prune_zero_channels


def assert_exact(reference, pruned, size, report=None):
    """On fresh inputs (not those the prune saw), both models in float64, within 1e-5 of the output scale: the
    test's own oracle, not the code's 1e-4 gate. The report's deviation must be what was measured, not a claim:
    within the float32 noise of the test's own figure."""
    x = inputs_for(size, batch=3, seed=99)
    assert_same_function(reference, pruned, x)
    if report is not None:
        assert report.max_abs_output > 0 and 0 <= report.max_abs_diff <= 1e-5 * max(1.0, report.max_abs_output)


def name_of(model, module):
    return next(n for n, m in model.named_modules() if m is module)


def widths(model):
    return {n: m.weight.shape[0] for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


@pytest.mark.parametrize("name,kw,size", ZOO_CASES)
def test_planted_zeros_are_removed_exactly_and_reload(name, kw, size, tmp_path):
    model = make(name, kw, size)
    plant_zeros(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruned, report = prune_zero_channels(model, inputs_for(size))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "input model modified"
    assert_exact(model, pruned, size, report)
    assert report.params_after < report.params_before
    assert report.macs_after < report.macs_before
    assert report.channels_removed > 0
    path = save_checkpoint(pruned, tmp_path / "pruned.pt")
    loaded, _ = load_checkpoint(path)
    x = inputs_for(size, seed=5)
    with torch.no_grad():
        assert torch.equal(loaded(x), pruned(x))
    assert widths(loaded) == widths(pruned)


@pytest.mark.parametrize("name,kw,size", [ZOO_CASES[0], ZOO_CASES[3], ZOO_CASES[5], ZOO_CASES[7], ZOO_CASES[9]])
def test_align_rounds_every_width_up_to_a_multiple_of_eight_exactly(name, kw, size, tmp_path):
    model = make(name, kw, size)
    plant_zeros(model)
    x = inputs_for(size)
    plain, _ = prune_zero_channels(model, x)
    aligned, report = prune_zero_channels(model, x, align=8)
    assert_exact(model, aligned, size, report)
    convs = {n: m for n, m in aligned.named_modules() if isinstance(m, nn.Conv2d)}
    linears = [m for m in aligned.modules() if isinstance(m, nn.Linear)]
    assert any(w % 8 for w in widths(plain).values())  # planted zeros leave odd widths: the check below can fail
    assert all(m.out_channels % 8 == 0 and m.in_channels % 8 in (0, 3) for m in convs.values())  # 3: the image
    assert all(m.in_features % 8 == 0 for m in linears)
    before, after = widths(plain), widths(aligned)
    assert all(before[n] <= after[n] < before[n] + 8 for n in convs)  # the smallest multiple, never more
    assert report.align == 8 and report.channels_padded > 0
    assert report.params_after < report.params_before
    path = save_checkpoint(aligned, tmp_path / "aligned.pt")
    loaded, _ = load_checkpoint(path)
    y = inputs_for(size, seed=5)
    with torch.no_grad():
        assert torch.equal(loaded(y), aligned(y))


def test_align_of_one_changes_nothing_and_below_one_is_refused():
    model = make("resnet20", {}, 32)
    plant_zeros(model)
    x = inputs_for(32)
    plain, _ = prune_zero_channels(model, x)
    same, report = prune_zero_channels(model, x, align=1)
    assert widths(same) == widths(plain) and report.channels_padded == 0
    with pytest.raises(EdgeshiftError, match="align must be >= 1"):
        prune_zero_channels(model, x, align=0)


@pytest.mark.parametrize("name,kw,size", [ZOO_CASES[0], ZOO_CASES[3], ZOO_CASES[8]])
def test_dense_model_comes_back_with_the_same_widths(name, kw, size):
    model = make(name, kw, size)
    pruned, report = prune_zero_channels(model, inputs_for(size))
    assert widths(pruned) == widths(model)
    assert report.channels_removed == 0
    assert_exact(model, pruned, size, report)


def test_layer_with_every_filter_zero_keeps_what_the_output_needs():
    model = make("vgg11", {}, 32)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    bns = following_bn(model)
    layer = convs[3]
    for ch in range(layer.out_channels):  # constant channels: zero, negative and positive bias
        zero_filter(layer, bns[layer], ch, (0.0, -1.0, 0.7)[ch % 3])
    pruned, report = prune_zero_channels(model, inputs_for(32))
    assert_exact(model, pruned, 32, report)
    # only the positive-bias channels carry a (constant) signal into the next padded 3x3 conv
    assert widths(pruned)[name_of(model, layer)] == sum(1 for ch in range(layer.out_channels) if ch % 3 == 2)
    # and nothing reads the layer before it any more: it keeps a single channel
    assert widths(pruned)[name_of(model, convs[2])] == 1


def test_layer_that_is_all_zero_keeps_one_channel():
    model = make("vgg11", {}, 32)
    bns = following_bn(model)
    layer = [m for m in model.modules() if isinstance(m, nn.Conv2d)][3]
    for ch in range(layer.out_channels):
        zero_filter(layer, bns[layer], ch, 0.0)
    pruned, report = prune_zero_channels(model, inputs_for(32))
    assert widths(pruned)[name_of(model, layer)] == 1
    assert_exact(model, pruned, 32, report)


def test_residual_stream_channel_goes_only_when_every_producer_is_zero():
    model = make("resnet20", {}, 32)
    bns = following_bn(model)
    stage1 = [model.conv1] + [blk.conv2 for blk in list(model.layers)[:3]]
    for conv in stage1[:-1]:  # all but one producer zero: the channel must stay
        zero_filter(conv, bns[conv], 5, 0.0)
    pruned, report = prune_zero_channels(model, inputs_for(32))
    assert widths(pruned)["conv1"] == 16
    zero_filter(stage1[-1], bns[stage1[-1]], 5, 0.0)
    pruned, report = prune_zero_channels(model, inputs_for(32))
    assert_exact(model, pruned, 32, report)
    assert widths(pruned)["conv1"] == 15
    assert all(widths(pruned)[f"layers.{i}.conv2"] == 15 for i in range(3))


def test_constant_channel_folds_into_a_linear_head():
    model = make("vgg11", {}, 32)
    last = [m for m in model.modules() if isinstance(m, nn.Conv2d)][-1]
    zero_filter(last, following_bn(model)[last], 7, 0.8)  # ReLU(0.8): a constant feature into pool -> fc
    pruned, report = prune_zero_channels(model, inputs_for(32))
    assert report.channels_folded == 1
    assert widths(pruned)[name_of(model, last)] == last.out_channels - 1
    assert_exact(model, pruned, 32, report)


def test_constant_channel_before_a_padded_conv_stays():
    model = make("vgg11", {}, 32)
    conv = [m for m in model.modules() if isinstance(m, nn.Conv2d)][2]
    zero_filter(conv, following_bn(model)[conv], 3, 0.8)
    pruned, report = prune_zero_channels(model, inputs_for(32))
    assert widths(pruned) == widths(model)
    assert_exact(model, pruned, 32, report)


def test_zero_depthwise_filter_after_expansion_is_removed():
    model = make("mobilenetv2", {"small_input": True}, 32)
    block = model.features[3].conv
    dw, dw_bn = block[1][0], block[1][1]
    zero_filter(dw, dw_bn, 11, -0.2)  # ReLU6(-0.2) = 0: the project conv reads zero
    pruned, report = prune_zero_channels(model, inputs_for(32))
    assert widths(pruned)["features.3.conv.1.0"] == dw.out_channels - 1
    assert widths(pruned)["features.3.conv.0.0"] == dw.out_channels - 1  # the expansion follows
    assert_exact(model, pruned, 32, report)


def test_drop_mode_reproduces_the_published_inexact_rule():
    model = make("vgg11", {}, 32)
    bns = following_bn(model)
    conv = [m for m in model.modules() if isinstance(m, nn.Conv2d)][2]
    for ch in range(0, 40):
        zero_filter(conv, bns[conv], ch, 0.8)
    exact, exact_report = prune_zero_channels(model, inputs_for(32))
    dropped, drop_report = prune_zero_channels(model, inputs_for(32), mode="drop")
    assert drop_report.channels_removed == 40 and exact_report.channels_removed == 0
    assert drop_report.rel_diff > 1e-3  # the constant outputs were silently dropped
    assert_exact(model, exact, 32, exact_report)


def test_unknown_mode_names_the_known_ones():
    with pytest.raises(EdgeshiftError, match="exact, drop"):
        prune_zero_channels(make("resnet20", {}, 32), inputs_for(32), mode="fast")


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        if x.sum() > 0:
            return self.conv(x)
        return x


def test_non_traceable_model_is_a_clear_error():
    with pytest.raises(ModelNotTraceableError, match="cannot be traced"):
        prune_zero_channels(DataDependent(), torch.randn(1, 3, 8, 8))
