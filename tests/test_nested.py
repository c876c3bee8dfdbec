"""Nested widths: the reorder is exact, every narrower level is a prefix of the wider one, the rebuild puts the
narrower level's weights into the leading slices and the original ones into the re-added channels, and a fine-tune
with the prefix frozen moves only the re-added weights."""

import copy
import re

import numpy as np
import pytest
import torch
from cnn_generator import CNNSpec, Concat, Conv, Pool, Residual, build
from helpers import assert_same_function
from torch import nn
from typer.testing import CliRunner

from edgeshift.cli import app
from edgeshift.core.errors import EdgeshiftError
from edgeshift.pruner.checkpoint import load_checkpoint
from edgeshift.pruner.methods.nested_widths import SWEEP, widths_meeting
from edgeshift.pruner.models import get
from edgeshift.pruner.nested import (
    check_widths,
    freeze_outside,
    learned_scores,
    narrow,
    rebuild,
    reorder_channels,
)
from edgeshift.pruner.structured.groups import coupled_groups
from edgeshift.runtime.portfolio import Portfolio

SPECS = {
    "resnet20": None,  # residual streams: groups with several producers
    "flatten-concat": CNNSpec(  # a branch concatenation and a flatten into a linear head
        Conv(8, norm="bn"),
        (Concat(Conv(6), Conv(4)), Pool("max"), Conv(12, norm="bnact", act="silu")),
        "flatten-linear",
    ),
    "residual-projection": CNNSpec(
        Conv(8),
        (Residual((Conv(8), Conv(16, act="none")), projection=True), Conv(16, groups="depthwise", norm="none")),
        "gap-mlp",
    ),
}


