"""Latency targets in the pipeline ([variants] targets): candidates sized from the measured removal ladder, the
choice per target from one bench, the whole run on generated data, and the refusals."""

import json
import zipfile
from pathlib import Path

import pytest
from device_helpers import ROOT
from typer.testing import CliRunner

from edgeshift.cli import app
from edgeshift.exporter.pipeline import load_config
from edgeshift.exporter.pipeline.targets import (
    CandidatePlan,
    choose,
    int8_close,
    int8_cover_lines,
    plan_candidates,
    removal_ladder,
)
from edgeshift.pruner.checkpoint import load_checkpoint, save_checkpoint
from edgeshift.pruner.models import get
from edgeshift.pruner.models.record import record_of, set_record

runner = CliRunner()

FAMILIES = ("slim", "layerprune", "layerprune+slim")


def test_candidates_are_sized_from_the_measured_ladder():
    ratios = {"fp32": [1.0, 0.9, 0.7, 0.55, 0.45], "int8": [0.6, 0.5, 0.4, 0.3, 0.25]}
    plans = plan_candidates((0.75, 0.5, 0.2), FAMILIES, ratios)
    # 0.75: FP32 needs 2 blocks removed; the combination removes 1 and slims 0.75/0.9 of the rest; INT8 of the
    # dense model already meets it, so no INT8-sized candidate is made
    assert [p.name for p in plans[0.75]] == ["lp2", "slim0.75", "lp1-slim0.833"]
    # 0.5: FP32 lp4, slim 0.5, lp2 + slim 0.5/0.7; INT8: lp1 (0.5), slim to 0.5/0.6, lp1 + slim 0.5/0.5 = lp1
    assert [p.name for p in plans[0.5]] == ["lp4", "slim0.5", "lp2-slim0.714", "lp1", "slim0.833"]
    # 0.2: no removal count reaches it in either form; slim and the combination still try
    assert [p.name for p in plans[0.2]] == ["slim0.2", "lp2-slim0.286", "slim0.333", "lp2-slim0.5"]
    assert plan_candidates((0.5,), ("layerprune",), ratios)[0.5] == [CandidatePlan(4, 1.0), CandidatePlan(1, 1.0)]
    # the dense INT8 form as accurate as the dense model: 0.75, which it meets (0.6), gets no FP32-sized candidate
    # (and needs no INT8-sized one); 0.5, which it does not meet, is planned as before
    close = plan_candidates((0.75, 0.5), FAMILIES, ratios, int8_as_accurate=True)
    assert close[0.75] == [] and close[0.5] == plans[0.5]


def test_fp32_candidates_are_skipped_only_where_int8_was_measured_as_accurate():
    ladder = {"ratios": {"fp32": [1.0, 0.7], "int8": [0.4, 0.3]}, "dense_top1": {"fp32": 0.850, "int8": 0.847}}
    assert int8_close(ladder, 0.5)  # 0.3 points lost
    assert not int8_close(ladder, 0.2)
    assert not int8_close(ladder | {"dense_top1": {"fp32": 0.85, "int8": 0.86}}, -1)  # negative: never skip
    assert not int8_close({"ratios": ladder["ratios"]}, 0.5)  # not measured (INT8 off, or an older ladder)
    (line,) = int8_cover_lines((0.75, 0.33), ladder, 0.5)  # 0.33 is below the dense INT8 form's 0.4
    assert line == (
        "target 0.75: the dense model's INT8 form meets it (0.40x, top-1 84.70% vs 85.00% FP32, within "
        "0.5 points): no FP32-sized candidate trained"
    )
    assert int8_cover_lines((0.75,), ladder, 0.2) == []


