"""Model sources: a factory of the user's own (`mymodels:build`) with a state dict through `prune`,
`export` and `pipeline` to a portfolio the runtime serves; bad sources, factories and weights are one line."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import torch
from helpers import assert_same_function
from test_any_cnn import check_exact, fresh, widths
from test_any_cnn import plant as plant_bn
from typer.testing import CliRunner

from edgeshift.cli import app
from edgeshift.pruner.checkpoint import load_checkpoint, save_checkpoint
from edgeshift.pruner.models import sources
from edgeshift.pruner.models.record import record_of
from edgeshift.pruner.structured import prune_zero_channels

runner = CliRunner()

MYMODELS = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, num_classes=10, width=8):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.BatchNorm2d(2 * width)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


class Branchy(Net):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: not traceable
            return super().forward(x)
        return super().forward(-x)


def build(num_classes=10, width=8):
    return Net(num_classes, width)


def branchy(num_classes=10):
    return Branchy(num_classes)
"""


@pytest.fixture
def user_dir(tmp_path, monkeypatch):
    """A working folder holding the user's model file and a trained state dict with planted zero channels."""
    (tmp_path / "mymodels.py").write_text(MYMODELS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    model = sources.create("mymodels:build", num_classes=10, input_size=32, kwargs={"width": 8})
    with torch.no_grad():
        model.bn1.weight[[1, 5]] = 0
        model.bn1.bias[[1, 5]] = 0
        model.bn2.weight[[0, 3, 9]] = 0
        model.bn2.bias[[0, 3, 9]] = 0
    torch.save(model.state_dict(), tmp_path / "w.pt")
    torch.save(sources.create("mymodels:build", input_size=32, kwargs={"width": 4}).state_dict(), tmp_path / "w4.pt")
    return tmp_path


MODEL_ARGS = ["--arch", "mymodels:build", "--arch-kwargs", '{"width": 8}', "--weights", "w.pt", "--input-size", "32"]


def one_error_line(result) -> str:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def test_factory_with_weights_through_prune_and_export_to_a_served_portfolio(user_dir):
    result = runner.invoke(app, ["prune", *MODEL_ARGS, "-o", "p.pt"])
    assert result.exit_code == 0, result.output
    pruned, payload = load_checkpoint(user_dir / "p.pt")
    assert payload["arch"]["name"] == "mymodels:build" and payload["arch"]["kwargs"] == {"width": 8}
    assert pruned.conv1.out_channels == 6 and pruned.conv2.out_channels == 13
    original = sources.create("mymodels:build", num_classes=10, input_size=32, kwargs={"width": 8})
    original.load_state_dict(torch.load(user_dir / "w.pt", weights_only=True))
    assert_same_function(original, pruned, fresh((3, 3, 32, 32), seed=99))  # the test's own float64 oracle
    result = runner.invoke(
        app,
        [
            "export",
            "p.pt",
            *MODEL_ARGS,
            "-o",
            "port.zip",
            "--data",
            "generated",
            "--test-samples",
            "50",
            "--iterations",
            "5",
            "--no-memory",
        ],
    )
    assert result.exit_code == 0, result.output
    bench = runner.invoke(app, ["bench", "port.zip", "--json", "b.json"])
    assert bench.exit_code == 0, bench.output
    names = {row["name"] for row in json.loads((user_dir / "b.json").read_text())["variants"]}
    with zipfile.ZipFile(user_dir / "port.zip") as z:
        held = {v["name"] for v in json.loads(z.read("manifest.json"))["variants"]}
    assert names == held and "dense" in held  # every variant the portfolio holds was served, the reference too


PIPELINE = """
[model]
arch = "mymodels:build"
kwargs = {{ width = 8 }}
weights = "w.pt"
input_size = 32
[data]
path = "generated"
train_samples = 200
test_samples = 100
[[methods]]
name = "synflow"
levels = 1
[train]
epochs = 1
batch_size = 100
warmup = 0
[deploy]
export_test_samples = 100
latency_iterations = 5
[output]
dir = "{out}"
"""


def test_pipeline_on_a_factory_of_the_users_own_ends_in_a_portfolio_bench_serves(user_dir):
    (user_dir / "p.toml").write_text(PIPELINE.format(out=user_dir / "out"))
    result = runner.invoke(app, ["pipeline", "p.toml"])
    assert result.exit_code == 0, result.output
    manifest_arch = json.loads((user_dir / "out" / "portfolio.bench.json").read_text())
    assert manifest_arch["variants"]
    bench = runner.invoke(app, ["bench", str(user_dir / "out" / "portfolio.zip"), "--json", "b.json"])
    assert bench.exit_code == 0, bench.output
    assert json.loads((user_dir / "b.json").read_text())["variants"]
    level0, _ = load_checkpoint(user_dir / "out" / "variants" / "run" / "level_0" / "checkpoint.pt")
    assert record_of(level0).name == "mymodels:build"


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--arch", "keras/resnet"], "unknown model source 'keras/resnet'"),
        (["--arch", "resnet21"], "unknown architecture 'resnet21'"),
        (["--arch", "nosuchmodule:build", "--input-size", "32"], "cannot import 'nosuchmodule'"),
        (["--arch", "mymodels:nothing", "--input-size", "32"], "has no function 'nothing'"),
        (["--arch", "mymodels:build"], "does not say its input size"),
        (["--arch", "mymodels:build", "--input-size", "32", "--weights", "w4.pt"], "does not fit model mymodels:build"),
        (["--arch", "mymodels:build", "--input-size", "32", "--weights", "missing.pt"], "weights file not found"),
        (["--arch", "mymodels:build", "--input-size", "32", "--arch-kwargs", "{width: 8}"], "is not JSON"),
        (["--arch", "mymodels:build", "--input-size", "32", "--arch-kwargs", '{"depth": 3}'], "bad options"),
        (["--arch", "mymodels:branchy", "--input-size", "32"], "cannot be traced"),
    ],
)
def test_bad_model_sources_are_one_line_and_write_nothing(user_dir, args, expected):
    result = runner.invoke(app, ["prune", *args, "-o", "p.pt"])
    line = one_error_line(result)
    assert expected in line, line
    assert not (user_dir / "p.pt").exists()


