"""Layer pruning: candidates, removal, criteria, budgets, the CLI, and depth-pruned variants in a portfolio."""

import json
import zipfile

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from edgeshift.cli import app
from edgeshift.core.errors import EdgeshiftError, UnknownNameError
from edgeshift.exporter.onnx_export import export_onnx
from edgeshift.pruner.checkpoint import load_checkpoint, save_checkpoint
from edgeshift.pruner.data import load_dataset
from edgeshift.pruner.layers import criteria, find_candidates, remove_candidates
from edgeshift.pruner.layers.criteria import Imprint
from edgeshift.pruner.layers.layerprune import LayerPruneConfig, criterion_data
from edgeshift.pruner.models import get

runner = CliRunner()


def expected_candidates(model) -> list[str]:
    """Worked out from the architecture, independently of find_candidates."""
    if hasattr(model, "layers"):  # CIFAR ResNet: blocks whose shortcut is the identity (not downsampling)
        return [f"layers.{i}" for i, b in enumerate(model.layers) if isinstance(b.shortcut, nn.Identity)]
    names, previous = [], None
    for i, m in enumerate(model.features):  # VGG: convs with equal in/out channels, right after another conv
        conv = m[0] if isinstance(m, nn.Sequential) else None
        if conv is not None and conv.in_channels == conv.out_channels and isinstance(previous, nn.Sequential):
            names.append(f"features.{i}")
        previous = m
    return names


@pytest.mark.parametrize("arch, count", [("resnet20", 7), ("resnet56", 25), ("vgg16", 8)])
def test_candidates_are_exactly_the_shape_preserving_ones(arch, count):
    model = get(arch)
    found = find_candidates(model, torch.randn(1, 3, 32, 32))
    assert [c.name for c in found] == expected_candidates(model)
    assert len(found) == count
    for c in found:  # and each one really preserves the shape
        seen = {}
        h = model.get_submodule(c.name).register_forward_hook(lambda m, i, o: seen.update(i=i[0].shape, o=o.shape))
        model.eval()(torch.randn(1, 3, 32, 32))
        h.remove()
        assert seen["i"] == seen["o"] and tuple(seen["i"][1:]) == c.shape


@pytest.mark.parametrize(
    "arch, remove", [("resnet20", ["layers.1", "layers.4", "layers.8"]), ("vgg16", ["features.4", "features.12"])]
)
def test_removal_keeps_the_model_runnable_exportable_and_reloadable(arch, remove, tmp_path):
    torch.manual_seed(0)
    model = get(arch).eval()
    candidates = find_candidates(model, torch.randn(1, 3, 32, 32))
    pruned = remove_candidates(model, remove, candidates).eval()
    assert all(isinstance(pruned.get_submodule(n), nn.Identity) for n in remove)
    assert not any(isinstance(model.get_submodule(n), nn.Identity) for n in remove)  # the input is untouched
    x = torch.randn(3, 3, 32, 32)
    assert pruned(x).shape == (3, 10)
    report = export_onnx(pruned, x, tmp_path / "p.onnx")
    assert report.op_counts["Conv"] == sum(isinstance(m, nn.Conv2d) for m in pruned.modules())
    save_checkpoint(pruned, tmp_path / "p.pt")
    again, _ = load_checkpoint(tmp_path / "p.pt")
    assert torch.equal(again(x), pruned(x))
    with pytest.raises(EdgeshiftError, match="not removable: features.14"):
        remove_candidates(model, ["features.14"], candidates)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """ResNet-20 trained briefly on the generated data (a checkpoint, as `edgeshift train` writes it)."""
    path = tmp_path_factory.mktemp("lp") / "dense.pt"
    result = runner.invoke(
        app,
        [
            "train",
            "--arch",
            "resnet20",
            "--data",
            "generated",
            "--iterations",
            "60",
            "--batch-size",
            "32",
            "--lr",
            "0.05",
            "--train-samples",
            "800",
            "-o",
            str(path),
        ],
    )
    assert result.exit_code == 0, result.output
    return path


def test_imprint_final_candidate_matches_the_model_accuracy(trained):
    model, _ = load_checkpoint(trained)
    data = criterion_data(load_dataset("generated", "train"), 10, LayerPruneConfig(remove=1, imprint_samples=600))
    candidates = find_candidates(model, torch.randn(1, 3, 32, 32))
    proxy = Imprint().proxy_accuracies(model, candidates, data)
    with torch.no_grad():
        own = float((model(data.heldout_x).argmax(1) == data.heldout_y).float().mean())
    assert own > 0.8  # the model learned the data
    assert abs(proxy[-1] - own) <= 0.05
    scores = Imprint().score(model, candidates, data)
    assert scores[candidates[-1].name] == pytest.approx(proxy[-1] - proxy[-2])