def model_of(key: str) -> tuple[nn.Module, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    spec = SPECS[key]
    if spec is None:
        model = get("resnet20", width=8).eval()
        for m in model.modules():  # trained-looking statistics, so the norms are not identities
            if isinstance(m, nn.BatchNorm2d):
                assert m.running_mean is not None and m.running_var is not None
                m.running_mean.normal_(0, 0.1, generator=gen)
                m.running_var.uniform_(0.5, 1.5, generator=gen)
                m.weight.data.uniform_(0.5, 1.5, generator=gen)
        return model, torch.randn(2, 3, 32, 32, generator=gen)
    return build(spec), torch.randn(2, 3, 16, 16, generator=gen)


def conv_and_linear(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


@pytest.mark.parametrize("key", sorted(SPECS))
def test_reordering_keeps_the_function_and_sorts_every_group_by_importance(key):
    model, x = model_of(key)
    reordered = copy.deepcopy(model)
    nested = reorder_channels(reordered, x)
    assert nested
    assert_same_function(model, reordered, torch.randn(4, *x.shape[1:], generator=torch.Generator().manual_seed(1)))
    mods = dict(reordered.named_modules())
    for spec in coupled_groups(reordered, x):  # the test's own ranking, from the weights written
        if spec.blocked or spec.size < 2 or not any(it.role == "producer" for it in spec.items):
            continue
        score = np.zeros(spec.size)
        for it in spec.items:
            if it.role == "producer":
                w = mods[it.name].weight.detach().abs().reshape(mods[it.name].weight.shape[0], -1).sum(1).numpy()
                np.add.at(score, it.roots, w[it.idxs])
        assert all(a >= b - 1e-9 for a, b in zip(score, score[1:])), (spec.root, score)


def _producer_l1(model: nn.Module, spec) -> np.ndarray:
    mods = dict(model.named_modules())
    score = np.zeros(spec.size)
    for it in spec.items:
        if it.role == "producer":
            w = mods[it.name].weight.detach().abs().reshape(mods[it.name].weight.shape[0], -1).sum(1).numpy()
            np.add.at(score, it.roots, w[it.idxs])
    return score


def test_learned_ranking_orders_channels_by_their_gates_not_their_weights():
    """``learned_scores`` hands the gates' logits per group to ``reorder_channels``: here the fit sets them (the
    reverse of the L1 order in every group), and the reordered model computes the same function."""
    model, x = model_of("resnet20")

    def fit(work, masks, steps):
        assert all(not p.requires_grad for p in work.parameters())  # the trained weights stay as they are
        with torch.no_grad():
            for logits, spec in zip(masks.logits, masks.group_specs):
                l1 = _producer_l1(work, spec)  # by the group's roots
                logits.copy_(-torch.as_tensor(l1.argsort().argsort(), dtype=logits.dtype))  # weakest highest
        assert steps == 3

    before = copy.deepcopy(model.state_dict())
    scores = learned_scores(model, x, fit, target=0.25, steps=3)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the model itself untouched
    reordered = copy.deepcopy(model)
    reorder_channels(reordered, x, scores)
    assert_same_function(model, reordered, torch.randn(4, *x.shape[1:], generator=torch.Generator().manual_seed(1)))
    checked = 0
    for spec in coupled_groups(reordered, x):
        if not spec.blocked and spec.size > 1 and any(it.role == "producer" for it in spec.items):
            l1 = _producer_l1(reordered, spec)
            assert all(a <= b + 1e-9 for a, b in zip(l1, l1[1:])), (spec.root, l1)  # now ascending in L1
            checked += 1
    assert checked == len(scores) > 1


# a layer reading a concatenation keeps the leading part of each group's segment: (segment start, size) per group
CONCAT_READERS = {("flatten-concat", "features.3.conv.weight"): ((0, 6), (6, 4))}


def index(dims: dict, shape: torch.Size) -> tuple[torch.Tensor, ...]:
    ranges = [torch.as_tensor(dims[d]) if d in dims else torch.arange(n) for d, n in enumerate(shape)]
    return torch.meshgrid(*ranges, indexing="ij")


def leading_runs(positions: np.ndarray, segments: tuple[tuple[int, int], ...]) -> bool:
    """Whether ``positions`` is, in every segment, a run starting at the segment's start."""
    for start, size in segments:
        inside = positions[(positions >= start) & (positions < start + size)] - start
        if not np.array_equal(inside, np.arange(len(inside))) or len(inside) == 0:
            return False
    return True


@pytest.mark.parametrize("key", sorted(SPECS))
def test_every_narrower_level_is_a_prefix_of_the_wider_in_every_layer(key):
    model, x = model_of(key)
    reorder_channels(model, x)
    full = {n: p.detach() for n, p in model.named_parameters()}
    levels = [narrow(model, x, w) for w in (0.75, 0.5, 0.25)]
    sizes = [sum(p.numel() for p in model.parameters())] + [
        sum(p.numel() for p in lv.model.parameters()) for lv in levels
    ]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == len(sizes)
    for level in levels:
        for name, tensor in level.model.named_parameters():
            dims = level.kept.get(name, {})
            for d, positions in dims.items():  # where the entries come from: leading, per group
                segments = CONCAT_READERS.get((key, name), ((0, full[name].shape[d]),)) if d == 1 else None
                assert leading_runs(positions, segments or ((0, full[name].shape[d]),)), (name, d, positions)
            expected = full[name][index(dims, full[name].shape)]
            assert torch.equal(tensor.detach(), expected), name  # the full model's weights at those positions
        level.model(x)  # and it runs
    for (k, name), _ in CONCAT_READERS.items():
        if k == key:  # the concatenation really was cut in both segments
            assert not np.array_equal(levels[1].kept[name][1], np.arange(len(levels[1].kept[name][1])))


def test_rebuild_puts_the_tuned_narrower_weights_in_front_and_the_original_ones_behind():
    """The re-added channels carry their original weights; a shared channel's weights on re-added inputs start at
    zero, so the rebuilt level computes exactly what the narrower one does until it is fine-tuned."""
    model, x = model_of("flatten-concat")
    reorder_channels(model, x)
    thin = narrow(model, x, 0.5)
    with torch.no_grad():
        for p in thin.model.parameters():
            p.add_(1.0)  # as if fine-tuned: every shared weight differs from the original
    wide = narrow(model, x, 0.75)
    original = {n: p.detach().clone() for n, p in wide.model.named_parameters()}
    trainable = rebuild(thin, wide, model)
    tuned = dict(thin.model.named_parameters())
    full = dict(model.named_parameters())
    for name, p in wide.model.named_parameters():
        shared = trainable[name] == 0
        assert int(shared.sum()) == tuned[name].numel(), name  # every narrower entry has its place
        rows = shared.reshape(len(shared), -1).any(1) if shared.dim() > 1 else torch.zeros(len(shared), dtype=bool)
        cross = ~shared & rows.reshape(-1, *[1] * (shared.dim() - 1))  # a shared output reading a re-added input
        assert torch.equal(p.detach()[~shared & ~cross], original[name][~shared & ~cross]), name  # the originals
        assert not p.detach()[cross].any(), name
        # placed in the full model's coordinates, the rebuilt level holds the tuned narrower tensor where it sits
        placed = torch.full_like(full[name], float("nan"))
        placed[index(wide.kept.get(name, {}), full[name].shape)] = p.detach()
        assert torch.equal(placed[index(thin.kept.get(name, {}), full[name].shape)], tuned[name].detach()), name
    with torch.no_grad():
        assert_same_function(thin.model.eval(), wide.model.eval(), x)


def test_a_fine_tune_with_the_prefix_frozen_moves_only_the_re_added_weights():
    model, x = model_of("resnet20")
    reorder_channels(model, x)
    thin, level = narrow(model, x, 0.5), narrow(model, x, 0.75)
    trainable = rebuild(thin, level, model)
    wide = level.model
    before = {n: p.detach().clone() for n, p in wide.named_parameters()}
    hooks = freeze_outside(wide, trainable)
    opt = torch.optim.SGD(wide.parameters(), lr=0.1, momentum=0.9, weight_decay=0.0)
    wide.train()
    for _ in range(3):
        opt.zero_grad()
        wide(x).square().mean().backward()
        opt.step()
    for hook in hooks:
        hook.remove()
    moved = 0
    for name, p in wide.named_parameters():
        frozen = trainable[name] == 0
        assert torch.equal(p.detach()[frozen], before[name][frozen]), name
        moved += int((p.detach() != before[name]).sum())
    assert moved > 0


@pytest.mark.parametrize(
    "widths, message",
    [
        ((), "at least one width"),
        ((0.5, 1.0), "in (0, 1); got 1"),
        ((0.0,), "in (0, 1); got 0"),
        ((0.5, 0.75), "must decrease"),
        ((0.5, 0.5), "must decrease"),
    ],
)
def test_bad_widths_are_refused_in_one_line(widths, message):
    with pytest.raises(EdgeshiftError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_widths(widths)


def test_a_model_with_no_group_to_narrow_is_refused():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 5)).eval()  # its one group is the output
    with pytest.raises(EdgeshiftError, match="no channel group that can be narrowed"):
        reorder_channels(model, torch.randn(2, 3, 4, 4))


def test_the_nest_method_through_the_door_writes_nested_levels(tmp_path):
    common = ["--data", "generated", "--train-samples", "200", "--test-samples", "100", "--epochs", "1"]
    refused = CliRunner().invoke(app, ["method", "nest", "--set", "widths=[0.5,0.75]", "-o", str(tmp_path), *common])
    assert refused.exit_code == 2 and "must decrease" in refused.output and refused.output.count("\n") == 1
    args = ["method", "nest", "--set", "widths=[0.5,0.25]", "--set", "finetune_epochs=0.5", "--batch-size", "100"]
    result = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "nest"), *common])
    assert result.exit_code == 0, result.output
    folder = tmp_path / "nest" / "variants"
    levels = [load_checkpoint(folder / f"nest-{w}.pt")[0] for w in ("1", "0.5", "0.25")]
    for wider, narrower in zip(levels, levels[1:]):
        wide = conv_and_linear(wider)
        for name, layer in conv_and_linear(narrower).items():
            v, w = layer.weight.detach(), wide[name].weight.detach()
            assert torch.equal(v, w[tuple(slice(0, n) for n in v.shape)]), name  # still nested after fine-tuning


