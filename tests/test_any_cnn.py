"""Exact pruning on the patterns real CNNs use, each on a small model of its own with planted zero and
constant channels: exact on fresh inputs, the expected widths removed, and a reason where a group is kept."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgeshift.pruner.fuse import NormActRemainder
from edgeshift.pruner.structured import prune_zero_channels


def fresh(shape=(2, 3, 16, 16), seed=7):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def plant(bn: nn.BatchNorm2d, zero=(), constant=(), value=0.7):
    """Channels ``zero`` exactly 0 after the norm, channels ``constant`` equal to ``value``."""
    assert bn.running_mean is not None and bn.running_var is not None and bn.weight is not None and bn.bias is not None
    bn.running_var.uniform_(0.5, 1.5)
    bn.running_mean.normal_(0, 0.1)
    for c in zero:
        bn.weight[c], bn.bias[c] = 0.0, 0.0
    for c in constant:
        bn.weight[c], bn.bias[c] = 0.0, value


def check_exact(model, pruned, x_shape=(2, 3, 16, 16)):
    model.eval()
    with torch.no_grad():
        for seed in (11, 12):
            x = fresh(x_shape, seed)
            ref, out = model(x), pruned(x)
            assert torch.allclose(ref, out, atol=1e-5 * max(1.0, float(ref.abs().max()))), float(
                (ref - out).abs().max()
            )


def widths(model) -> dict[str, int]:
    return {n: m.weight.shape[0] for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


class BNAct(nn.BatchNorm2d):
    """A norm+activation module (the shape of timm's BatchNormAct2d): batch norm, then drop, then act."""

    def __init__(self, c, act):
        super().__init__(c)
        self.drop = nn.Identity()
        self.act = act

    def forward(self, x):
        return self.act(self.drop(super().forward(x)))


class NormActNet(nn.Module):
    def __init__(self, act=nn.SiLU):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), BNAct(8, act())
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 1), BNAct(8, act())
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.bn2(self.conv2(self.bn1(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("act", [nn.ReLU, nn.SiLU, nn.Hardswish, nn.GELU])
def test_norm_act_module_is_fused_and_its_zero_channels_go(act):
    model = NormActNet(act).eval()
    plant(model.bn1, zero=[1, 4], constant=[6])  # the constant one folds into conv2's bias (a 1x1 conv)
    plant(model.bn2, zero=[0, 2, 3])
    pruned, report = prune_zero_channels(model, fresh())
    assert isinstance(pruned.bn1, NormActRemainder) and isinstance(pruned.bn2, NormActRemainder)
    assert widths(pruned)["conv1"] == 5 and widths(pruned)["conv2"] == 5
    assert report.channels_folded == 1
    check_exact(model, pruned)


class SENet(nn.Module):
    """conv -> BN -> SiLU -> squeeze-excitation gate (x * sigmoid(...)) -> conv."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.reduce, self.expand = nn.Conv2d(8, 2, 1), nn.Conv2d(2, 8, 1)
        self.conv2 = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        x = F.silu(self.bn1(self.conv1(x)))
        gate = torch.sigmoid(self.expand(F.relu(self.reduce(x.mean((2, 3), keepdim=True)))))
        return self.conv2(x * gate).mean((2, 3))


def test_squeeze_excitation_gate_keeps_zero_channels_zero():
    model = SENet().eval()
    plant(model.bn1, zero=[0, 5, 7])
    pruned, _ = prune_zero_channels(model, fresh())
    # the zero channels go from conv1, from what the gate reads and from what it writes
    assert widths(pruned)["conv1"] == 5 and pruned.reduce.in_channels == 5 and widths(pruned)["expand"] == 5
    check_exact(model, pruned)


class GroupedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8)
        self.grouped, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, groups=4), nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.conv3 = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.grouped(x)))
        return self.conv3(F.relu(self.dw(x))).mean((2, 3))


def test_grouped_conv_loses_whole_groups_only_and_depthwise_follows():
    model = GroupedNet().eval()
    plant(model.bn1, zero=[2, 3, 4])  # group 1 (channels 2, 3) whole; channel 4 alone in group 2
    plant(model.bn2, zero=[2, 3, 6])  # the grouped conv's group 1 outputs are zero too
    pruned, report = prune_zero_channels(model, fresh())
    assert pruned.grouped.groups == 3 and pruned.grouped.in_channels == 6 and pruned.grouped.out_channels == 6
    assert widths(pruned)["conv1"] == 6  # channel 4 stays: it does not fill its group
    assert widths(pruned)["dw"] == 6  # channel 6 is a grouped conv output: alone in its group, it stays
    assert any("grouped conv" in note for note in report.notes)
    check_exact(model, pruned)
    aligned, _ = prune_zero_channels(model, fresh(), align=4)  # alignment leaves groups through a grouped conv
    assert aligned.grouped.groups == 3 and widths(aligned)["conv1"] == 6 and widths(aligned)["dw"] == 6
    check_exact(model, aligned)


class WideGroupedNet(nn.Module):
    """A ResNeXt-style bottleneck: 1x1 conv, grouped 3x3 conv (3 groups of 4), 1x1 conv."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 12, 1), nn.BatchNorm2d(12)
        self.grouped, self.bn2 = nn.Conv2d(12, 12, 3, padding=1, groups=3), nn.BatchNorm2d(12)
        self.conv3 = nn.Conv2d(12, 4, 1)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        return self.conv3(F.relu(self.bn2(self.grouped(x)))).mean((2, 3))


def test_grouped_conv_loses_equally_many_channels_from_every_group():
    model = WideGroupedNet().eval()
    plant(model.bn1, zero=[0, 5, 6, 9])  # per group 1, 2, 1 zero inputs: one goes from each group
    plant(model.bn2, zero=[1, 2, 4, 8, 11])  # per group 2, 1, 2 zero outputs: one goes from each group
    pruned, report = prune_zero_channels(model, fresh())
    assert pruned.grouped.groups == 3 and pruned.grouped.in_channels == 9 and pruned.grouped.out_channels == 9
    assert widths(pruned)["conv1"] == 9 and pruned.conv3.in_channels == 9
    assert tuple(pruned.grouped.weight.shape) == (9, 3, 3, 3)
    assert any("same number of channels from every group" in note for note in report.notes)
    check_exact(model, pruned)
    dropped, _ = prune_zero_channels(model, fresh(), mode="drop")  # the published rule keeps groups equal too
    assert dropped.grouped.groups == 3 and dropped.grouped.out_channels == 9


class SplitNet(nn.Module):
    """Res2Net / CSP / Ghost: channels split into chunks, each processed, concatenated again."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8)
        self.branch = nn.Conv2d(4, 4, 3, padding=1)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        a, b = torch.chunk(x, 2, dim=1)
        x = torch.cat([self.branch(a), b], dim=1)
        x = F.relu(self.bn2(self.conv2(x)))
        return self.conv3(x).mean((2, 3))


def test_a_chunked_group_loses_equally_many_channels_from_every_chunk():
    model = SplitNet().eval()
    plant(model.bn1, zero=[1, 2, 6])  # chunk a: 1 and 2, chunk b: 6 -> one from each
    plant(model.bn2, zero=[0, 3, 5])
    pruned, report = prune_zero_channels(model, fresh())
    assert widths(pruned)["conv1"] == 6 and pruned.branch.in_channels == 3 and widths(pruned)["branch"] == 4
    assert widths(pruned)["conv2"] == 5 and pruned.conv2.in_channels == 7  # branch's 4 and chunk b's 3
    assert any("chunks must lose equally many" in note for note in report.notes), report.notes
    check_exact(model, pruned)


class Res2Block(nn.Module):
    """Res2Net's bottleneck: chunks of ``self.width`` channels, each added to the previous branch's output
    (``first``: not added), the last passed on, all concatenated."""

    def __init__(self, first: bool, width: int = 4, scale: int = 3):
        super().__init__()
        self.width, self.first = width, first
        self.conv1, self.bn1 = nn.Conv2d(3, width * scale, 1), nn.BatchNorm2d(width * scale)
        self.convs = nn.ModuleList(nn.Conv2d(width, width, 3, padding=1) for _ in range(scale - 1))
        self.bns = nn.ModuleList(nn.BatchNorm2d(width) for _ in range(scale - 1))
        self.conv3 = nn.Conv2d(width * scale, 4, 1)

    def forward(self, x):
        spx = torch.split(F.relu(self.bn1(self.conv1(x))), self.width, 1)
        outs, sp = [], None
        for i, (conv, bn) in enumerate(zip(self.convs, self.bns)):
            sp = spx[i] if i == 0 or self.first else sp + spx[i]
            sp = F.relu(bn(conv(sp)))
            outs.append(sp)
        return self.conv3(torch.cat(outs + [spx[-1]], 1)).mean((2, 3))


@pytest.mark.parametrize("first", [True, False])
def test_res2net_split_at_a_width_attribute_loses_equally_from_every_chunk(first):
    model = Res2Block(first).eval()
    # chunks 0..3, 4..7, 8..11: one zero channel goes from each; chunk 1 is added to convs.0's output, so there
    # a channel goes only where both are zero (5 and convs.0's 1)
    plant(model.bn1, zero=[1, 2, 5, 9, 10])
    plant(model.bns[0], zero=[1, 3])
    plant(model.bns[1], zero=[0])
    pruned, _ = prune_zero_channels(model, fresh())
    assert pruned.width == 3 and widths(pruned)["conv1"] == 9  # the block's own split width follows
    assert widths(pruned)["convs.1"] == 3  # its zero channel 0 goes (convs.1 feeds only the concatenation)
    # first: both of convs.0's zero channels go; else it is coupled to chunk 1 by the add: only 1 (with 5)
    assert widths(pruned)["convs.0"] == (2 if first else 3)
    assert pruned.conv3.in_channels == widths(pruned)["convs.0"] + 3 + 3
    check_exact(model, pruned)


class ShuffleNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        n, c, h, w = x.shape
        x = x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)  # channel shuffle
        x = F.relu(self.bn2(self.conv2(x)))
        return self.conv3(x).mean((2, 3))


def test_channel_shuffle_is_exact_and_says_why_its_group_stays():
    model = ShuffleNet().eval()
    plant(model.bn1, zero=[2, 7])
    plant(model.bn2, zero=[1, 4])
    pruned, report = prune_zero_channels(model, fresh())
    assert widths(pruned)["conv2"] == 6
    assert widths(pruned)["conv1"] == 8 and report.notes
    check_exact(model, pruned)


class PartialResidualNet(nn.Module):
    """ReXNet: the shortcut is added onto the first channels only."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 6, 1), nn.BatchNorm2d(6)
        self.conv3, self.bn3 = nn.Conv2d(6, 6, 1), nn.BatchNorm2d(6)
        self.conv4 = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(x))
        y = torch.cat([y[:, :4] + x, y[:, 4:]], dim=1)
        y = F.relu(self.bn3(self.conv3(y)))
        return self.conv4(y).mean((2, 3))


def test_residual_add_onto_part_of_the_channels_is_exact_and_bounded():
    model = PartialResidualNet().eval()
    plant(model.bn2, zero=[1, 5])
    plant(model.bn3, zero=[0, 2])
    pruned, report = prune_zero_channels(model, fresh())
    assert widths(pruned)["conv3"] == 4  # the plain group still shrinks
    # bounded: the group added onto part of the channels is recognised and kept whole, with its reason (the search
    # that once ran for minutes here stops at the slice), rather than timed
    assert report.notes == [
        "kept the 4 channels of conv1, conv2 whole: its channels pass a channel slice after conv1, conv2"
    ]
    check_exact(model, pruned)


class PreActNet(nn.Module):
    """DenseNet-style BN -> ReLU -> conv on a concatenation: the BN cannot fold into a conv before it."""

    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv1 = nn.Conv2d(6, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(10)
        self.conv2 = nn.Conv2d(10, 4, 1)

    def forward(self, x):
        x = self.conv0(x)
        x = torch.cat([x, self.conv1(F.relu(x))], dim=1)
        return self.conv2(F.relu(self.bn(x))).mean((2, 3))


def test_pre_activation_bn_stays_and_unread_channels_still_go():
    model = PreActNet().eval()
    plant(model.bn)
    with torch.no_grad():
        model.conv2.weight[:, [7, 9]] = 0  # nobody reads conv1's channels 1 and 3
    pruned, _ = prune_zero_channels(model, fresh())
    assert widths(pruned)["conv1"] == 2 and pruned.bn.num_features == 8
    check_exact(model, pruned)


class GroupNormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.gn = nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = F.relu(self.gn(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.conv3(x).mean((2, 3))


def test_group_norm_group_stays_whole_and_the_rest_is_pruned():
    model = GroupNormNet().eval()
    with torch.no_grad():
        model.gn.weight[[1, 2]] = 0
        model.gn.bias[[1, 2]] = 0  # zero after the norm, but the norm's statistics read them
    plant(model.bn2, zero=[0, 6])
    pruned, report = prune_zero_channels(model, fresh())
    assert widths(pruned)["conv1"] == 8 and widths(pruned)["conv2"] == 6
    assert any("GroupNorm" in note for note in report.notes), report.notes
    check_exact(model, pruned)


class RepBlock(nn.Module):
    """A RepVGG block: 3x3 conv+BN, 1x1 conv+BN and an identity BN, summed; ``reparameterize`` folds them into one
    3x3 conv the way timm's blocks do (and the prune checks the fold is exact)."""

    def __init__(self, c):
        super().__init__()
        self.k3, self.b3 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.k1, self.b1 = nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c)
        self.bid = nn.BatchNorm2d(c)
        self.fused = None

    @staticmethod
    def _fold(weight, bn):
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        return weight * scale.reshape(-1, 1, 1, 1), bn.bias - bn.running_mean * scale

    @torch.no_grad()
    def reparameterize(self):
        c = self.k3.in_channels
        w3, bias3 = self._fold(self.k3.weight, self.b3)
        w1, bias1 = self._fold(F.pad(self.k1.weight, [1, 1, 1, 1]), self.b1)
        eye = torch.zeros(c, c, 3, 3)
        eye[range(c), range(c), 1, 1] = 1.0
        wid, biasid = self._fold(eye, self.bid)
        self.fused = nn.Conv2d(c, c, 3, padding=1)
        self.fused.weight.copy_(w3 + w1 + wid)
        self.fused.bias.copy_(bias3 + bias1 + biasid)
        del self.k3, self.b3, self.k1, self.b1, self.bid

    def forward(self, x):
        if self.fused is not None:
            return F.relu(self.fused(x))
        return F.relu(self.b3(self.k3(x)) + self.b1(self.k1(x)) + self.bid(x))


class RepNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.block = RepBlock(6)
        self.head = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        return self.head(self.block(F.relu(self.bn(self.stem(x))))).mean((2, 3))


def test_reparameterisable_block_is_folded_into_one_conv_then_pruned(tmp_path, monkeypatch):
    model = RepNet().eval()
    for bn in (model.block.b3, model.block.b1, model.block.bid):
        plant(bn, zero=[1, 4])  # channels 1 and 4 zero in every branch: zero after the sum
    plant(model.bn)
    pruned, report = prune_zero_channels(model, fresh())
    assert pruned.block.fused is not None and not any(isinstance(m, nn.BatchNorm2d) for m in pruned.modules())
    assert pruned.block.fused.out_channels == 4
    check_exact(model, pruned)


def test_group_analysis_that_does_not_settle_is_bounded_and_named(monkeypatch):
    from edgeshift.pruner.structured import groups

    monkeypatch.setattr(groups, "_MAX_GROUP_ITEMS", 3)  # every real group here has more items than this
    groups.STRUCTURE_CACHE.clear()
    model = SENet().eval()
    plant(model.bn1, zero=[0, 5])
    pruned, report = prune_zero_channels(model, fresh())
    groups.STRUCTURE_CACHE.clear()
    assert widths(pruned) == widths(model.eval())
    assert any("did not settle" in note for note in report.notes), report.notes
    check_exact(model, pruned)


class ShapeBranchHead(nn.Module):
    """timm's VGG head: pools its input up to the conv's kernel when it is smaller (control flow on a shape)."""

    def __init__(self, c_in, c_out, kernel=4):
        super().__init__()
        self.kernel = kernel
        self.fc1 = nn.Conv2d(c_in, c_out, kernel)

    def forward(self, x):
        if x.shape[-2] < self.kernel or x.shape[-1] < self.kernel:
            x = F.adaptive_avg_pool2d(x, (max(self.kernel, x.shape[-2]), max(self.kernel, x.shape[-1])))
        return self.fc1(x).flatten(1)


class ShapeBranchNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, stride=4, padding=1), nn.BatchNorm2d(8)
        self.head = ShapeBranchHead(8, 5)

    def forward(self, x):
        return self.head(F.relu(self.bn1(self.conv1(x))))


def test_a_branch_on_the_input_shape_is_decided_at_the_example_shape(tmp_path):
    from edgeshift.exporter import export_onnx

    model = ShapeBranchNet().eval()
    plant(model.bn1, zero=[1, 2, 6], constant=[4])  # constant: the head pools, then its unpadded conv folds it
    pruned, report = prune_zero_channels(model, fresh((2, 3, 8, 8)))  # 2x2 features: the head pools to 4x4
    assert widths(pruned)["conv1"] == 4 and pruned.head.fc1.in_channels == 4
    assert report.channels_folded == 1
    check_exact(model, pruned, (2, 3, 8, 8))
    exported = export_onnx(pruned, fresh((2, 3, 8, 8)), tmp_path / "p.onnx")  # checked against torch inside
    assert exported.params == sum(p.numel() for p in pruned.parameters())


class ValueBranchNet(ShapeBranchNet):
    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        if x.sum() > 0:  # control flow on values: no graph holds for every input
            x = x * 2
        return self.head(x)


def test_a_branch_on_values_still_cannot_be_traced():
    from edgeshift.core.errors import ModelNotTraceableError

    with pytest.raises(ModelNotTraceableError, match="cannot be traced"):
        prune_zero_channels(ValueBranchNet().eval(), fresh((2, 3, 8, 8)))


class CSPNet(nn.Module):
    """CSP's split at a width computed in forward (no attribute holds it), next to other branches that are
    concatenated into one consumer with it."""

    def __init__(self):
        super().__init__()
        self.channels = 8
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8)
        self.block, self.bnb = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.other, self.bno = nn.Conv2d(3, 6, 1), nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(14, 4, 1)

    def forward(self, x):
        a, b = F.relu(self.bn1(self.conv1(x))).split(self.channels // 2, dim=1)
        z = torch.cat([a, F.relu(self.bnb(self.block(b))), F.relu(self.bno(self.other(x)))], 1)
        return self.conv2(z).mean((2, 3))


def test_a_split_the_model_cannot_follow_is_put_back_and_the_rest_still_goes():
    model = CSPNet().eval()
    plant(model.bn1, zero=[1, 5])  # one per chunk: planned, but the code keeps splitting at 4
    plant(model.bnb, zero=[0])
    plant(model.bno, zero=[2], constant=[4])  # the constant folds into conv2 through the concatenation
    pruned, report = prune_zero_channels(model, fresh())
    assert widths(pruned)["conv1"] == 8  # put back, and said so
    assert any("conv1" in note and "broke the model" in note for note in report.notes), report.notes
    assert widths(pruned)["block"] == 3 and widths(pruned)["other"] == 4 and pruned.conv2.in_channels == 4 + 3 + 4
    assert report.channels_folded == 1
    check_exact(model, pruned)


def test_an_input_too_small_for_the_model_is_the_callers_mistake():
    from edgeshift.core.errors import EdgeshiftError

    model = nn.Sequential(nn.Conv2d(3, 4, 5), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 5)).eval()
    with pytest.raises(EdgeshiftError, match=r"does not run on inputs shaped \(2, 3, 6, 6\).*input size it takes"):
        prune_zero_channels(model, fresh((2, 3, 6, 6)))
