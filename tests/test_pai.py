"""Pruning at initialisation (Reconvene): the decision rule, the rectifier's widths and masks, coupling, the CLI."""

import json
import math

import numpy as np
import onnx
import pytest
import torch
from typer.testing import CliRunner

from edgeshift.cli import app
from edgeshift.exporter.onnx_export import export_onnx
from edgeshift.pruner import sparse
from edgeshift.pruner.checkpoint import load_checkpoint
from edgeshift.pruner.models import get
from edgeshift.pruner.pai import PaiConfig, pai, planned_channels, prune_at_init

runner = CliRunner()


def planted_mask(model, sparsities: dict[str, float], seed: int = 0) -> sparse.Mask:
    """A mask giving each named layer exactly the requested sparsity (positions seeded-random)."""
    g = torch.Generator().manual_seed(seed)
    mask = sparse.full_mask(model)
    for name, s in sparsities.items():
        m = mask[f"{name}.weight"]
        flat = torch.ones(m.numel(), dtype=torch.bool)
        flat[torch.randperm(m.numel(), generator=g)[: round(s * m.numel())]] = False
        mask[f"{name}.weight"] = flat.reshape(m.shape)
    return mask


def exact_sparsities(model, wanted: dict[str, float]) -> dict[str, float]:
    """The sparsities ``planted_mask`` really produces (rounded to whole weights)."""
    mods = dict(model.named_modules())
    return {n: round(s * mods[n].weight.numel()) / mods[n].weight.numel() for n, s in wanted.items()}


def widths(model) -> dict[str, int]:
    return {n: m.weight.shape[0] for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}


VGG11_PATTERN = {
    "features.0.0": 0.10,
    "features.2.0": 0.20,
    "features.4.0": 0.50,
    "features.5.0": 0.90,
    "features.7.0": 0.95,
    "features.8.0": 0.30,
    "features.10.0": 0.80,
    "features.11.0": 0.99,
    "fc": 0.50,
}


@pytest.mark.parametrize(
    "mode, shrinks",
    [
        ("reconvene", lambda r: r),
        ("all-layers", lambda r: True),
        ("inverted", lambda r: not r),
        ("unstructured", lambda r: False),
    ],
)
def test_decision_rule_and_widths_on_a_hand_made_pattern(mode, shrinks):
    torch.manual_seed(0)
    model = get("vgg11").eval()
    before = widths(model)
    mask = planted_mask(model, VGG11_PATTERN)
    s = exact_sparsities(model, VGG11_PATTERN)
    s_avg = float(np.mean(list(s.values())))
    new_mask, layers, got_avg = prune_at_init(model, mask, mode=mode)
    assert got_avg == pytest.approx(s_avg, abs=1e-12)
    by_name = {layer.name: layer for layer in layers}
    after = widths(model)
    for name, sl in s.items():
        resilient = sl >= s_avg
        assert by_name[name].resilient == resilient, name
        assert by_name[name].sparsity == pytest.approx(sl)
        if name == "fc":  # the output layer never changes width
            assert after[name] == 10
            continue
        expected = math.ceil(before[name] * (1 - sl)) if shrinks(resilient) else before[name]
        assert after[name] == expected == by_name[name].channels_after, (name, mode)
        assert by_name[name].channels_before == before[name]
        # a shrunk layer is dense; a kept one keeps its mask, sliced to the inputs that survived
        layer_mask = new_mask[f"{name}.weight"]
        assert tuple(layer_mask.shape) == tuple(dict(model.named_modules())[name].weight.shape)
        if shrinks(resilient):
            assert layer_mask.all() and by_name[name].structured
        else:
            assert not by_name[name].structured
            assert 1 - layer_mask.float().mean() == pytest.approx(sl, abs=0.08)
    # masked weights are zero, the model runs
    for k, p in sparse.prunable(model).items():
        assert not p[~new_mask[k]].any()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_resilient_layers_follow_the_rule_under_both_averages():
    torch.manual_seed(0)
    model = get("vgg11").eval()
    mask = planted_mask(model, VGG11_PATTERN)
    _, layers, s_avg = prune_at_init(model, mask, average="global")
    assert s_avg == pytest.approx(1 - sparse.density(mask))
    assert [layer.resilient for layer in layers] == [layer.sparsity >= s_avg for layer in layers]


