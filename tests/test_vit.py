"""Vision transformers through the kit: exact pruning of token-wise layers, block removal, checkpoints, export."""

import onnxruntime as ort
import pytest
import torch
from torch import nn

from edgeshift.exporter.onnx_export import export_onnx
from edgeshift.pruner.checkpoint import load_checkpoint, save_checkpoint
from edgeshift.pruner.layers import find_candidates, remove_candidates
from edgeshift.pruner.models import get
from edgeshift.pruner.structured.prune import prune_zero_channels

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def small_vit(depth: int = 2):
    torch.manual_seed(0)
    return get("vit_cifar", dim=32, depth=depth, num_heads=4, mlp_ratio=2.0).eval()


@torch.no_grad()
def kill(model):
    """Zero what makes units and heads dead, and return the widths that exact pruning must leave (worked out
    here from what was zeroed)."""
    b0, b1 = model.blocks[0], model.blocks[1]
    b0.mlp.fc2.weight[:, :5] = 0  # 5 units nobody reads
    b0.mlp.fc1.weight[10:13] = 0  # 3 units carrying gelu(bias) for every token: folded, then removed
    b0.mlp.fc1.bias[10:13] = torch.tensor([0.5, -1.0, 2.0])
    hd = b0.attn.head_dim
    b0.attn.proj.weight[:, hd : 2 * hd] = 0  # head 1: its output read by nobody
    width = b1.attn.num_heads * hd
    b1.attn.qkv.weight[2 * width + 3 * hd : 2 * width + 4 * hd] = 0  # head 3: values all zero
    b1.attn.qkv.bias[2 * width + 3 * hd : 2 * width + 4 * hd] = 0
    b1.mlp.fc1.weight[7] = 0  # zero row, zero bias: gelu(0) = 0, read or not
    b1.mlp.fc1.bias[7] = 0
    hidden = b0.mlp.fc1.out_features
    return {"blocks.0.mlp.fc1": hidden - 8, "blocks.1.mlp.fc1": hidden - 1, "heads": [3, 3]}


def test_dead_mlp_units_and_heads_go_and_the_output_stays():
    model = small_vit()
    expected = kill(model)
    reference = model(X)
    pruned, report = prune_zero_channels(model, X)
    assert pruned.blocks[0].mlp.fc1.out_features == expected["blocks.0.mlp.fc1"]
    assert pruned.blocks[1].mlp.fc1.out_features == expected["blocks.1.mlp.fc1"]
    assert [b.attn.num_heads for b in pruned.blocks] == expected["heads"]
    assert pruned.blocks[0].attn.qkv.out_features == 3 * 3 * model.blocks[0].attn.head_dim
    assert report.channels_folded == 3
    assert (pruned(X) - reference).abs().max() <= 1e-5 * reference.abs().max()
    assert report.max_abs_diff <= 1e-5 * report.max_abs_output
    assert report.macs_after < report.macs_before
    assert model.blocks[0].mlp.fc1.out_features == expected["blocks.0.mlp.fc1"] + 8  # the input is untouched


def test_a_live_transformer_passes_through_with_a_note():
    model = small_vit()
    pruned, report = prune_zero_channels(model, X)
    assert report.params_after == report.params_before
    assert report.max_abs_diff == 0
    assert any("residual stream" in n for n in report.notes)


def test_a_pruned_vit_round_trips_through_a_checkpoint(tmp_path):
    model = small_vit()
    kill(model)
    pruned, _ = prune_zero_channels(model, X)
    save_checkpoint(pruned, tmp_path / "p.pt")
    loaded, _ = load_checkpoint(tmp_path / "p.pt")
    assert [b.attn.num_heads for b in loaded.blocks] == [3, 3]
    assert torch.equal(loaded.eval()(X), pruned(X))


def test_onnx_export_matches_torch(tmp_path):
    model = small_vit()
    kill(model)
    pruned, _ = prune_zero_channels(model, X)
    report = export_onnx(pruned, X, tmp_path / "vit.onnx")
    session = ort.InferenceSession(str(tmp_path / "vit.onnx"), providers=["CPUExecutionProvider"])
    out = session.run(None, {session.get_inputs()[0].name: X.numpy()})[0]
    with torch.no_grad():
        assert abs(out - pruned(X).numpy()).max() <= 1e-4
    assert report.op_counts.get("MatMul", 0) + report.op_counts.get("Gemm", 0) >= 4 * 2  # qkv, proj, fc1, fc2


class UserTransformer(nn.Module):
    """A ViT written the way a user might: torch's own encoder layer, a Sequential MLP head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 32, 8, stride=8)
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 10))

    def forward(self, x):
        tokens = self.encoder(self.embed(x).flatten(2).transpose(1, 2))
        return self.head(tokens.mean(1))


def test_a_user_written_transformer_is_pruned_exactly_or_passed_through():
    torch.manual_seed(0)
    model = UserTransformer().eval()
    with torch.no_grad():
        model.encoder.layers[0].linear2.weight[:, :6] = 0  # 6 dead units in the first layer's MLP
    reference = model(X)
    pruned, report = prune_zero_channels(model, X)
    assert (pruned(X) - reference).abs().max() <= 1e-5 * reference.abs().max()
    assert report.max_abs_diff <= 1e-5 * report.max_abs_output


def test_transformer_blocks_are_layerprune_candidates_and_removal_zeroes_their_branches():
    model = small_vit(depth=3)
    candidates = find_candidates(model, X[:1])
    assert [c.name for c in candidates] == ["blocks.0", "blocks.1", "blocks.2"]
    assert all(c.shape == (1 + 64, 32) for c in candidates)
    removed = remove_candidates(model, ["blocks.1"], candidates).eval()
    oracle = small_vit(depth=3)  # the same weights, with the block's two residual branches at zero
    with torch.no_grad():
        for layer in (oracle.blocks[1].attn.proj, oracle.blocks[1].mlp.fc2):
            layer.weight.zero_()
            layer.bias.zero_()
    assert torch.allclose(removed(X), oracle(X), atol=1e-6)


@pytest.mark.parametrize("criterion", ["weight-norm", "taylor", "imprint"])
def test_every_layer_criterion_scores_transformer_blocks(criterion):
    from edgeshift.pruner.layers import criteria
    from edgeshift.pruner.layers.criteria import CriterionData

    model = small_vit(depth=3)
    candidates = find_candidates(model, X[:1])
    g = torch.Generator().manual_seed(0)
    data = CriterionData(
        torch.randn(16, 3, 32, 32, generator=g),
        torch.randint(0, 10, (16,), generator=g),
        torch.randn(16, 3, 32, 32, generator=g),
        torch.randint(0, 10, (16,), generator=g),
        10,
        batch_size=8,
    )
    scores = criteria.get(criterion).score(model, candidates, data)
    assert set(scores) == {c.name for c in candidates}
    assert all(s == s for s in scores.values())  # no NaN
