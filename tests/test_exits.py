"""Self-distilled exits: the loss and its schedule, gradients from both terms, depth variants equal to the truncated
model (in torch, after a checkpoint and on ONNX Runtime), the query-efficient teacher, and the command."""

from typing import Any

import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from typer.testing import CliRunner

from edgeshift.cli import app
from edgeshift.core.errors import EdgeshiftError
from edgeshift.exporter.onnx_export import export_onnx
from edgeshift.pruner.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from edgeshift.pruner.exits import ExitNetwork, depth_variant, exit_depths, task_weight
from edgeshift.pruner.models import get
from edgeshift.runtime.portfolio import Portfolio

X = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
Y = torch.tensor([0, 1, 2, 3, 4, 5])


def small_vit(depth: int = 4):
    torch.manual_seed(0)
    return get("vit_cifar", dim=32, depth=depth, num_heads=2, mlp_ratio=2.0)


def varied(network: ExitNetwork) -> ExitNetwork:
    """Exits that differ from the final classifier (they start as its copies)."""
    torch.manual_seed(3)
    with torch.no_grad():
        for p in [*network.norms.parameters(), *network.heads.parameters()]:
            p.add_(0.5 * torch.randn_like(p))
    return network


@torch.no_grad()
def truncated_logits(network: ExitNetwork, c: int, x: torch.Tensor) -> torch.Tensor:
    """Classifier c written out by hand: patches, class token, positions, the first blocks, the exit's norm and
    head on the class token."""
    m: Any = network.model  # a vit_cifar
    tokens = m.patch_embed(x)
    tokens = torch.cat([m.cls_token.expand(len(x), -1, -1), tokens], dim=1) + m.pos_embed
    for block in list(m.blocks)[: network.depths[c]]:
        tokens = block(tokens)
    if c == len(network.depths) - 1:
        return m.head(m.norm(tokens)[:, 0])
    return network.heads[c](network.norms[c](tokens)[:, 0])


def test_exit_depths_and_the_task_weight_schedule():
    assert exit_depths(12, 4) == [3, 6, 9, 12]  # every D/C blocks (sec. 7.2.2)
    assert exit_depths(6, 3) == [2, 4, 6]
    weights = [task_weight(s, 11) for s in range(11)]
    assert weights[0] == 1.0 and weights[-1] == 0.0  # from the labels alone to the final classifier alone
    assert all(a > b for a, b in zip(weights, weights[1:]))
    assert weights[5] == pytest.approx(0.5)


def test_the_loss_is_eq_7_2_over_the_auxiliary_classifiers_at_each_step():
    network = varied(ExitNetwork(small_vit(), 4, total_steps=5)).eval()
    for step in range(5):
        network.step = step
        final = network(X)
        a = task_weight(step, 5)
        soft = F.softmax(final.detach(), dim=1)
        expected = sum(
            (1 - a) * F.cross_entropy(q, soft) + a * F.cross_entropy(q, Y)
            for q in (truncated_logits(network, c, X) for c in range(3))
        )
        assert float(network.loss(Y).detach()) == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.parametrize("step, label_term, distill_term", [(0, True, False), (4, False, True), (2, True, True)])
def test_the_exits_learn_from_the_labels_and_from_the_final_classifier(step, label_term, distill_term):
    network = varied(ExitNetwork(small_vit(), 2, total_steps=5))
    network.step = step
    network(X)
    network.loss(Y).backward()
    exit_grad = network.heads[0].weight.grad
    assert exit_grad is not None and exit_grad.abs().sum() > 0
    assert network.model.head.weight.grad is None  # the final classifier is the teacher here: no gradient to it
    # which term moved the exit: the gradient of each term alone, against the sum
    grads = []
    for target in (Y, F.softmax(network.model(X).detach(), dim=1)):
        network.zero_grad()
        F.cross_entropy(network.exit_logits(_tokens_after(network, 0), 0), target).backward()
        grads.append(network.heads[0].weight.grad.clone())
    a = task_weight(step, 5)
    assert torch.allclose(exit_grad, a * grads[0] + (1 - a) * grads[1], atol=1e-6)
    assert (a > 0) == label_term and (a < 1) == distill_term


def _tokens_after(network: ExitNetwork, c: int) -> torch.Tensor:
    m: Any = network.model  # a vit_cifar
    tokens = torch.cat([m.cls_token.expand(len(X), -1, -1), m.patch_embed(X)], dim=1) + m.pos_embed
    for block in list(m.blocks)[: network.depths[c]]:
        tokens = block(tokens)
    return tokens