def test_kept_channels_are_the_ones_the_sensitive_consumer_still_reads():
    torch.manual_seed(0)
    model = get("vgg11").eval()
    pattern = {n: 0.1 for n in VGG11_PATTERN}
    pattern["features.7.0"] = 0.99  # resilient: 512 -> 6 channels
    mask = planted_mask(model, pattern)
    consumer = mask["features.8.0.weight"]  # sensitive; reads only input channels 100..109 from here on
    consumer[:, :100] = False
    consumer[:, 110:] = False
    new_mask, _, _ = prune_at_init(model, mask)
    assert dict(model.named_modules())["features.7.0"].out_channels == 6
    kept = new_mask["features.8.0.weight"]
    assert kept.shape[1] == 6 and kept.any((0, 2, 3)).all()  # every kept channel is one the consumer reads


def test_residual_stream_shrinks_consistently_when_every_writer_is_resilient():
    torch.manual_seed(0)
    model = get("resnet20").eval()
    pattern = {k[: -len(".weight")]: 0.2 for k in sparse.prunable(model)}
    stage1_writers = ["conv1"] + [f"layers.{i}.conv2" for i in range(3)]
    for i, name in enumerate(stage1_writers):
        pattern[name] = 0.7 + 0.05 * i  # resilient, planned 16 * (0.3, 0.25, 0.2, 0.15) -> 5, 4, 4, 3
    mask = planted_mask(model, pattern)
    new_mask, layers, _ = prune_at_init(model, mask)
    w = widths(model)
    assert {w[n] for n in stage1_writers} == {5}  # the largest plan of the group, for every writer
    mods = dict(model.named_modules())
    assert mods["bn1"].num_features == 5 and all(mods[f"layers.{i}.bn2"].num_features == 5 for i in range(3))
    assert all(mods[f"layers.{i}.conv1"].in_channels == 5 for i in range(4))
    assert mods["layers.3.shortcut.0"].in_channels == 5
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_residual_stream_with_a_sensitive_writer_keeps_its_width_and_says_why():
    torch.manual_seed(0)
    model = get("resnet20").eval()
    pattern = {k[: -len(".weight")]: 0.9 for k in sparse.prunable(model)}
    pattern["conv1"] = 0.1  # the stem writes the stage-1 stream and is sensitive
    mask = planted_mask(model, pattern)
    _, layers, _ = prune_at_init(model, mask)
    by_name = {layer.name: layer for layer in layers}
    assert by_name["layers.0.conv2"].resilient and by_name["layers.0.conv2"].channels_after == 16
    assert "coupled with kept layer(s) conv1" in by_name["layers.0.conv2"].note
    assert not by_name["layers.0.conv2"].structured
    assert by_name["layers.0.conv1"].channels_after == math.ceil(16 * 0.1)  # not coupled: shrinks


@pytest.mark.parametrize("arch", ["vgg11", "resnet20"])
def test_pai_model_exports_with_exactly_the_planned_widths(arch, tmp_path):
    model, mask, report = pai(PaiConfig(arch, 0.9, measure_latency=False))
    path = tmp_path / "m.onnx"
    export_onnx(model, torch.randn(2, 3, 32, 32), path)
    proto = onnx.load(path)
    inits = {t.name: list(t.dims) for t in proto.graph.initializer}
    conv_out = sorted(dims[0] for dims in inits.values() if len(dims) == 4)
    assert conv_out == sorted(layer.channels_after for layer in report.layers if layer.name != "fc")
    assert report.compression > 1.5 and report.macs_after < report.macs_dense
    assert any(layer.structured for layer in report.layers)


def test_unstructured_mode_is_plain_pai_at_the_target_sparsity():
    model, mask, report = pai(PaiConfig("resnet20", 0.8, mode="unstructured", measure_latency=False))
    assert report.compression == 1.0 and report.params_after == report.params_dense
    assert 1 - sparse.density(mask) == pytest.approx(0.8, abs=1e-4)
    assert all(layer.channels_after == layer.channels_before for layer in report.layers)


