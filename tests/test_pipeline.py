"""`edgeshift pipeline`: strict config, every step's output, resume, refusal of a foreign folder, all methods."""

import json
import os
import shutil
import subprocess
import sys
import zipfile

import pytest
from device_helpers import BLOCK_TORCH, npy_images
from typer.testing import CliRunner

from edgeshift.cli import app
from edgeshift.core.errors import EdgeshiftError
from edgeshift.exporter.pipeline import build_variants, load_config, parse_config, prepare_output, validate
from edgeshift.pruner.checkpoint import load_checkpoint

runner = CliRunner()

TINY = """
[model]
arch = "resnet20"
[data]
path = "generated"
train_samples = 200
test_samples = 100
[[methods]]
name = "{method}"
{settings}
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


SETTINGS = {
    "synflow": "levels = 1",
    "magnitude": "levels = 1",
    "pai": "sparsities = [0.8]",
    "layerprune": "remove = [2]\nfinetune_epochs = 1",
}


def write_config(tmp_path, method="synflow", name="p.toml", out=None):
    path = tmp_path / name
    path.write_text(TINY.format(method=method, settings=SETTINGS[method], out=out or tmp_path / "out"))
    return path


def test_pipeline_runs_every_step_then_resumes_without_redoing_work(tmp_path):
    config = write_config(tmp_path)
    result = runner.invoke(app, ["pipeline", str(config)])
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    for name in (
        "portfolio.zip",
        "portfolio.bench.json",
        "simulate.json",
        "portfolio.md",
        "portfolio.png",
        "summary.md",
        "trace.csv",
        "pipeline.json",
    ):
        assert (out / name).is_file(), name
    assert [line for line in result.output.splitlines() if line.startswith("== ")][-1] == "== 6/6 summary"
    assert result.output.strip().splitlines()[-1] == f"everything is in {out}"
    manifest = json.loads(zipfile.ZipFile(out / "portfolio.zip").read("manifest.json"))
    bench = json.loads((out / "portfolio.bench.json").read_text())
    assert {v["name"] for v in bench["variants"]} == {v["name"] for v in manifest["variants"]}
    summary = (out / "summary.md").read_text()
    assert all(f"| {v['name']} |" in summary for v in manifest["variants"])
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()}
    again = runner.invoke(app, ["pipeline", str(config)])
    assert again.exit_code == 0, again.output
    for name in ("portfolio.zip", "portfolio.bench.json", "simulate.json"):
        assert (out / name).stat().st_mtime_ns == stamps[name]  # finished steps are not redone
    assert "epoch" not in again.output  # nor is any training
    other = write_config(tmp_path, method="magnitude", name="q.toml", out=out)
    refused = runner.invoke(app, ["pipeline", str(other)])
    assert refused.exit_code == 2 and "another configuration" in refused.output

    # the portfolio alone, on a "device": a folder with nothing else, a process where torch and onnx cannot load
    device = tmp_path / "device"
    device.mkdir()
    shutil.copy(out / "portfolio.zip", device / "portfolio.zip")
    images = npy_images(device / "photos", n=4, size=32)
    env = dict(os.environ)
    outputs = {}
    for args in (
        ["inspect", "portfolio.zip"],
        ["bench", "portfolio.zip", "--profile", "host"],
        ["run", "portfolio.zip", "--images", str(images)],
    ):
        proc = subprocess.run(
            [sys.executable, "-c", BLOCK_TORCH, *args], capture_output=True, text=True, env=env, cwd=device, timeout=300
        )
        assert proc.returncode == 0, (args, proc.stdout, proc.stderr)
        outputs[args[0]] = proc.stdout
    assert all(v["name"] in outputs["inspect"] and v["name"] in outputs["bench"] for v in manifest["variants"])
    assert outputs["run"].count("img") == 4 and "4 images with" in outputs["run"]


@pytest.mark.parametrize(
    "method, expected", [("pai", {"dense.pt", "pai-0.8.pt"}), ("layerprune", {"dense.pt", "layerprune-2.pt"})]
)
def test_pipeline_methods_pai_and_layerprune_build_their_variants(method, expected, tmp_path):
    cfg = load_config(write_config(tmp_path, method=method))
    sources = build_variants(cfg, prepare_output(cfg))
    assert {p.name for p in sources} == expected
    models = {p.name: load_checkpoint(p)[0] for p in sources}
    dense = sum(p.numel() for p in models["dense.pt"].parameters())
    for name, model in models.items():
        if name != "dense.pt":
            assert sum(p.numel() for p in model.parameters()) < dense  # narrower or shallower


@pytest.mark.parametrize(
    "doc, message",
    [
        ({"modle": {}}, "unknown section [modle]; known: model, data, methods, train, deploy, variants, output"),
        ({"train": {"epoch": 3}}, "unknown key 'train.epoch'; known in [train]: batch_size, epochs, lr"),
        ({"train": {"epochs": "3"}}, "train.epochs must be int, got str '3'"),
        (
            {"methods": [{"name": "obd"}]},
            "unknown method 'obd'; known: exits, gate, imp, layerprune, magnitude, nest, pai, random, slim, synflow",
        ),
        ({"methods": [{"name": "layerprune", "remove": 2}]}, "methods[0].remove must be a list"),
        (
            {"methods": [{"name": "pai", "remove": [2]}]},
            "unknown key 'methods[0].remove'; known in [methods[0]]: mode, scorer, sparsities",
        ),
        (
            {"methods": [{"name": "pai", "mode": "half"}]},
            "methods[0].mode must be one of all-layers, inverted, reconvene, unstructured, got 'half'",
        ),
        ({"methods": [{"remove": [2]}]}, "methods[0] lacks 'name'"),
        ({"methods": [{"name": "pai"}, {"name": "pai"}]}, "method 'pai' has two [[methods]] tables"),
        ({"methods": []}, "no [[methods]] table and no [variants] targets"),
        ({"method": {"name": "obd"}}, "unknown method 'obd'; known: exits, gate, imp, layerprune"),
    ],
)
def test_config_errors_name_the_file_and_key(doc, message):
    with pytest.raises(EdgeshiftError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_config(doc, "my.toml")


def test_the_old_method_table_is_read_with_a_note_showing_its_new_form():
    old = {"method": {"name": "pai", "pai_mode": "inverted", "sparsities": [0.8], "remove": [2], "levels": 3}}
    with pytest.warns(FutureWarning) as caught:
        cfg = parse_config(old, "old.toml")
    note = str(caught[0].message)
    assert note == (
        'old.toml: [method] is the old form, read as [[methods]] name = "pai" mode = "inverted" '
        "sparsities = [0.8] (write it so)"
    )
    new = parse_config({"methods": [{"name": "pai", "mode": "inverted", "sparsities": [0.8]}]}, "new.toml")
    assert cfg == new and cfg.hash() == new.hash()
    assert [c.name for c in parse_config({}, "none.toml").methods] == ["imp"]  # as before: imp by default


def test_deploy_align_is_checked_and_keeps_older_run_hashes_at_its_default(tmp_path):
    base = parse_config({}, "my.toml")
    assert base.deploy.align == 1
    assert parse_config({"deploy": {"align": 1}}, "my.toml").hash() == base.hash()  # folders from before the key
    assert parse_config({"deploy": {"align": 8}}, "my.toml").hash() != base.hash()
    with pytest.raises(EdgeshiftError, match="deploy.align must be >= 1"):
        validate(parse_config({"deploy": {"align": 0}}, "my.toml"))


def test_pipeline_cli_bad_config(tmp_path):
    result = runner.invoke(app, ["pipeline", str(tmp_path / "missing.toml")])
    assert result.exit_code == 2 and "missing.toml" in result.output and result.output.count("\n") == 1
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nepochs = 'x'\n")
    result = runner.invoke(app, ["pipeline", str(bad)])
    assert result.exit_code == 2 and "bad.toml: train.epochs must be int" in result.output
    result = runner.invoke(app, ["pipeline", str(write_config(tmp_path)), "--arch", "resnet21"])
    assert result.exit_code == 2 and "unknown architecture 'resnet21'" in result.output
    assert not (tmp_path / "out" / "variants").exists()  # refused before any work


def test_the_old_method_tables_criterion_goes_to_the_targets_without_changing_the_callers_document():
    variants = {"targets": [0.5]}
    old = {"method": {"name": "layerprune", "criterion": "taylor"}, "variants": variants}
    with pytest.warns(FutureWarning):
        cfg = parse_config(old, "old.toml")
    assert cfg.variants.criterion == "taylor" and variants == {"targets": [0.5]}
