"""Channel gating per input (FTWT): the targets of Algorithm 1, the heads' two trainings, the MACs an input costs,
the one-shot estimate, and `edgeshift gate` then `export`, on tiny models and generated data."""

from __future__ import annotations

from typing import cast

import pytest
import torch
import torch.nn.functional as F
from helpers import make
from torch import nn
from typer.testing import CliRunner

from edgeshift.cli import app
from edgeshift.core.errors import EdgeshiftError
from edgeshift.pruner.checkpoint import read_checkpoint
from edgeshift.pruner.data import generated_dataset
from edgeshift.pruner.gating import (
    GatedNetwork,
    estimated_reduction,
    find_blocks,
    gated_network,
    mass_targets,
    ratio_for,
)
from edgeshift.pruner.metrics import count_macs
from edgeshift.pruner.train import TrainConfig, train
from edgeshift.runtime.portfolio import Portfolio


def _targets_by_hand(outputs: torch.Tensor, ratio: float) -> torch.Tensor:
    """Algorithm 1 written out, one input and one filter at a time."""
    n, c = outputs.shape[:2]
    result = torch.zeros(n, c)
    for i in range(n):
        acts = [float(outputs[i, f].abs().max()) for f in range(c)]
        total = sum(acts)
        mass = 0.0
        for f in sorted(range(c), key=lambda f: -acts[f]):
            if acts[f] == 0 or mass >= ratio * total - 1e-9:
                break
            result[i, f] = 1.0
            mass += acts[f]
    return result


@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.8, 0.95, 1.0])
def test_the_targets_are_the_fewest_filters_holding_the_ratio_of_the_mass(ratio):
    gen = torch.Generator().manual_seed(3)
    outputs = torch.relu(torch.randn(6, 12, 5, 5, generator=gen))
    outputs[:, 4] = 0.0  # a dead filter: never a target, even at ratio 1
    outputs[2] = 0.0  # an input with no response at all: nothing kept
    expected = _targets_by_hand(outputs, ratio)
    assert torch.equal(mass_targets(outputs, ratio), expected)
    if ratio == 1.0:
        assert torch.equal(expected[:2], (outputs[:2].amax(dim=(2, 3)) > 0).float())