def test_the_removal_ladder_times_every_int8_format_and_keeps_the_faster_per_step(tmp_path):
    from edgeshift.device_profiles import load_profile
    from edgeshift.exporter.pipeline.config import parse_config
    from edgeshift.pruner.data import model_splits
    from edgeshift.pruner.models.resnet import CifarResNet

    cfg = parse_config(
        {
            "data": {"path": "generated"},
            "deploy": {"int8": True, "calibration_samples": 16},
            "variants": {"targets": [0.5]},
        }
    )
    dense = CifarResNet(14, 10).eval()  # four removable blocks: a short ladder
    set_record(dense, record_of(get("resnet20")))
    train, test = model_splits("generated", record_of(dense), train_samples=100, test_samples=50)
    out = tmp_path / "removal.json"
    host = load_profile("host")
    doc = removal_ladder(dense, train, test, cfg, out, host)
    steps = len(doc["order"]) + 1
    assert steps == 5 and doc["profile"] == "host"
    labels = {"qoperator/uint8", "qdq/int8"}  # host's format is "auto": both are built and timed
    assert set(doc["p50_ms"]) == {f"fp32-{k}" for k in range(steps)} | {
        f"int8-{label}-{k}" for label in labels for k in range(steps)
    }
    for k in range(steps):
        fastest = min(labels, key=lambda label: doc["p50_ms"][f"int8-{label}-{k}"])
        assert doc["int8_formats"][k] == fastest
        assert doc["ratios"]["int8"][k] == pytest.approx(doc["p50_ms"][f"int8-{fastest}-{k}"] / doc["dense_p50_ms"])
        assert doc["ratios"]["fp32"][k] == pytest.approx(doc["p50_ms"][f"fp32-{k}"] / doc["dense_p50_ms"])
    assert doc["ratios"]["fp32"][0] == 1.0 and 0 <= doc["dense_top1"]["int8"] <= 1
    assert doc["dense_top1"]["fp32"] in {i / 50 for i in range(51)}  # top-1 on the 50 test images
    assert json.loads(out.read_text()) == doc
    assert removal_ladder(dense, train, test, cfg, out, host) == doc  # a resumed run reuses the measurement


def test_each_target_gets_the_most_accurate_variant_that_meets_it():
    bench = {
        "variants": [
            {"name": "dense", "p50_ms": 1.0},
            {"name": "a", "p50_ms": 0.7},
            {"name": "b", "p50_ms": 0.45},
            {"name": "c", "p50_ms": 0.4},
        ]
    }
    top1 = {"dense": 0.9, "a": 0.88, "b": 0.8, "c": 0.85}
    got = {c.target: c for c in choose((1.0, 0.75, 0.5, 0.3), bench, top1)}
    assert got[1.0].variant == "dense" and got[0.75].variant == "a"
    assert got[0.5].variant == "c" and got[0.5].met_by == 2 and got[0.5].ratio == pytest.approx(0.4)
    assert got[0.3].variant is None and got[0.3].fastest == "c" and got[0.3].fastest_ratio == pytest.approx(0.4)


@pytest.mark.parametrize("name, arch", [("targets-resnet20", "resnet20"), ("targets-vgg16", "vgg16")])
def test_the_shipped_targets_configs_load(name, arch):
    cfg = load_config(Path(ROOT) / "configs" / f"{name}.toml")
    assert cfg.variants.targets == (0.75, 0.5, 0.33, 0.25) and cfg.deploy.int8 and cfg.model.arch == arch


TARGETS = """
[model]
arch = "resnet20"
[data]
path = "generated"
train_samples = 200
test_samples = 100
[train]
epochs = 1
batch_size = 100
warmup = 0
[deploy]
export_test_samples = 100
latency_iterations = 5
[variants]
targets = [0.6]
finetune_epochs = 1
align = 1
distill = 0.5
[output]
dir = "{out}"
"""


def test_pipeline_targets_build_every_family_and_choose_what_meets_each_target(tmp_path):
    config = tmp_path / "t.toml"
    out = tmp_path / "out"
    config.write_text(TARGETS.format(out=out))
    result = runner.invoke(app, ["pipeline", str(config)])
    assert result.exit_code == 0, result.output
    plan = json.loads((out / "variants" / "plan.json").read_text())["0.6"]
    names = [p["name"] for p in plan]
    assert any(n.startswith("lp") and "slim" not in n for n in names)  # layer removal
    assert any(n.startswith("slim") for n in names)  # learned widths
    assert any(n.startswith("lp") and "-slim" in n for n in names)  # both
    for name in names:
        model, payload = load_checkpoint(out / "variants" / f"{name}.pt")
        assert payload["meta"]["distill"] == 0.5  # every candidate learned from the dense model too
        if "slim" in name:
            # pruned exactly: float32 noise only, ten times inside the pruner's own 1e-4 gate, so this can fail
            assert payload["meta"]["slim"]["max_rel_deviation"] < 1e-5
            assert payload["meta"]["slim"]["shares"]  # the widths training chose
            assert "1" in payload["meta"]["slim"]["align_p50_ms"]  # the widths as trained were timed ([variants])
    bench = json.loads((out / "portfolio.bench.json").read_text())
    manifest = json.loads(zipfile.ZipFile(out / "portfolio.zip").read("manifest.json"))
    top1 = {v["name"]: v["accuracy"]["top1"] for v in manifest["variants"]}
    p50 = {v["name"]: v["p50_ms"] for v in bench["variants"]}
    doc = json.loads((out / "targets.json").read_text())
    (choice,) = doc["targets"]
    if choice["variant"] is None:  # none met it: the fastest is named, and nothing was within
        assert min(p50.values()) > 0.6 * p50["dense"] and choice["fastest"] == min(p50, key=p50.get)
    else:
        within = [n for n in p50 if p50[n] <= 0.6 * p50["dense"]]
        assert choice["variant"] in within and top1[choice["variant"]] == max(top1[n] for n in within)
    assert doc["lines"][0].startswith("target 0.6 (") and doc["lines"][0] in result.output
    assert doc["lines"][0] in (out / "summary.md").read_text()
    summary = (out / "summary.md").read_text().splitlines()
    for name in names:  # every candidate in the summary: what was removed, the widths chosen, the deviation
        (line,) = [line for line in summary if line.startswith(f"- {name}: ")]
        assert "distilled 0.5" in line and "% after training" in line
        assert ("removed layers." in line) == name.startswith("lp") and ("exact to" in line) == ("slim" in name)
    again = runner.invoke(app, ["pipeline", str(config)])
    assert again.exit_code == 0 and "candidate " not in again.output and "epoch" not in again.output


