import json

import torch
from helpers import assert_same_function, inputs_for, make, plant_zeros
from typer.testing import CliRunner

from edgeshift.cli import app
from edgeshift.pruner.checkpoint import load_checkpoint, save_checkpoint

runner = CliRunner()


def sparse_checkpoint(path, name="vgg11"):
    model = make(name, {}, 32)
    plant_zeros(model)
    save_checkpoint(model, path)
    return model


def test_prune_writes_a_smaller_exact_checkpoint_and_prints_the_report(tmp_path):
    model = sparse_checkpoint(tmp_path / "sparse.pt")
    result = runner.invoke(
        app,
        [
            "prune",
            str(tmp_path / "sparse.pt"),
            "-o",
            str(tmp_path / "pruned.pt"),
            "--json",
            str(tmp_path / "report.json"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "max |diff|" in result.output and "params" in result.output
    report = json.loads((tmp_path / "report.json").read_text())
    pruned, payload = load_checkpoint(tmp_path / "pruned.pt")
    assert report["params_after"] == sum(p.numel() for p in pruned.parameters()) < report["params_before"]
    assert_same_function(model, pruned, inputs_for(32, seed=99))
    assert payload["meta"]["prune_report"]["mode"] == "exact"


def test_prune_align_rounds_widths_up_with_zero_channels(tmp_path):
    model = sparse_checkpoint(tmp_path / "sparse.pt")
    result = runner.invoke(
        app,
        [
            "prune",
            str(tmp_path / "sparse.pt"),
            "-o",
            str(tmp_path / "pruned.pt"),
            "--align",
            "8",
            "--json",
            str(tmp_path / "report.json"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "zero channels added (widths multiples of 8)" in result.output
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["align"] == 8 and report["channels_padded"] > 0
    pruned, _ = load_checkpoint(tmp_path / "pruned.pt")
    assert all(m.out_channels % 8 == 0 for m in pruned.modules() if isinstance(m, torch.nn.Conv2d))
    assert_same_function(model, pruned, inputs_for(32, seed=99))
    bad = runner.invoke(app, ["prune", str(tmp_path / "sparse.pt"), "-o", str(tmp_path / "p2.pt"), "--align", "0"])
    assert bad.exit_code == 2 and "--align" in bad.output


def one_error_line(result):
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    return lines[0]


def test_missing_checkpoint(tmp_path):
    result = runner.invoke(app, ["prune", str(tmp_path / "nope.pt"), "-o", str(tmp_path / "o.pt")])
    assert result.exit_code == 2
    assert "checkpoint not found" in one_error_line(result)


def test_existing_output_needs_force(tmp_path):
    sparse_checkpoint(tmp_path / "s.pt")
    (tmp_path / "o.pt").write_text("keep me")
    result = runner.invoke(app, ["prune", str(tmp_path / "s.pt"), "-o", str(tmp_path / "o.pt")])
    assert result.exit_code == 2 and "--force" in one_error_line(result)
    assert (tmp_path / "o.pt").read_text() == "keep me"
    result = runner.invoke(app, ["prune", str(tmp_path / "s.pt"), "-o", str(tmp_path / "o.pt"), "--force"])
    assert result.exit_code == 0, result.output


def test_output_in_missing_directory(tmp_path):
    sparse_checkpoint(tmp_path / "s.pt")
    result = runner.invoke(app, ["prune", str(tmp_path / "s.pt"), "-o", str(tmp_path / "no" / "o.pt")])
    assert result.exit_code == 2 and "output directory does not exist" in one_error_line(result)


def test_unknown_architecture_in_checkpoint(tmp_path):
    sparse_checkpoint(tmp_path / "s.pt")
    payload = torch.load(tmp_path / "s.pt", weights_only=True)
    payload["arch"]["name"] = "vgg17"
    torch.save(payload, tmp_path / "u.pt")
    result = runner.invoke(app, ["prune", str(tmp_path / "u.pt"), "-o", str(tmp_path / "o.pt")])
    assert result.exit_code == 2
    line = one_error_line(result)
    assert "unknown architecture 'vgg17'" in line and "vgg16" in line


def test_mismatched_tensors(tmp_path):
    sparse_checkpoint(tmp_path / "s.pt")
    payload = torch.load(tmp_path / "s.pt", weights_only=True)
    payload["state_dict"]["fc.weight"] = torch.zeros(3, 3)
    torch.save(payload, tmp_path / "m.pt")
    result = runner.invoke(app, ["prune", str(tmp_path / "m.pt"), "-o", str(tmp_path / "o.pt")])
    assert result.exit_code == 2 and "do not match architecture" in one_error_line(result)
    assert not (tmp_path / "o.pt").exists()