class Chain(nn.Module):
    """conv-BN-ReLU, pool, conv-BN-ReLU, global pool, linear: every MAC of it known by hand."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        x = F.max_pool2d(torch.relu(self.b1(self.c1(x))), 2)
        x = torch.relu(self.b2(self.c2(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def _set_masks(gated: GatedNetwork, kept: list[list[int]]) -> None:
    """Heads that keep exactly these filters for every input (zero weights, biases of +-5)."""
    for gate, keep in zip(gated.gate_list(), kept):
        with torch.no_grad():
            gate.head.weight.zero_()
            bias = cast(torch.Tensor, gate.head.bias)
            bias.fill_(-5.0)
            bias[keep] = 5.0


def test_macs_per_input_count_the_filters_kept_and_the_channels_they_feed():
    model = Chain().eval()
    x = torch.randn(2, 3, 8, 8)
    gated = GatedNetwork(model, x, ratio=0.9).eval()
    assert [b.conv for b in gated.blocks] == ["c1", "c2"]
    _set_masks(gated, [[0, 1, 2], [0, 5]])
    # c1: 8x8 outputs, 3 of 8 filters, 3x3x3 inputs; c2: 4x4 outputs (after the pool), 2 of 6 filters, 3 of 8
    # input channels, 3x3 kernels; fc: 2 of 6 inputs, 4 outputs; heads: 3x8 and 8x6
    by_hand = 64 * 3 * 27 + 16 * 2 * 3 * 9 + 2 * 4 + 3 * 8 + 8 * 6
    assert gated.macs_per_input(x).tolist() == [by_hand, by_hand]
    assert gated.dense_macs == 64 * 8 * 27 + 16 * 6 * 8 * 9 + 6 * 4
    with torch.no_grad():  # and the masks are what runs: the skipped filters' channels are zero after each block
        h = torch.relu(model.b1(model.c1(x)))
        h[:, 3:] = 0
        h = torch.relu(model.b2(model.c2(F.max_pool2d(h, 2))))
        h[:, 1:5] = 0
        expected = model.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))
        assert torch.allclose(gated(x), expected, atol=1e-6)


@pytest.mark.parametrize("head_input", ["standardised", "softmax"])
def test_a_head_reads_its_block_input_as_masked_by_the_gate_before(head_input):
    """The thesis's I^{l+1} = O^l * mask: the second head sees the first block's output with the skipped filters
    zero (else the skipped filters would have to be computed anyway, to decide)."""
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
    ).eval()  # fmt: skip
    x = torch.randn(2, 3, 8, 8)
    gated = GatedNetwork(model, x, ratio=0.9, head_input=head_input).eval()
    _set_masks(gated, [[0, 1, 2], list(range(6))])
    second = gated.gate_list()[1]
    with torch.no_grad():
        torch.nn.init.normal_(second.head.weight)  # its logits now depend on what it reads
        h = torch.relu(model[1](model[0](x)))
        h[:, 3:] = 0
        pooled = h.amax(dim=(2, 3), keepdim=True)
        if head_input == "softmax":
            seen_by_head = torch.softmax(pooled, dim=1)
        else:  # standardised by the running statistics, here set by hand
            second.normalise.running_mean.copy_(torch.arange(8.0))
            second.normalise.running_var.copy_(torch.arange(1.0, 9.0))
            seen_by_head = (pooled - torch.arange(8.0)[:, None, None]) / torch.sqrt(torch.arange(1.0, 9.0) + 1e-5)[
                :, None, None
            ]
        expected = second.head(seen_by_head).flatten(1)
        seen = {}
        handle = second.head.register_forward_hook(lambda m, i, o: seen.update(logits=o.flatten(1)))
        gated(x)
        handle.remove()
        assert torch.allclose(seen["logits"], expected, atol=1e-6)


@pytest.mark.parametrize("name", ["vgg11", "resnet20"])
def test_fresh_heads_keep_every_filter_so_the_gated_model_is_the_model(name):
    model = make(name, {}, 32).eval()
    x = torch.randn(3, 3, 32, 32)
    gated = GatedNetwork(model, x, ratio=0.8).eval()
    with torch.no_grad():
        assert torch.equal(gated(x), model(x))
    every = float(count_macs(model, x)) + _head_macs(gated)  # the dense MACs counted by the kit's own hooks
    assert gated.macs_per_input(x).tolist() == [every] * 3


def _head_macs(gated: GatedNetwork) -> float:
    return float(sum(b.in_channels * b.out_channels for b in gated.blocks))


def _grads(gated: GatedNetwork, loss: torch.Tensor) -> tuple[bool, bool]:
    """(any head got a gradient, any backbone weight got one)."""
    gated.zero_grad(set_to_none=True)
    loss.backward()
    heads = any(p.grad is not None and p.grad.abs().sum() > 0 for g in gated.gate_list() for p in g.parameters())
    backbone = any(p.grad is not None and p.grad.abs().sum() > 0 for p in gated.backbone.parameters())
    return heads, backbone


def test_decoupled_heads_and_backbone_share_no_gradient_and_joint_ones_do():
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    decoupled = GatedNetwork(Chain(), x, ratio=0.7, mode="decoupled").train()
    assert _grads(decoupled, F.cross_entropy(decoupled(x), y)) == (False, True)  # the task loss: backbone only
    decoupled(x)
    assert _grads(decoupled, decoupled.loss()) == (True, False)  # the heads' loss: heads only
    joint = GatedNetwork(Chain(), x, ratio=0.7, mode="joint").train()
    assert _grads(joint, F.cross_entropy(joint(x), y)) == (True, True)  # straight through the masks


@pytest.mark.parametrize("head_input", ["standardised", "softmax"])
def test_training_moves_the_heads_toward_their_targets(head_input):
    torch.manual_seed(0)
    x = torch.randn(32, 3, 8, 8)
    gated = GatedNetwork(Chain(), x, ratio=0.6, head_input=head_input).train()
    optimiser = torch.optim.SGD([p for g in gated.gate_list() for p in g.parameters()], lr=1.0)
    gated(x)
    first, agreed = float(gated.loss().detach()), gated.log()["gate_agreement"]
    for _ in range(100):
        optimiser.zero_grad()
        gated(x)
        gated.loss().backward()
        optimiser.step()
    gated(x)
    assert float(gated.loss().detach()) < 0.6 * first  # from keeping every filter to near what the input tells
    assert gated.log()["gate_agreement"] > agreed + 0.02


def test_standardised_heads_learn_masks_that_differ_per_input():
    """Targets that follow the input (which of two channels is lit decides which filters carry the mass) are
    learned by the standardised head as different masks per input; a head learning each filter's keep rate alone
    (the failure behind a softmax on a real VGG-16) would give every input the same mask."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4), nn.ReLU()).eval()  # fmt: skip
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 0], [0, 1], [1, 0], [0, 1]])[:, :, None, None])
        model[3].weight.copy_(
            torch.tensor([[1.0, 0, 1, 0], [0, 1, 0, 1], [1, 0, 1, 0], [0, 1, 0, 1]])[:, :, None, None]
        )
    lit = torch.randint(0, 2, (64,))
    x = torch.zeros(64, 2, 4, 4)
    x[torch.arange(64), lit] = 1.0 + torch.rand(64, 4, 4)
    gated = GatedNetwork(model, x[:2], ratio=0.9, mode="decoupled").train()  # keeps the two lit filters
    for p in model.parameters():
        p.requires_grad_(False)
    optimiser = torch.optim.SGD([p for g in gated.gate_list() for p in g.parameters()], lr=0.5)
    for _ in range(200):
        optimiser.zero_grad()
        gated(x)
        gated.loss().backward()
        optimiser.step()
    seen = {}
    handle = gated.gate_list()[1].head.register_forward_hook(lambda m, i, o: seen.update(logits=o.flatten(1)))
    with torch.no_grad():
        gated.eval()(x)
    handle.remove()
    masks = (seen["logits"] > 0).float()
    expected = torch.stack([1.0 - lit, lit.float(), 1.0 - lit, lit.float()], dim=1)  # the lit channel's two filters
    assert torch.equal(masks, expected)