def test_nest_refuses_a_model_with_nothing_to_narrow_before_training_it(tmp_path, monkeypatch):
    (tmp_path / "flat_model.py").write_text(
        "from torch import nn\n\n\ndef build(num_classes=5):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, num_classes))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    args = ["method", "nest", "--arch", "flat_model:build", "--input-size", "8", "--set", "widths=[0.5]"]
    result = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "out"), "--data", "generated", "--epochs", "1"])
    assert result.exit_code == 2 and "no channel group that can be narrowed" in result.output
    assert not any((tmp_path / "out" / "variants").iterdir())  # refused before the dense model was trained


def test_edgeshift_nest_then_export_stores_every_narrower_weight_as_a_slice(tmp_path):
    """After real fine-tuning (each level with batch-norm statistics of its own), the exported narrower widths take
    every conv and linear weight from the widest (scaled per channel): the command a user runs, then export."""
    common = ["--data", "generated", "--train-samples", "200", "--test-samples", "100"]
    dense = tmp_path / "dense.pt"
    trained = CliRunner().invoke(app, ["train", "--arch", "resnet20", "--epochs", "1", "-o", str(dense), *common])
    assert trained.exit_code == 0, trained.output
    missing = CliRunner().invoke(app, ["nest", str(tmp_path / "none.pt"), "-o", str(tmp_path / "x"), *common])
    assert missing.exit_code == 2 and "checkpoint to nest (DENSE) not found" in missing.output
    bad = CliRunner().invoke(app, ["nest", str(dense), "-o", str(tmp_path / "x"), "--widths", "0.5,1.5", *common])
    assert bad.exit_code == 2 and "in (0, 1); got 1.5" in bad.output and bad.output.count("\n") == 1
    weights = ["--widths", "0.5,0.25", "--training", "joint", "--joint-weights", "1"]
    uneven = CliRunner().invoke(app, ["nest", str(dense), "-o", str(tmp_path / "y"), *weights, *common])
    assert uneven.exit_code == 2 and "1 weights for 2 narrower widths" in uneven.output
    assert uneven.output.count("\n") == 1
    args = ["nest", str(dense), "-o", str(tmp_path / "run"), "--widths", "0.5,0.25", "--finetune-epochs", "0.5"]
    result = CliRunner().invoke(app, [*args, "--batch-size", "100", "--ranking", "learned", *common])
    assert result.exit_code == 0, result.output
    assert "learning gates to rank the channels" in result.output
    levels = [str(tmp_path / "run" / "variants" / f"nest-{w}.pt") for w in ("1", "0.5", "0.25")]
    out = tmp_path / "nested.zip"
    exported = CliRunner().invoke(app, ["export", *levels, "-o", str(out), "--no-memory", "--iterations", "10"])
    assert exported.exit_code == 0, exported.output
    with Portfolio.open(out) as pf:
        for name, level in zip(("nest-0.5", "nest-0.25"), levels[1:]):
            nested = pf.info(name).record.nested
            assert nested is not None and nested.base == "nest-1"
            weights = [w for w in nested.shared if len(w.ranges) > 1]  # every conv and linear weight: a slice
            layers = load_checkpoint(level)[0].modules()
            assert len(weights) == sum(1 for m in layers if isinstance(m, (nn.Conv2d, nn.Linear))), name


