"""A pruning method from a package outside the repository: installed into a temporary folder, found through the
``edgeshift.methods`` entry points, listed by ``edgeshift methods``, validated and run by the pipeline."""

import json
import os
import subprocess
import sys
import textwrap
import zipfile

import pytest
from typer.testing import CliRunner

from edgeshift.cli import app
from edgeshift.core.errors import EdgeshiftError
from edgeshift.pruner.checkpoint import load_checkpoint
from edgeshift.pruner.methods import METHODS, check_method

runner = CliRunner()

METHOD = '''
"""Zero the weakest share of every BatchNorm's channels (by |gamma|) of the trained dense model."""
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from edgeshift.core.config import setting
from edgeshift.pruner.checkpoint import load_checkpoint, save_checkpoint


@dataclass(frozen=True)
class Settings:
    share: float = setting(0.5, "share of every BatchNorm's channels zeroed", minimum=0.0, maximum=0.9)


class ZeroWeakest:
    name: ClassVar[str] = "zero-weakest"
    help: ClassVar[str] = "the weakest BatchNorm channels zeroed (a test method)"
    Settings: ClassVar[type] = Settings

    def make_variants(self, settings, context):
        dense = context.dense()
        out = context.folder / f"zero-weakest-{settings.share:g}.pt"
        if not out.exists():
            model, _ = load_checkpoint(dense)
            with torch.no_grad():
                for m in model.modules():
                    if isinstance(m, nn.BatchNorm2d):
                        weakest = m.weight.abs().argsort()[: int(settings.share * m.num_features)]
                        m.weight[weakest] = 0.0
                        m.bias[weakest] = 0.0
            save_checkpoint(model, out, meta={"zeroed": settings.share})
        return [dense, out]
'''

PYPROJECT = """
[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"

[project]
name = "tiny-method"
version = "0.1"

[project.entry-points."edgeshift.methods"]
zero-weakest = "tiny_method:ZeroWeakest"

[tool.setuptools]
py-modules = ["tiny_method"]
"""

CONFIG = """
[model]
arch = "resnet20"
kwargs = {{ width = 8 }}
[data]
path = "generated"
train_samples = 200
test_samples = 100
[[methods]]
name = "zero-weakest"
share = {share}
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


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The package built and installed with pip into a folder of its own (the temporary environment)."""
    root = tmp_path_factory.mktemp("door")
    source, target = root / "tiny-method", root / "site"
    source.mkdir()
    (source / "pyproject.toml").write_text(textwrap.dedent(PYPROJECT))
    (source / "tiny_method.py").write_text(textwrap.dedent(METHOD))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--target",
            str(target),
            str(source),
        ],
        check=True,
        capture_output=True,
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")]))
    return root, env


def edgeshift(env, cwd, *args):
    return subprocess.run(
        [sys.executable, "-m", "edgeshift", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=900
    )


def test_a_method_from_another_package_is_listed_and_run_by_the_pipeline(installed):
    root, env = installed
    listed = edgeshift(env, root, "methods")
    assert listed.returncode == 0, listed.stderr
    assert "zero-weakest: the weakest BatchNorm channels zeroed (a test method) (tiny_method:ZeroWeakest)" in (
        listed.stdout
    )
    assert "    share = 0.5  # share of every BatchNorm's channels zeroed" in listed.stdout
    assert "layerprune: " in listed.stdout  # ours, found the same way

    bad = root / "bad.toml"
    bad.write_text(CONFIG.format(share=0.95, out=root / "bad-out"))
    refused = edgeshift(env, root, "pipeline", str(bad))
    assert refused.returncode == 2 and refused.stderr.strip().splitlines() == [
        f"error: {bad}: methods[0].share must be <= 0.9, got 0.95"
    ]  # its own settings, checked before any work
    assert not (root / "bad-out").exists()

    config = root / "p.toml"
    config.write_text(CONFIG.format(share=0.5, out=root / "out"))
    result = edgeshift(env, root, "pipeline", str(config))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "method zero-weakest" in result.stdout
    manifest = json.loads(zipfile.ZipFile(root / "out" / "portfolio.zip").read("manifest.json"))
    params = {v["name"]: v["params"] for v in manifest["variants"]}
    assert params["zero-weakest-0.5"] < params["dense"]  # its zeroed channels pruned exactly on export


def test_a_class_that_is_not_a_method_is_refused_naming_what_it_lacks():
    class NoSettings:
        name, help = "x", "y"

        def make_variants(self, settings, context):
            return []

    with pytest.raises(EdgeshiftError, match="a method class needs Settings"):
        check_method(NoSettings, "entry point x")


def test_every_built_in_method_has_a_settings_dataclass_with_help_on_every_field():
    assert {"imp", "magnitude", "random", "synflow", "pai", "layerprune", "slim"} <= set(METHODS.names())
    for entry in METHODS:
        check_method(entry.value, entry.name)
    result = runner.invoke(app, ["methods"])
    assert result.exit_code == 0
    assert all(f"{name}: " in result.output for name in METHODS.names())


def test_edgeshift_method_runs_one_method_alone_with_its_settings_checked(tmp_path):
    common = ["--data", "generated", "--train-samples", "200", "--test-samples", "100", "--epochs", "1"]
    for args, message in (
        (["layerprune", "--set", "remove=2"], "methods[0].remove must be a list of int, got int 2"),
        (["layerprune", "--set", "removes=[2]"], "unknown key 'methods[0].removes'; known in [methods[0]]: criterion"),
        (["obd"], "unknown method 'obd'; known: exits, gate, imp, layerprune"),
        (["layerprune", "--set", "oops"], "--set takes KEY=VALUE"),
    ):
        refused = runner.invoke(app, ["method", *args, "-o", str(tmp_path / "refused"), *common])
        assert refused.exit_code == 2 and message in refused.output and refused.output.count("\n") == 1, refused.output
    assert not (tmp_path / "refused").exists()  # refused before any work

    out = tmp_path / "lp"
    args = ["method", "layerprune", "--set", "remove=[2]", "--set", "finetune_epochs=0", "--set", "criterion=bn-scale"]
    result = runner.invoke(app, [*args, "-o", str(out), *common, "--batch-size", "100"])
    assert result.exit_code == 0, result.output
    assert "2 sources in" in result.output and "edgeshift export" in result.output
    dense, pruned = (
        load_checkpoint(out / "variants" / "dense.pt")[0],
        load_checkpoint(out / "variants" / "layerprune-2.pt"),
    )
    assert sum(p.numel() for p in pruned[0].parameters()) < sum(p.numel() for p in dense.parameters())
    assert pruned[1]["meta"]["layerprune"]["criterion"] == "bn-scale"  # the setting reached the method


def test_a_method_package_that_does_not_import_is_named_in_one_line(tmp_path):
    site = tmp_path / "site"
    info = site / "broken_method-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-method\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[edgeshift.methods]\nbroken = broken_method_module:Broken\n")
    (site / "broken_method_module.py").write_text("import a_module_nobody_has\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
    listed = edgeshift(env, tmp_path, "methods")
    assert listed.returncode == 2 and listed.stderr.strip().splitlines() == [
        "error: entry point broken = broken_method_module:Broken (edgeshift.methods) cannot be loaded: "
        "ModuleNotFoundError: No module named 'a_module_nobody_has'"
    ]