def test_every_criterion_scores_every_candidate(trained):
    model, _ = load_checkpoint(trained)
    data = criterion_data(
        load_dataset("generated", "train"),
        10,
        LayerPruneConfig(remove=1, imprint_samples=200, heldout_samples=200, batch_size=100),
    )
    data.taylor_batches = 2
    candidates = find_candidates(model, torch.randn(1, 3, 32, 32))
    names = [c.name for c in candidates]
    for criterion in criteria.names():
        scores = criteria.get(criterion).score(model, candidates, data)
        assert list(scores) == names and all(isinstance(v, float) and v == v for v in scores.values())
    ensemble = criteria.get("ensemble").score(model, candidates, data)
    assert sum(ensemble.values()) == 4 * sum(range(len(names)))  # each member ranks 0..n-1
    with pytest.raises(UnknownNameError, match="unknown layer criterion 'l1'; known: bn-scale, ensemble, imprint"):
        criteria.get("l1")


def test_layerprune_cli_removes_fine_tunes_and_mixes_into_a_portfolio(trained, tmp_path):
    out, rep = tmp_path / "lp.pt", tmp_path / "lp.json"
    result = runner.invoke(
        app,
        [
            "layerprune",
            str(trained),
            "--criterion",
            "imprint",
            "--remove",
            "2",
            "--data",
            "generated",
            "--iterations",
            "5",
            "--batch-size",
            "32",
            "--train-samples",
            "200",
            "--test-samples",
            "100",
            "--imprint-samples",
            "300",
            "-o",
            str(out),
            "--json",
            str(rep),
        ],
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(rep.read_text())
    for step in (
        "loading generated",
        "ranking layers and blocks by imprint",
        "choosing what to remove (7 candidates)",
        f"removed {', '.join(doc['removed'])}; top-1 before and after",
    ):  # nothing runs for minutes unannounced
        assert step in result.output
    assert len(doc["candidates"]) == 7 and len(doc["removed"]) == 2
    ranked = sorted(doc["candidates"], key=lambda c: c["rank"])
    assert [c["name"] for c in ranked[:2]] == doc["removed"]  # the two lowest-ranked went
    assert all(ranked[i]["score"] <= ranked[i + 1]["score"] for i in range(len(ranked) - 1))
    assert doc["params_after"] < doc["params_before"] and doc["macs_after"] < doc["macs_before"]
    for key in ("accuracy_before", "accuracy_removed", "accuracy_after"):
        assert 0.0 <= doc[key] <= 1.0
    assert doc["latency_after"]["p50_ms"] > 0 and doc["finetune"]["steps"] == 5
    model, payload = load_checkpoint(out)
    assert all(isinstance(model.get_submodule(n), nn.Identity) for n in doc["removed"])
    assert "removed  2:" in result.output and "ONNX Runtime" in result.output
    pf = tmp_path / "mixed.zip"
    result = runner.invoke(
        app,
        [
            "export",
            str(trained),
            str(out),
            "-o",
            str(pf),
            "--data",
            "generated",
            "--test-samples",
            "100",
            "--iterations",
            "5",
            "--no-memory",
        ],
    )
    assert result.exit_code == 0, result.output
    manifest = json.loads(zipfile.ZipFile(pf).read("manifest.json"))
    names = {v["name"] for v in manifest["variants"]} | {d["name"] for d in manifest.get("dropped", [])}
    assert names == {"dense", "lp"}


def test_latency_budget_met_without_removal_removes_nothing(trained, tmp_path):
    result = runner.invoke(
        app,
        [
            "layerprune",
            str(trained),
            "--criterion",
            "weight-norm",
            "--latency-budget",
            "1e6",
            "--data",
            "generated",
            "--epochs",
            "0",
            "--test-samples",
            "50",
            "-o",
            str(tmp_path / "x.pt"),
            "--json",
            str(tmp_path / "x.json"),
        ],
    )
    assert result.exit_code == 0, result.output
    doc = json.loads((tmp_path / "x.json").read_text())
    assert doc["removed"] == [] and [t["removed"] for t in doc["tried"]] == [0]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--criterion", "imprint", "--remove", "8"], "has 7 removable candidates; pass --remove 1..7"),
        (["--criterion", "weight-norm", "--latency-budget", "0.000001"], "latency budget 1e-06 ms is out of reach"),
        (["--criterion", "l1", "--remove", "1"], "unknown layer criterion 'l1'; known:"),
        (["--criterion", "imprint", "--remove", "1", "--latency-budget", "3"], "give exactly one budget"),
        (["--criterion", "imprint", "--remove", "1", "--profile", "pi3"], "unknown device profile 'pi3'"),
        (
            ["--criterion", "imprint", "--remove", "1", "--distill", "1"],
            "distillation weight is a share of the loss in [0, 1), got 1.0",
        ),
    ],
)
def test_layerprune_cli_bad_input(trained, args, message, tmp_path):
    result = runner.invoke(
        app,
        [
            "layerprune",
            str(trained),
            "--data",
            "generated",
            "--epochs",
            "0",
            "--test-samples",
            "50",
            "-o",
            str(tmp_path / "x.pt"),
            *args,
        ],
    )
    lines = result.output.splitlines()
    assert result.exit_code == 2 and message in lines[-1], result.output
    assert sum(line.startswith("error:") for line in lines) == 1 and "Traceback" not in result.output
    if "latency budget" not in message:  # known before any work: one line; a budget is out of reach once timed
        assert len(lines) == 1, result.output
    assert not (tmp_path / "x.pt").exists()