def test_each_depth_variant_is_the_truncated_model_in_torch_after_a_checkpoint_and_on_onnx_runtime(tmp_path):
    network = varied(ExitNetwork(small_vit(), 2)).eval()
    for c in range(2):
        variant = depth_variant(network, c).eval()
        with torch.no_grad():
            expected = truncated_logits(network, c, X)
            assert torch.allclose(variant(X), expected, atol=1e-5)
        save_checkpoint(variant, tmp_path / f"v{c}.pt")
        loaded, _ = load_checkpoint(tmp_path / f"v{c}.pt")
        with torch.no_grad():
            assert torch.equal(loaded.eval()(X), variant(X))
        export_onnx(loaded, X, tmp_path / f"v{c}.onnx")
        session = ort.InferenceSession(str(tmp_path / f"v{c}.onnx"), providers=["CPUExecutionProvider"])
        out = session.run(None, {session.get_inputs()[0].name: X.numpy()})[0]
        assert abs(out - expected.numpy()).max() <= 1e-4
    # the shallow one is smaller: its later blocks are gone, not skipped at run time
    params = [sum(p.numel() for p in depth_variant(network, c).parameters()) for c in range(2)]
    assert params[0] < params[1]


class CountingTeacher(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.seen = 0
        self.fc = nn.Linear(3 * 32 * 32, 10)

    def forward(self, x):
        self.seen += len(x)
        return self.fc(x.flatten(1))


def test_the_teacher_is_queried_only_on_what_the_final_classifier_gets_wrong():
    teacher = CountingTeacher()
    network = ExitNetwork(small_vit(), 2, teacher=teacher).eval()
    final = network(X)
    wrong = int((final.argmax(1) != Y).sum())
    without = ExitNetwork(small_vit(), 2).eval()
    without(X)
    loss, plain = network.loss(Y), without.loss(Y)
    assert teacher.seen == wrong > 0
    with torch.no_grad():
        target = F.softmax(teacher.fc(X[final.argmax(1) != Y].flatten(1)), dim=1)
        expected = F.cross_entropy(final[final.argmax(1) != Y], target)
    assert float((loss - plain).detach()) == pytest.approx(float(expected), rel=1e-5)


def test_a_model_without_a_transformer_layout_is_refused():
    with pytest.raises(EdgeshiftError, match="has no blocks"):
        ExitNetwork(get("resnet20"), 2)
    with pytest.raises(EdgeshiftError, match=r"exits must be in \[2, 4\]"):
        ExitNetwork(small_vit(), 5)


def test_edgeshift_exits_then_export_gives_one_variant_per_exit(tmp_path):
    runner = CliRunner()
    common = ["--data", "generated", "--train-samples", "256", "--test-samples", "64", "--batch-size", "64"]
    refused = runner.invoke(app, ["exits", "--arch", "resnet20", "-o", str(tmp_path / "no"), *common])
    assert refused.exit_code == 2 and "Traceback" not in refused.output
    assert refused.output.splitlines()[-1].startswith("error: ") and "has no blocks" in refused.output
    assert not any((tmp_path / "no" / "variants").iterdir())  # refused before any training
    kwargs = '{"dim": 32, "depth": 4, "num_heads": 2}'
    args = ["exits", "--arch", "vit_cifar", "--arch-kwargs", kwargs, "-o", str(tmp_path / "run"), "--exits", "2"]
    result = runner.invoke(app, [*args, "--epochs", "1", *common])
    assert result.exit_code == 0, result.output
    made = sorted((tmp_path / "run" / "variants").glob("exit*.pt"))
    assert [p.name for p in made] == ["exit1of2-depth2-scratch.pt", "exit2of2-depth4-scratch.pt"]
    assert [read_checkpoint(p)["meta"]["exit"]["depth"] for p in made] == [2, 4]
    out = tmp_path / "exits.zip"
    exported = runner.invoke(app, ["export", *map(str, made), "-o", str(out), "--no-memory", "--force"])
    assert exported.exit_code == 0, exported.output
    with Portfolio.open(out) as pf:
        kept = set(pf.names) | {d.name for d in pf.manifest.dropped}
    assert kept == {p.stem for p in made}


def test_exits_from_a_trained_checkpoint_keep_its_weights_below_the_first_exit(tmp_path):
    """From DENSE, training starts at its weights: with a zero learning rate, the shallowest variant's blocks are
    the checkpoint's, and the deepest variant is the checkpoint itself."""
    model = small_vit()
    save_checkpoint(model, tmp_path / "dense.pt")
    common = ["--data", "generated", "--train-samples", "128", "--test-samples", "32", "--batch-size", "64"]
    args = ["exits", str(tmp_path / "dense.pt"), "-o", str(tmp_path / "run"), "--exits", "2", "--lr", "0"]
    result = CliRunner().invoke(app, [*args, "--epochs", "1", *common])
    assert result.exit_code == 0, result.output
    shallow, _ = load_checkpoint(tmp_path / "run" / "variants" / "exit1of2-depth2-dense.pt")
    deep, _ = load_checkpoint(tmp_path / "run" / "variants" / "exit2of2-depth4-dense.pt")
    for name, value in model.state_dict().items():
        assert torch.equal(deep.state_dict()[name], value), name
        if name.startswith(("patch_embed", "cls_token", "pos_embed", "blocks.0.", "blocks.1.")):
            assert torch.equal(shallow.state_dict()[name], value), name
    assert not any(k.startswith("blocks.2.") for k in shallow.state_dict())  # cut after block 2