# p50 of the sweep as a CPU with 16-wide blocks gives it: 0.75 and 0.875 slower than 0.5, and than the full width
GIVEN_P50 = {"1": 0.50, **{f"{w:g}": 0.10 + 0.40 * w for w in SWEEP}, "0.75": 0.58, "0.7": 0.56, "0.8": 0.60}


@pytest.mark.parametrize(
    "targets, widths",
    [
        ((0.9,), (0.85,)),
        ((0.85,), (0.65,)),  # 0.8, 0.75 and 0.7 are narrower but slower: passed over
        ((0.9, 0.62), (0.85, 0.5)),
        ((0.99, 0.5), (0.95, 0.35)),
        ((0.3,), (0.1,)),
    ],
)
def test_a_latency_target_becomes_the_widest_width_measured_to_meet_it(targets, widths):
    assert widths_meeting(GIVEN_P50, targets, say=lambda _: None) == widths
    for target, width in zip(targets, widths):  # the oracle: the widest width at or under target x full p50
        assert GIVEN_P50[f"{width:g}"] <= target * GIVEN_P50["1"]
        assert all(GIVEN_P50[f"{w:g}"] > target * GIVEN_P50["1"] for w in SWEEP if w > width)


@pytest.mark.parametrize(
    "targets, message", [((0.2,), "no width down to 0.05 meets"), ((0.95, 0.94), "two targets met by the same width")]
)
def test_latency_targets_no_width_meets_or_two_share_are_refused(targets, message):
    with pytest.raises(EdgeshiftError, match=message):
        widths_meeting(GIVEN_P50, targets, say=lambda _: None)