def test_a_target_the_dense_int8_form_meets_trains_no_fp32_candidate(tmp_path):
    """A resumed run whose removal ladder measured the dense INT8 form as accurate and fast enough for the target:
    no candidate is trained, and the run says why, on the console and in its summary."""
    config, out = tmp_path / "t.toml", tmp_path / "out"
    config.write_text(
        TARGETS.format(out=out)
        .replace("targets = [0.6]", "targets = [0.9]")
        .replace("latency_iterations = 5", "latency_iterations = 5\nint8 = true\ncalibration_samples = 16")
    )
    cfg = load_config(config)
    (out / "variants").mkdir(parents=True)
    (out / "pipeline.json").write_text(json.dumps({"config_hash": cfg.hash()}))
    (out / "variants" / "removal.json").write_text(
        json.dumps(
            {
                "profile": "host",
                "order": [],
                "dense_p50_ms": 1.0,
                "p50_ms": {},
                "ratios": {"fp32": [1.0], "int8": [0.5]},
                "dense_top1": {"fp32": 0.5, "int8": 0.5},
            }
        )
    )
    result = runner.invoke(app, ["pipeline", str(config)])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "variants" / "plan.json").read_text()) == {"0.9": []}
    line = (
        "target 0.9: the dense model's INT8 form meets it (0.50x, top-1 50.00% vs 50.00% FP32, within 0.5 "
        "points): no FP32-sized candidate trained"
    )
    assert line in result.output and f"- {line}" in (out / "summary.md").read_text()
    assert "training steps" not in result.output  # no candidate trained


NO_GROUP = """
from torch import nn


def build(num_classes=10):
    return nn.Sequential(nn.Conv2d(3, num_classes, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
"""


@pytest.mark.parametrize(
    "old, new, message",
    [
        ("targets = [0.6]", "targets = [1.5]", "variants.targets must be fractions of the dense model's p50 in (0, 1]"),
        ("targets = [0.6]", "targets = [0, 0.5]", "variants.targets must be fractions of the dense model's p50"),
        (
            "align = 1",
            'candidates = ["widths"]',
            "variants.candidates must be some of slim, layerprune, layerprune+slim (not 'widths')",
        ),
        ("align = 1", 'dense = "missing.pt"', "dense checkpoint ([variants] dense) not found: missing.pt"),
        ('arch = "resnet20"', 'arch = "nogroup:build"\ninput_size = 16', "has no prunable channel group"),
        ('path = "generated"', 'path = "no/such/folder"', "data folder not found: no/such/folder"),
        ("distill = 0.5", "distill = 1.0", "variants.distill must be a share of the loss in [0, 1), e.g. 0.9"),
        ("align = 1", 'dense = "vgg.pt"', "[variants] dense is a vgg11 checkpoint but [model] arch is 'resnet20'"),
    ],
)
def test_pipeline_targets_refuse_bad_input_in_one_line_writing_nothing(old, new, message, tmp_path, monkeypatch):
    (tmp_path / "nogroup.py").write_text(NO_GROUP)
    save_checkpoint(get("vgg11"), tmp_path / "vgg.pt")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    text = TARGETS.format(out=tmp_path / "out")
    assert old in text
    (tmp_path / "t.toml").write_text(text.replace(old, new))
    result = runner.invoke(app, ["pipeline", "t.toml"])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and message in lines[0], result.output
    assert not (tmp_path / "out").exists()