def test_weights_file_of_another_model_names_the_keys(user_dir):
    state = torch.load(user_dir / "w.pt", weights_only=True)
    state["extra.weight"] = torch.zeros(2)
    del state["fc.bias"]
    torch.save(state, user_dir / "other.pt")
    result = runner.invoke(
        app, ["prune", *MODEL_ARGS[:-4], "--weights", "other.pt", "--input-size", "32", "-o", "p.pt"]
    )
    line = one_error_line(result)
    assert "1 missing (fc.bias)" in line and "1 unexpected (extra.weight)" in line


def test_pipeline_refuses_a_bad_factory_before_writing(user_dir):
    (user_dir / "p.toml").write_text(
        PIPELINE.format(out=user_dir / "out").replace("mymodels:build", "mymodels:missing")
    )
    result = runner.invoke(app, ["pipeline", "p.toml"])
    assert "has no function 'missing'" in one_error_line(result)
    assert not (user_dir / "out").exists()


def test_pruned_models_of_any_source_round_trip_through_a_checkpoint(tmp_path, monkeypatch):
    (tmp_path / "patterns_factory.py").write_text(
        "import sys\nsys.path.insert(0, %r)\nfrom test_any_cnn import NormActNet, GroupedNet, Res2Block\n"
        "def build(kind='normact'):\n"
        "    return {'normact': NormActNet, 'grouped': GroupedNet, 'res2': lambda: Res2Block(True)}[kind]()\n"
        % str(Path(__file__).parent)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    for kind, bn_names in (("normact", ("bn1", "bn2")), ("grouped", ("bn1", "bn2")), ("res2", ("bn1", "bns.0"))):
        model = sources.create("patterns_factory:build", input_size=16, kwargs={"kind": kind}).eval()
        plant_bn(model.get_submodule(bn_names[0]), zero=[2, 3] if kind != "res2" else [1, 5, 9])
        plant_bn(model.get_submodule(bn_names[1]), zero=[2, 3, 6] if kind != "res2" else [0])
        pruned, _ = prune_zero_channels(model, fresh())
        save_checkpoint(pruned, tmp_path / f"{kind}.pt")
        loaded, payload = load_checkpoint(tmp_path / f"{kind}.pt")
        assert payload["arch"]["name"] == "patterns_factory:build" and payload["arch"]["kwargs"] == {"kind": kind}
        assert widths(loaded) == widths(pruned)
        check_exact(pruned, loaded)
    assert loaded.width == 3  # the Res2Net block's split width, recorded with its layers


def test_train_imp_and_pai_take_a_factory_with_its_options(user_dir):
    fast = [
        "--data",
        "generated",
        "--batch-size",
        "32",
        "--train-samples",
        "64",
        "--test-samples",
        "32",
        "--iterations",
        "2",
    ]
    result = runner.invoke(app, ["train", *MODEL_ARGS, *fast, "-o", "t.pt"])
    assert result.exit_code == 0, result.output
    trained, _ = load_checkpoint(user_dir / "t.pt")
    assert record_of(trained).name == "mymodels:build" and trained.conv1.out_channels == 8
    result = runner.invoke(app, ["imp", *MODEL_ARGS, *fast, "--levels", "1", "--out", "run"])
    assert result.exit_code == 0, result.output
    level1, payload = load_checkpoint(user_dir / "run" / "level_1" / "checkpoint.pt")
    assert record_of(level1).kwargs == {"width": 8} and payload["masks"]
    result = runner.invoke(
        app,
        [
            "pai",
            "--arch",
            "mymodels:build",
            "--arch-kwargs",
            '{"width": 16}',
            "--input-size",
            "32",
            "--sparsity",
            "0.5",
            "--all-layers",
            "--no-latency",
            "-o",
            "pai.pt",
        ],
    )
    assert result.exit_code == 0, result.output
    pai, _ = load_checkpoint(user_dir / "pai.pt")
    assert record_of(pai).kwargs == {"width": 16} and pai.conv1.out_channels < 16