def test_the_heads_learn_at_their_own_rate_in_the_training_loop():
    """The trainer applies the gated network's parameter groups: at a head learning-rate scale of 0 the heads do
    not move and the backbone does; at 10 both move."""
    data = generated_dataset(32, num_classes=4, size=8)
    for scale, heads_move in ((0.0, False), (10.0, True)):
        torch.manual_seed(0)
        model = Chain()
        gated = GatedNetwork(model, torch.randn(2, 3, 8, 8), ratio=0.6, head_lr_scale=scale)
        heads = [p.detach().clone() for g in gated.gate_list() for p in g.head.parameters()]
        backbone = [p.detach().clone() for p in model.parameters()]
        cfg = TrainConfig(iterations=2, batch_size=16, lr=0.05, warmup_steps=0, augment=False)
        train(gated, data, data, cfg, progress=False, regulariser=gated)
        moved = [
            not torch.equal(a, p) for a, p in zip(heads, (p for g in gated.gate_list() for p in g.head.parameters()))
        ]
        assert any(moved) == heads_move and all(moved) == heads_move
        assert any(not torch.equal(a, p) for a, p in zip(backbone, model.parameters()))


def test_a_training_batch_of_one_input_uses_the_running_statistics():
    gated = GatedNetwork(Chain(), torch.randn(2, 3, 8, 8), ratio=0.6).train()
    gated(torch.randn(1, 3, 8, 8))  # a batch norm of one value per channel would raise
    assert gated.loss().isfinite()


def test_a_gate_checkpoint_written_before_the_head_input_was_a_choice_loads_as_the_softmax_head():
    x = torch.randn(4, 3, 8, 8)
    old = GatedNetwork(Chain().eval(), x, ratio=0.7, head_input="softmax").eval()
    for g in old.gate_list():
        torch.nn.init.normal_(g.head.weight)
    entry = {
        "ratio": 0.7,
        "mode": "decoupled",
        "heads": {b.conv: dict(g.head.state_dict()) for b, g in zip(old.blocks, old.gate_list())},  # no "head."
    }
    loaded = gated_network(old.backbone, entry, x, "old.pt")
    assert all(g.head_input == "softmax" for g in loaded.gate_list())
    with torch.no_grad():
        assert torch.equal(loaded(x), old(x))
    with pytest.raises(EdgeshiftError, match="head_input one of standardised, softmax"):
        gated_network(old.backbone, {**entry, "head_input": "sigmoid"}, x, "bad.pt")


