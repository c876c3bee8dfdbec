import json

from typer.testing import CliRunner

from edgeshift.cli import app
from edgeshift.pruner.checkpoint import load_checkpoint

runner = CliRunner()
SMALL = [
    "--data",
    "generated",
    "--iterations",
    "2",
    "--batch-size",
    "16",
    "--train-samples",
    "64",
    "--test-samples",
    "20",
]


def test_imp_cli_writes_levels_and_resumes(tmp_path):
    out = tmp_path / "run"
    args = ["imp", "--arch", "resnet20", "--levels", "2", "--out", str(out), *SMALL]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "level 2: sparsity 75.00% (4.0x)" in result.output
    assert json.loads((out / "level_1" / "metrics.json").read_text())["sparsity"] == 0.5
    written = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    again = runner.invoke(app, args + [])  # everything finished: nothing is retrained or rewritten
    assert again.exit_code == 0 and "level 2" in again.output
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == written
    other = runner.invoke(
        app, ["imp", "--arch", "resnet20", "--levels", "2", "--out", str(out), "--lr", "0.01", *SMALL]
    )
    assert other.exit_code == 2 and "another configuration (differs in: lr)" in other.output


def test_imp_cli_bad_input(tmp_path):
    (tmp_path / "flat").mkdir()
    result = runner.invoke(
        app, ["imp", "--arch", "resnet20", "--data", str(tmp_path / "flat"), "--out", str(tmp_path / "r")]
    )
    assert result.exit_code == 2 and "not an ImageFolder dataset" in result.output
    result = runner.invoke(app, ["imp", "--arch", "resnet21", "--data", "generated", "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "unknown architecture 'resnet21'" in result.output
    result = runner.invoke(
        app,
        ["imp", "--arch", "resnet20", "--prune-fraction", "1.5", "--out", str(tmp_path / "r"), "--data", "generated"],
    )
    assert result.exit_code == 2 and "prune-fraction" in result.output
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    result = runner.invoke(app, ["imp", "--arch", "resnet20", "--out", str(tmp_path / "busy"), *SMALL])
    assert result.exit_code == 2 and "not an edgeshift run directory" in result.output
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine"


def test_train_cli_saves_a_checkpoint_with_its_normalisation(tmp_path):
    result = runner.invoke(app, ["train", "--arch", "resnet20", "-o", str(tmp_path / "d.pt"), *SMALL])
    assert result.exit_code == 0, result.output
    model, payload = load_checkpoint(tmp_path / "d.pt")
    assert payload["arch"]["normalisation"] == {"mean": [0.5, 0.5, 0.5], "std": [0.3, 0.3, 0.3]}
    assert "test_accuracy" in payload["meta"]


def test_train_with_adamw_takes_adamw_steps(tmp_path):
    """`train --optimizer adamw`: the trained weights are one AdamW step from the initial ones, taken here by hand
    on the same batch (the whole subset: its order does not change the mean loss)."""
    import torch
    import torch.nn.functional as F

    from edgeshift.pruner.data import load_dataset
    from edgeshift.pruner.models import get

    args = ["train", "--arch", "vit_cifar", "--arch-kwargs", '{"dim": 16, "depth": 1, "num_heads": 2}']
    args += ["--data", "generated", "--iterations", "1", "--batch-size", "64", "--train-samples", "64"]
    args += ["--test-samples", "20", "--no-augment", "--optimizer", "adamw", "--lr", "0.01", "--weight-decay", "0.05"]
    result = runner.invoke(app, [*args, "-o", str(tmp_path / "vit.pt")])
    assert result.exit_code == 0, result.output
    trained, _ = load_checkpoint(tmp_path / "vit.pt")
    torch.manual_seed(0)  # the trainer's initialisation seed
    model = get("vit_cifar", dim=16, depth=1, num_heads=2)
    data = load_dataset("generated", "train", num_classes=10, size=32).subset(64)
    x, y = torch.from_numpy(data.normalised()), torch.from_numpy(data.labels)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.05)
    model.train()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    for (name, mine), theirs in zip(model.state_dict().items(), trained.state_dict().values()):
        assert torch.allclose(mine, theirs, atol=1e-5), name
    bad = runner.invoke(app, ["train", "--arch", "vit_cifar", "--data", "generated", "--optimizer", "adam", "-o", "x"])
    assert bad.exit_code == 2 and "--optimizer" in bad.output and "sgd" in bad.output and "adamw" in bad.output