def test_planned_channels_never_rounds_float_noise_up():
    assert planned_channels(100, 0.95) == 5
    assert planned_channels(64, 1 - 3 / 64) == 3
    assert planned_channels(16, 0.999) == 1 and planned_channels(16, 0.0) == 16


def test_pai_cli_writes_checkpoint_and_report_then_trains(tmp_path):
    out, rep = tmp_path / "p.pt", tmp_path / "p.json"
    result = runner.invoke(app, ["pai", "--arch", "resnet20", "--sparsity", "0.9", "-o", str(out), "--json", str(rep)])
    assert result.exit_code == 0, result.output
    assert "mode reconvene" in result.output and "faster" in result.output
    doc = json.loads(rep.read_text())
    assert {"sparsity", "resilient", "channels_before", "channels_after"} <= set(doc["layers"][0])
    assert doc["cpu_speedup"] > 0 and doc["latency_dense"]["p50_ms"] > 0 and doc["seconds"] > 0
    model, payload = load_checkpoint(out)
    # the compression reported is what the checkpoint holds, counted here: dense params / the model's params
    dense_params = sum(p.numel() for p in get("resnet20").parameters())
    assert doc["compression"] == pytest.approx(dense_params / sum(p.numel() for p in model.parameters()), rel=1e-9)
    assert doc["compression"] > 1
    assert payload["masks"] and payload["meta"]["pai"]["mode"] == "reconvene"
    trained = tmp_path / "t.pt"
    result = runner.invoke(
        app,
        [
            "train",
            "--init",
            str(out),
            "--data",
            "generated",
            "--iterations",
            "3",
            "--batch-size",
            "16",
            "--train-samples",
            "64",
            "--test-samples",
            "20",
            "-o",
            str(trained),
        ],
    )
    assert result.exit_code == 0, result.output
    tmodel, tpayload = load_checkpoint(trained)
    assert tpayload["meta"]["init"] == str(out) and tpayload["meta"]["pai"]["mode"] == "reconvene"
    params = sparse.prunable(tmodel)
    moved = False
    for k, m in tpayload["masks"].items():
        assert not params[k][~m].any()  # the masks were enforced while training
        moved |= not torch.equal(params[k], sparse.prunable(model)[k])
    assert moved
    assert widths(tmodel) == widths(model)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--sparsity", "1.5"], "sparsity must be in (0, 1)"),
        (["--sparsity", "0"], "sparsity must be in (0, 1)"),
        (["--sparsity", "0.9", "--scorer", "snip"], "unknown scorer 'snip'; known: magnitude, random, synflow"),
        (["--sparsity", "0.9", "--all-layers", "--inverted"], "--all-layers and --inverted exclude each other"),
    ],
)
def test_pai_cli_bad_input(args, message, tmp_path):
    result = runner.invoke(app, ["pai", "--arch", "resnet20", "-o", str(tmp_path / "x.pt"), *args])
    assert result.exit_code == 2 and message in result.output, result.output
    assert result.output.count("\n") == 1 and not (tmp_path / "x.pt").exists()
    result = runner.invoke(app, ["pai", "--arch", "resnet21", "--sparsity", "0.9", "-o", str(tmp_path / "x.pt")])
    assert result.exit_code == 2 and "unknown architecture 'resnet21'; known:" in result.output


def test_train_needs_exactly_one_of_arch_and_init(tmp_path):
    result = runner.invoke(app, ["train", "--data", "generated", "-o", str(tmp_path / "t.pt")])
    assert result.exit_code == 2 and "exactly one of --arch" in result.output


def test_layer_collapse_is_reported():
    _, _, report = pai(PaiConfig("resnet20", 0.97, measure_latency=False))  # global magnitude empties the classifier
    assert "fc" in report.collapsed_layers and "layer collapse" in report.table()
    _, _, fine = pai(PaiConfig("resnet20", 0.8, measure_latency=False))
    assert fine.collapsed_layers == []