def test_the_one_shot_estimate_saves_more_as_the_ratio_falls_and_picks_the_largest_ratio_meeting_a_target():
    model = make("vgg11", {}, 32).eval()
    x = torch.randn(16, 3, 32, 32)
    gated = GatedNetwork(model, x, ratio=0.9)
    estimates = estimated_reduction(gated, x, [1.0, 0.9, 0.8, 0.6], batch=8)
    saved = [estimates[r] for r in (1.0, 0.9, 0.8, 0.6)]
    assert saved == sorted(saved) and 0 <= saved[0] and saved[-1] < 1
    assert all(g.ratio == 0.9 and not g.forced for g in gated.gate_list())  # left as it was
    table = {1.0: 0.1, 0.9: 0.45, 0.8: 0.6, 0.7: 0.7}
    asked: list[float] = []

    def saved_at(ratio: float) -> float:
        asked.append(ratio)
        return table[ratio]

    assert ratio_for(saved_at, 0.5, grid=tuple(table)) == (0.8, {r: table[r] for r in asked})
    assert ratio_for(lambda r: table[r], 0.1, grid=tuple(table))[0] == 1.0
    with pytest.raises(EdgeshiftError, match="no mass ratio down to 0.7 saves 90%.*at most 70.0%, at ratio 0.7"):
        ratio_for(lambda r: table[r], 0.9, grid=tuple(table))


def test_a_model_without_conv_bn_relu_blocks_is_refused_in_one_line():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
    with pytest.raises(EdgeshiftError, match="has no conv-BN-ReLU block"):
        find_blocks(model, torch.randn(1, 3, 6, 6))


def test_gate_refuses_a_model_without_blocks_before_training_it(tmp_path, monkeypatch):
    (tmp_path / "no_norm.py").write_text(
        "from torch import nn\n\n\ndef build(num_classes=5):\n"
        "    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),"
        " nn.Linear(4, num_classes))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    args = ["method", "gate", "--arch", "no_norm:build", "--input-size", "8", "-o", str(tmp_path / "out")]
    result = CliRunner().invoke(app, [*args, "--data", "generated", "--epochs", "1"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.splitlines()[-1].startswith("error: ") and "has no conv-BN-ReLU block" in result.output
    assert not any((tmp_path / "out" / "variants").iterdir())  # refused before the dense model was trained


def test_edgeshift_gate_then_export_runs_the_gated_model_on_onnx_runtime(tmp_path):
    common = ["--data", "generated", "--train-samples", "200", "--test-samples", "100"]
    dense = tmp_path / "dense.pt"
    trained = CliRunner().invoke(app, ["train", "--arch", "resnet20", "--epochs", "1", "-o", str(dense), *common])
    assert trained.exit_code == 0, trained.output
    bad = CliRunner().invoke(app, ["gate", str(dense), "-o", str(tmp_path / "x"), "--ratio", "1.5", *common])
    assert bad.exit_code == 2 and "ratio" in bad.output and bad.output.count("\n") == 1
    args = ["gate", str(dense), "-o", str(tmp_path / "run"), "--flops-reduction", "0.3", "--epochs", "0.5"]
    routing = ["--signatures", "2", "--route-samples", "100", "--route-epochs", "0.5"]
    result = CliRunner().invoke(app, [*args, *routing, "--batch-size", "100", *common])
    assert result.exit_code == 0, result.output
    assert (
        "saves" in result.output
        and "MACs per input" in result.output
        and "signatures sliced vs masked" in result.output
    )
    made = sorted((tmp_path / "run" / "variants").glob("gate-*.pt"))
    assert len(made) == 2 and made[0].name == made[1].stem + "-routed2.pt", made
    routed, made = made[0], made[1:]
    assert len(read_checkpoint(routed)["meta"]["routing"]["signatures"]) == 2
    gate = read_checkpoint(made[0])["meta"]["gate"]
    assert gate["macs_mean"] < gate["dense_macs"] + sum(b.numel() for h in gate["heads"].values() for b in h.values())
    out = tmp_path / "gated.zip"
    sources = [str(dense), str(made[0]), str(routed)]
    exported = CliRunner().invoke(app, ["export", *sources, "-o", str(out), "--no-memory"])
    assert exported.exit_code == 0, exported.output  # the export's own check: ONNX Runtime computes the masks too
    name = made[0].stem
    assert f"{name}: exported (2/3)" in exported.output  # through ONNX Runtime, its outputs checked against torch
    assert f"{routed.stem}: exported (3/3)" in exported.output  # one graph: router, then the chosen signature
    with Portfolio.open(out) as pf:
        assert [v.name for v in pf.manifest.variants if v.reference] == ["dense"]  # never the gated one (the largest)
        # either form is kept only if measured faster than dense (every interleaved round), else dropped, saying so
        dropped = {d.name: d.reason for d in pf.manifest.dropped}
        assert name in pf.names or dropped[name].startswith("gated "), dropped
        assert routed.stem in pf.names or dropped[routed.stem].startswith("routed "), dropped
