"""The portfolio package: standard ZIP, verified hashes, post-processing, atomic writes, CLI."""

import hashlib
import json
import os
import shutil
import subprocess
import zipfile

import numpy as np
import pytest
from helpers import assert_onnx_computes, inputs_for, make, plant_zeros
from typer.testing import CliRunner

from edgeshift.cli import app
from edgeshift.exporter.portfolio import BuildSettings, Tolerance, VariantFacts, build_portfolio, postprocess
from edgeshift.exporter.profile import TestData
from edgeshift.pruner.checkpoint import save_checkpoint
from edgeshift.pruner.structured import prune_zero_channels
from edgeshift.runtime.manifest import parse_manifest

runner = CliRunner()


@pytest.fixture(scope="module")
def portfolio(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pf")
    dense = make("resnet20", {}, 32)
    sparse = make("resnet20", {}, 32)
    plant_zeros(sparse, frac=0.5)
    pruned, report = prune_zero_channels(sparse, inputs_for(32))
    rng = np.random.default_rng(0)
    test = TestData(rng.standard_normal((50, 3, 32, 32)).astype(np.float32), rng.integers(0, 10, 50))
    path = build_portfolio(
        {"dense": dense, "pruned": pruned},
        inputs_for(32),
        tmp / "pf.zip",
        test_data=test,
        facts=VariantFacts(prune_reports={"pruned": report}, reference="dense", architecture="resnet20"),
        settings=BuildSettings(latency_iterations=20),
    )
    SOURCES[path] = {"dense": dense, "pruned": sparse}  # what each variant must compute: the unpruned model
    return path


SOURCES: dict = {}


@pytest.mark.skipif(not shutil.which("unzip"), reason="Info-ZIP's unzip is not installed here")
def test_another_zip_reader_accepts_the_portfolio(portfolio):
    assert subprocess.run(["unzip", "-t", str(portfolio)], capture_output=True).returncode == 0


def test_portfolio_is_a_standard_zip_whose_hashes_match(portfolio):
    with zipfile.ZipFile(portfolio) as z:
        assert z.testzip() is None
        manifest = json.loads(z.read("manifest.json"))
        parse_manifest(manifest)
        assert sorted(z.namelist()) == ["manifest.json", "variants/dense.onnx", "variants/pruned.onnx"]
        for v in manifest["variants"]:  # DEFLATE where it pays, STORED where it would save under 10%
            method = z.getinfo(v["file"]).compress_type
            assert method == (zipfile.ZIP_DEFLATED if v["deflated_bytes"] <= 0.9 * v["bytes"] else zipfile.ZIP_STORED)
        assert z.getinfo("variants/pruned.onnx").compress_type == zipfile.ZIP_DEFLATED
        for v in manifest["variants"]:
            data = z.read(v["file"])
            assert hashlib.sha256(data).hexdigest() == v["sha256"] and len(data) == v["bytes"]
            # each variant computes its source model: ONNX Runtime against torch in float64, on unseen inputs
            assert_onnx_computes(data, SOURCES[portfolio][v["name"]], inputs_for(32, batch=3, seed=99))
    sizes = [v["bytes"] for v in manifest["variants"]]
    assert sizes == sorted(sizes)
    pruned = next(v for v in manifest["variants"] if v["name"] == "pruned")
    assert pruned["accuracy"]["samples"] == 50
    lat = pruned["latency"]
    assert 0 < lat["p50_ms"] <= lat["p95_ms"] <= lat["p99_ms"] and lat["calls"] == 20
    assert pruned["peak_memory_bytes"] > 0 and pruned["params"] < manifest["variants"][-1]["params"]


def variant(name, top1, p50, size, reference=False):
    return {"name": name, "accuracy": {"top1": top1}, "latency": {"p50_ms": p50}, "bytes": size, "reference": reference}


def test_postprocess_drops_dominated_and_near_duplicates_but_keeps_the_reference():
    kept, dropped = postprocess(
        [
            variant("dense", 0.90, 10.0, 1000, reference=True),
            variant("a", 0.91, 5.0, 500),
            variant("b", 0.89, 6.0, 600),  # a beats it on all three
            variant("c", 0.9105, 5.05, 505),  # a near-duplicate of a (bigger, so it goes)
            variant("d", 0.80, 1.0, 100),
            variant("e", 0.85, 0.9, 90),  # beats d
        ],
        Tolerance(),
    )
    assert [v["name"] for v in kept] == ["e", "a", "dense"]
    reasons = {d["name"]: d["reason"] for d in dropped}
    assert "beaten by a" in reasons["b"] and "near-duplicate of a" in reasons["c"] and "beaten by e" in reasons["d"]


def test_postprocess_keeps_variants_whose_accuracy_is_unknown():
    a, b = variant("a", 0.9, 5.0, 500), variant("b", 0.9, 6.0, 600)
    a["accuracy"] = b["accuracy"] = None
    kept, dropped = postprocess([a, b, variant("dense", 0.9, 10.0, 1000, reference=True)])
    assert [v["name"] for v in kept] == ["a", "b", "dense"] and not dropped


def test_cli_export_inspect_and_report(tmp_path):
    dense = make("resnet20", {}, 32)
    save_checkpoint(dense, tmp_path / "dense.pt")
    plant_zeros(dense)
    save_checkpoint(dense, tmp_path / "sparse.pt")
    out = tmp_path / "pf.zip"
    args = [
        "export",
        str(tmp_path / "dense.pt"),
        str(tmp_path / "sparse.pt"),
        "-o",
        str(out),
        "--data",
        "generated",
        "--test-samples",
        "100",
        "--iterations",
        "10",
        "--no-memory",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "sparse" in result.output and "all sha256 verified" in result.output
    result = runner.invoke(app, args)  # exists now
    assert result.exit_code == 2 and "--force" in result.output
    result = runner.invoke(app, ["inspect", str(out)])
    assert result.exit_code == 0 and "dense *" in result.output and "resnet20" in result.output
    result = runner.invoke(app, ["report", str(out), "-o", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "pf.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "pf.md").read_text()
    assert "| sparse |" in md and "| dense (reference) |" in md


def test_cli_export_align_ships_variants_whose_conv_widths_are_multiples_of_eight(tmp_path):
    import onnx
    from onnx import numpy_helper

    from edgeshift.runtime.portfolio import Portfolio

    sparse = make("resnet20", {}, 32)
    plant_zeros(sparse)
    save_checkpoint(sparse, tmp_path / "sparse.pt")
    out = tmp_path / "pf.zip"
    result = runner.invoke(
        app, ["export", str(tmp_path / "sparse.pt"), "-o", str(out), "--align", "8", "--iterations", "5", "--no-memory"]
    )
    assert result.exit_code == 0, result.output
    with Portfolio.open(out) as pf:
        data = pf.inflate("sparse")
    graph = onnx.load_from_string(data).graph
    weights = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    outs = [weights[n.input[1]].shape[0] for n in graph.node if n.op_type == "Conv" and n.input[1] in weights]
    assert outs and all(c % 8 == 0 for c in outs)
    assert any(c not in (16, 32, 64) for c in outs)  # pruned, then aligned: not simply the dense widths
    assert_onnx_computes(data, sparse, inputs_for(32, batch=3, seed=99))  # still the sparse model's function
    result = runner.invoke(
        app, ["export", str(tmp_path / "sparse.pt"), "-o", str(tmp_path / "p2.zip"), "--align", "8", "--no-prune"]
    )
    assert result.exit_code == 2 and result.output.count("\n") == 1 and "drop --no-prune" in result.output
    assert not (tmp_path / "p2.zip").exists()


def test_failed_export_leaves_no_partial_portfolio(tmp_path):
    save_checkpoint(make("resnet20", {}, 32), tmp_path / "good.pt")
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    out = tmp_path / "pf.zip"
    result = runner.invoke(
        app,
        [
            "export",
            str(tmp_path / "good.pt"),
            str(tmp_path / "bad.pt"),
            "-o",
            str(out),
            "--no-memory",
            "--iterations",
            "5",
        ],
    )
    assert result.exit_code == 2 and "not a readable edgeshift checkpoint" in result.output
    assert sorted(os.listdir(tmp_path)) == ["bad.pt", "good.pt"]


def test_export_into_missing_directory(tmp_path):
    save_checkpoint(make("resnet20", {}, 32), tmp_path / "good.pt")
    result = runner.invoke(app, ["export", str(tmp_path / "good.pt"), "-o", str(tmp_path / "no" / "pf.zip")])
    assert result.exit_code == 2 and "output directory does not exist" in result.output


def test_report_creates_its_folder_but_not_over_a_file(portfolio, tmp_path):
    result = runner.invoke(app, ["report", str(portfolio), "-o", str(tmp_path / "new" / "reports")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "new" / "reports" / "pf.md").is_file() and (tmp_path / "new" / "reports" / "pf.png").is_file()
    (tmp_path / "afile").write_text("x")
    result = runner.invoke(app, ["report", str(portfolio), "-o", str(tmp_path / "afile")])
    assert result.exit_code == 2 and "is a file; pass a folder" in result.output