def test_edgeshift_nest_takes_latency_targets_measured_under_the_profile(tmp_path):
    common = ["--data", "generated", "--train-samples", "100", "--test-samples", "50"]
    dense = tmp_path / "dense.pt"
    trained = CliRunner().invoke(app, ["train", "--arch", "resnet20", "--epochs", "1", "-o", str(dense), *common])
    assert trained.exit_code == 0, trained.output
    run = ["nest", str(dense), "-o", str(tmp_path / "run"), "--finetune-epochs", "0", *common]
    bad = CliRunner().invoke(app, [*run, "--latency-targets", "0.5,0.8"])
    assert bad.exit_code == 2 and "latency targets are fractions" in bad.output and bad.output.count("\n") == 1
    # 0.99 of the full width's p50: a ResNet-20 at width 0.05 (1/2/4 channels) meets it whatever the CPU's timing
    result = CliRunner().invoke(app, [*run, "--latency-targets", "0.99"])
    assert result.exit_code == 0, result.output
    chosen = re.findall(
        r"latency target 0.99 -> width (\S+) \(p50 (\S+) ms, (\S+)x the full width's (\S+) ms", result.output
    )
    assert len(chosen) == 1
    width, p50, _, full = chosen[0]
    assert float(width) in SWEEP and float(p50) <= 0.99 * float(full)
    for w in (1.0, float(width)):
        assert (tmp_path / "run" / "variants" / f"nest-{w:g}.pt").is_file()


def test_a_folder_of_rebuilt_levels_is_not_resumed_as_joint_training(tmp_path):
    """The levels would pass for joint ones: the run's folder refuses another configuration, in one line."""
    common = ["--data", "generated", "--train-samples", "100", "--test-samples", "50", "--finetune-epochs", "0"]
    dense = tmp_path / "dense.pt"
    trained = CliRunner().invoke(app, ["train", "--arch", "resnet20", "--epochs", "1", "-o", str(dense), *common[:6]])
    assert trained.exit_code == 0, trained.output
    run = ["nest", str(dense), "-o", str(tmp_path / "run"), "--widths", "0.5", *common]
    assert CliRunner().invoke(app, run).exit_code == 0
    joint = CliRunner().invoke(app, [*run, "--training", "joint"])
    assert joint.exit_code == 2 and "another configuration" in joint.output and joint.output.count("\n") == 1
