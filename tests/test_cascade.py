"""The confidence cascade: calibration at export, the manifest's record, the runtime's cascade mode and the
commands; on tiny generated models and given confidences (the oracles computed here)."""

from __future__ import annotations

import copy

import numpy as np
import onnxruntime as ort
import pytest
import torch
from helpers import inputs_for, make
from onnx_helpers import SIZE, manifest_for, tiny_blobs, write_zip
from typer.testing import CliRunner

from edgeshift.cli import app
from edgeshift.core.errors import EdgeshiftError, PortfolioError
from edgeshift.exporter.cascade import StepOutputs, calibrate, simulate
from edgeshift.exporter.portfolio import BuildSettings, CascadeCalibration, VariantFacts, build_portfolio
from edgeshift.exporter.profile import TestData
from edgeshift.pruner.data import generated_dataset
from edgeshift.pruner.nested import narrow, reorder_channels
from edgeshift.runtime.cascade import (
    check_thresholds,
    choose_point,
    confidence,
    expected_latency,
    parse_thresholds,
    run_cascade,
    top_probability,
)
from edgeshift.runtime.engine import Runtime
from edgeshift.runtime.manifest import parse_manifest, variant_file
from edgeshift.runtime.portfolio import Portfolio

runner = CliRunner()


def softmax_top(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(1, keepdims=True))
    return (e / e.sum(1, keepdims=True)).max(1)


def test_confidence_is_the_top1_softmax_probability():
    logits = np.random.default_rng(0).standard_normal((50, 7)) * 10
    np.testing.assert_allclose(confidence(logits), softmax_top(logits), rtol=1e-12)
    assert confidence(np.array([[1e4, -1e4]]))[0] == 1.0  # no overflow
    # one input's path (plain floats) gives the same, NaN and infinities included
    rows = [*logits, [1e4, -1e4], [np.nan, 1.0], [1.0, np.nan], [np.inf, 1.0], [-np.inf, 1.0]]
    for row in rows:
        with np.errstate(invalid="ignore"):  # inf - inf: NaN, as the plain-float path gives
            expected = confidence(np.array([row]))[0]
        assert top_probability(list(row)) == pytest.approx(expected, rel=1e-12, nan_ok=True)


@pytest.mark.parametrize(
    "n, thresholds",
    [(64, (0.7, 0.5)), (1, (0.7, 0.5)), (3, (0.7, 0.5)), (64, (1.0, 0.5)), (64, (0.7, 1.0)), (64, (0.0, 0.5))],
)
def test_run_cascade_hands_each_item_the_answer_of_the_first_step_sure_enough(n, thresholds):
    """Mixed batches, single inputs, a step nobody leaves at and one everybody does: the same walk per item."""
    rng = np.random.default_rng(1)
    batch = rng.standard_normal((n, 3))
    steps = [rng.standard_normal((3, 5)) * s for s in (3.0, 1.0, 0.5)]  # three linear "models"
    calls = []

    def run_step(k, items):
        calls.append((k, len(items)))
        return items @ steps[k]

    out, answered = run_cascade(run_step, batch, thresholds)
    # the oracle: per item, walk the steps
    for i, item in enumerate(batch):
        for k, w in enumerate(steps):
            logits = item @ w
            if k == len(steps) - 1 or softmax_top(logits[None])[0] > thresholds[k]:
                break
        assert answered[i] == k
        np.testing.assert_allclose(out[i], logits, rtol=1e-12)
    # each step ran once, on the items still unanswered, while any were
    assert calls == [(k, int((answered >= k).sum())) for k in range(3) if (answered >= k).any()]


@pytest.mark.parametrize("threshold, step", [(1.0, 1), (0.0, 0)])
def test_threshold_one_sends_every_item_on_and_zero_stops_every_item_first(threshold, step):
    batch = np.random.default_rng(2).standard_normal((20, 4)) * 100  # very sure logits: probability rounds to 1
    out, answered = run_cascade(lambda k, items: items * (k + 1), batch, (threshold,))
    assert (answered == step).all()
    np.testing.assert_array_equal(out, batch * (step + 1))


def test_thresholds_outside_zero_one_are_refused_in_one_line():
    with pytest.raises(EdgeshiftError, match=r"1\.5 is outside \[0, 1\]"):
        check_thresholds([0.5, 1.5], 3)
    with pytest.raises(EdgeshiftError, match="give 2 thresholds"):
        check_thresholds([0.5, 0.5, 0.5], 3)
    assert check_thresholds([0.7], 3) == (0.7, 0.7)  # one stands for every step but the last
    with pytest.raises(EdgeshiftError, match="numbers in"):
        parse_thresholds("0.5,high")
    assert parse_thresholds("0.9, 0.5") == (0.9, 0.5)


def test_expected_latency_counts_every_step_an_input_ran():
    e = expected_latency([0.6, 0.3, 0.1], [1.0, 2.0, 4.0])
    assert e.mean_ms == pytest.approx(0.6 * 1 + 0.3 * 3 + 0.1 * 7)
    assert e.p95_ms == 7.0  # 90% have left by step 1: the 95th percentile ran all three
    assert expected_latency([0.96, 0.04], [1.0, 4.0]).p95_ms == 1.0


# -- calibration ---------------------------------------------------------------------------------------------


def logits_with(top: np.ndarray, right: np.ndarray, labels: np.ndarray, classes: int = 4) -> np.ndarray:
    """Logits whose top-1 probability is ``top`` and whose top-1 class is the label where ``right``."""
    n = len(labels)
    rest = np.log((1 - top) / (classes - 1))
    logits = np.repeat(rest[:, None], classes, axis=1)
    predicted = np.where(right, labels, (labels + 1) % classes)
    logits[np.arange(n), predicted] = np.log(top)
    return logits


def test_calibration_stops_where_the_fast_step_starts_to_err():
    rng = np.random.default_rng(3)
    n = 2000
    labels = rng.integers(0, 4, n)
    conf = rng.uniform(0.3, 0.99, n)
    fast_right = conf > 0.75  # the fast step is right exactly when it is sure
    outputs = {
        "fast": StepOutputs(logits_with(conf, fast_right, labels), 1.0),
        "dense": StepOutputs(logits_with(np.full(n, 0.9), np.ones(n, bool), labels), 4.0),
    }
    cascade = calibrate(outputs, "dense", labels, max_loss=0.0)
    assert cascade.steps == ("fast", "dense")
    point = cascade.points[0]
    # the oracle: with no loss allowed, no input the fast step gets wrong may leave there
    assert point.thresholds[0] >= conf[~fast_right].max() - 1e-12
    assert point.top1 == 1.0 == cascade.reference_top1
    ideal = fast_right.mean()  # every sure input leaves
    assert ideal - 0.03 <= point.exit_shares[0] <= ideal
    # looser points trade top-1 for time, the slowest (most accurate) first
    means = [expected_latency(p.exit_shares, [1.0, 5.0]).mean_ms for p in cascade.points]
    assert len(cascade.points) > 1 and means == sorted(means, reverse=True)
    assert [p.top1 for p in cascade.points] == sorted((p.top1 for p in cascade.points), reverse=True)


def test_calibration_meets_the_loss_on_its_images_and_picks_the_cheaper_first_step():
    rng = np.random.default_rng(4)
    n = 3000
    labels = rng.integers(0, 4, n)

    def step(accuracy: float, seed: int) -> np.ndarray:
        r = np.random.default_rng(seed)
        right = r.random(n) < accuracy
        conf = np.clip(np.where(right, r.uniform(0.4, 1.0, n), r.uniform(0.26, 0.8, n)), 0.26, 0.999)
        return logits_with(conf, right, labels)

    outputs = {
        "tiny": StepOutputs(step(0.6, 10), 0.2),
        "small": StepOutputs(step(0.8, 11), 0.5),
        "dense": StepOutputs(step(0.9, 12), 2.0),
    }
    cascade = calibrate(outputs, "dense", labels, max_loss=0.005, max_early=2)
    conf = [confidence(outputs[s].calibration_logits) for s in cascade.steps]
    right = [outputs[s].calibration_logits.argmax(1) == labels for s in cascade.steps]
    for p in cascade.points:  # the figures recorded are those of the thresholds recorded
        assert simulate(conf, right, p.thresholds) == (p.top1, p.exit_shares)
    point = cascade.points[0]
    dense_right = outputs["dense"].calibration_logits.argmax(1) == labels

    def bound(answer_right: np.ndarray) -> float:
        """The loss against the dense step plus 1.645 standard errors of the paired difference (95%, one-sided)."""
        d = dense_right.astype(float) - answer_right.astype(float)
        return d.mean() + 1.645 * d.std() / np.sqrt(len(d))

    def answers(first: str, t: float) -> np.ndarray:
        c = confidence(outputs[first].calibration_logits)
        return np.where(c > t, outputs[first].calibration_logits.argmax(1) == labels, dense_right)

    walked = np.zeros(n, bool)
    left = np.ones(n, bool)
    for k, step in enumerate(cascade.steps):  # the chosen cascade, walked here
        last = k == len(point.thresholds)
        leave = left & (left if last else confidence(outputs[step].calibration_logits) > point.thresholds[k])
        walked |= leave & (outputs[step].calibration_logits.argmax(1) == labels)
        left &= ~leave
    assert bound(walked) <= 0.005 + 1e-9 and point.top1 >= dense_right.mean() - 0.005
    ms = [outputs[s].p50_ms for s in cascade.steps]
    mean = expected_latency(point.exit_shares, ms).mean_ms
    # no single-early-step cascade of these candidates, at any of a fine grid of thresholds, is cheaper at that bar
    for first in ("tiny", "small"):
        c = confidence(outputs[first].calibration_logits)
        for t in np.linspace(0, 1, 201):
            if bound(answers(first, t)) <= 0.005:
                shares = ((c > t).mean(), (c <= t).mean())
                assert mean <= expected_latency(shares, [outputs[first].p50_ms, 2.0]).mean_ms + 0.02


def test_calibration_needs_a_step_faster_than_the_reference():
    labels = np.zeros(10, int)
    same = StepOutputs(np.zeros((10, 4)), 1.0)
    with pytest.raises(EdgeshiftError, match="no variant is measured faster"):
        calibrate({"a": same, "dense": same}, "dense", labels)


# -- the manifest --------------------------------------------------------------------------------------------


def cascade_record(steps=("w4", "w32"), thresholds=((0.6,), (0.3,))) -> dict:
    return {
        "steps": list(steps),
        "points": [
            {"thresholds": list(t), "top1": 0.9 - 0.1 * i, "exit_shares": [0.5 + 0.2 * i, 0.5 - 0.2 * i]}
            for i, t in enumerate(thresholds)
        ],
        "max_loss": 0.005,
        "reference_top1": 0.9,
        "samples": 100,
    }


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c.update(steps=["w4", "nope"]), "must name variants"),
        (lambda c: c.update(steps=["w4", "w4"]), "distinct"),
        (lambda c: c["points"][0].update(thresholds=[1.5]), r"numbers in \[0, 1\]"),
        (lambda c: c["points"][0].update(thresholds=[0.5, 0.5]), "1 numbers"),
        (lambda c: c["points"][0].update(exit_shares=[0.5, 0.6]), "adding up to 1"),
        (lambda c: c.update(points=[]), "1..16"),
        (lambda c: c.update(max_loss=-0.1), "max_loss"),
    ],
)
def test_a_hostile_cascade_record_is_refused_naming_the_field(change, message):
    manifest = manifest_for(tiny_blobs((4, 32)))
    manifest["cascade"] = cascade_record()
    parse_manifest(copy.deepcopy(manifest))
    change(manifest["cascade"])
    with pytest.raises(PortfolioError, match=message):
        parse_manifest(manifest)


# -- the runtime and the commands ----------------------------------------------------------------------------


@pytest.fixture
def cascaded(tmp_path):
    """A portfolio of two tiny classifiers (w4 fast, w32 the reference) with a cascade over both."""
    blobs = tiny_blobs((4, 32))
    manifest = manifest_for(blobs, reference="w32")
    manifest["cascade"] = cascade_record()
    path = tmp_path / "cascade.zip"
    write_zip(path, manifest, {variant_file(n): d for n, d in blobs.items()})
    return path, blobs


def inputs(n: int = 32) -> np.ndarray:
    return np.random.default_rng(5).standard_normal((n, 3, SIZE, SIZE)).astype(np.float32)


def direct(blob: bytes, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(blob, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


@pytest.mark.parametrize("threshold, step", [(1.0, "w32"), (0.0, "w4")])
def test_runtime_cascade_at_the_ends_equals_one_step(cascaded, threshold, step):
    path, blobs = cascaded
    x = inputs()
    with Runtime(path, vet=False, cascade=True, thresholds=[threshold]) as rt:
        out = rt.predict(x)
        stats = rt.stats()["cascade"]
    np.testing.assert_allclose(out, direct(blobs[step], x), rtol=1e-5, atol=1e-5)
    assert stats["exits"] == {"w4": len(x) if step == "w4" else 0, "w32": len(x) if step == "w32" else 0}


def test_runtime_cascade_answers_each_input_from_the_step_the_thresholds_say(cascaded):
    path, blobs = cascaded
    x = inputs(64)
    fast, slow = direct(blobs["w4"], x), direct(blobs["w32"], x)
    leave = softmax_top(fast.astype(np.float64)) > 0.6  # the calibrated point's threshold
    with Runtime(path, vet=False, cascade=True) as rt:
        out, answered = rt.predict_cascade(x)
        for i in range(len(x)):  # one at a time too: the same answers
            single, _ = rt.predict_cascade(x[i : i + 1])
            np.testing.assert_allclose(single[0], out[i], rtol=1e-5, atol=1e-5)
        stats = rt.stats()["cascade"]
    np.testing.assert_allclose(out, np.where(leave[:, None], fast, slow), rtol=1e-5, atol=1e-5)
    assert answered == ["w4" if ok else "w32" for ok in leave]
    assert stats["exits"] == {"w4": 2 * int(leave.sum()), "w32": 2 * int((~leave).sum())}
    assert 0 < leave.mean() < 1  # the check saw both kinds of input


def test_a_latency_target_moves_the_runtime_among_the_calibrated_points(cascaded):
    path, _ = cascaded
    with Runtime(path, vet=False, cascade=True, latency_target_ms=1e-9, decide_every=0) as rt:
        rt._retune_cascade()  # what the monitor does each window: no point meets 1e-9 ms: the fastest one
        assert rt.stats()["cascade"]["point"] == 1 and rt._cascade.thresholds == (0.3,)
        rt._cascade.target_ms = 1e9
        rt._retune_cascade()
        assert rt.stats()["cascade"]["point"] == 0 and rt._cascade.thresholds == (0.6,)
    points = parse_manifest(manifest_for(tiny_blobs((4, 32))) | {"cascade": cascade_record()}).cascade.points
    # on given step latencies: 1 and 10 ms; point 0 leaves 50% early (mean 6 ms), point 1 70% (mean 4 ms)
    assert [choose_point(points, [1.0, 10.0], t) for t in (7.0, 5.0, 3.0)] == [0, 1, 1]


def test_a_cascade_needs_a_calibrated_portfolio_and_no_switch_policy(cascaded, tmp_path):
    blobs = tiny_blobs((4, 32))
    plain = tmp_path / "plain.zip"
    write_zip(plain, manifest_for(blobs), {variant_file(n): d for n, d in blobs.items()})
    with pytest.raises(EdgeshiftError, match="no calibrated cascade"):
        Runtime(plain, vet=False, cascade=True)
    with pytest.raises(EdgeshiftError, match="without a switch policy"):
        Runtime(cascaded[0], vet=False, cascade=True, policy="qps-trend")
    with pytest.raises(EdgeshiftError, match="pass cascade=True"):
        Runtime(cascaded[0], vet=False, thresholds=[0.5])


def write_images(folder, n: int = 6):
    folder.mkdir()
    rng = np.random.default_rng(6)
    for i in range(n):
        np.save(folder / f"{i}.npy", rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    return folder


def test_cli_run_cascade_prints_where_images_left(cascaded, tmp_path):
    images = write_images(tmp_path / "images")
    result = runner.invoke(app, ["run", str(cascaded[0]), "--images", str(images), "--cascade", "--thresholds", "1"])
    assert result.exit_code == 0, result.output
    assert "6 images with the cascade" in result.output
    assert "answered by w4 0, w32 6" in result.output


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--cascade", "--thresholds", "1.5"], r"1\.5 is outside \[0, 1\]"),
        (["--thresholds", "0.5"], "add --cascade"),
    ],
)
def test_cli_run_refuses_bad_thresholds_in_one_line(cascaded, tmp_path, extra, message):
    images = write_images(tmp_path / "images")
    result = runner.invoke(app, ["run", str(cascaded[0]), "--images", str(images), *extra])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert __import__("re").search(message, result.output)


def test_cli_run_cascade_on_a_portfolio_without_one_is_one_line(tmp_path):
    blobs = tiny_blobs((4, 32))
    plain = tmp_path / "plain.zip"
    write_zip(plain, manifest_for(blobs), {variant_file(n): d for n, d in blobs.items()})
    images = write_images(tmp_path / "images")
    result = runner.invoke(app, ["run", str(plain), "--images", str(images), "--cascade"])
    assert result.exit_code == 2 and "no calibrated cascade" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_cli_bench_reports_the_cascade_per_input(cascaded):
    result = runner.invoke(app, ["bench", str(cascaded[0])])
    assert result.exit_code == 0, result.output
    assert "cascade w4 -> w32" in result.output and "calibrated: thresholds 0.600" in result.output


# -- export --------------------------------------------------------------------------------------------------


def test_held_out_images_are_none_of_the_measured_ones():
    ds = generated_dataset(300, size=8)
    measured, held = ds.subset(100), ds.held_out(100, 150)
    key = lambda d: {(d.images[i].tobytes(), int(d.labels[i])) for i in range(len(d))}  # noqa: E731
    assert len(held) == 150 and not key(measured) & key(held)
    with pytest.raises(EdgeshiftError, match="do not fit"):
        ds.held_out(200, 101)


def test_export_calibrates_a_cascade_whose_figures_the_models_reproduce(tmp_path):
    torch.manual_seed(0)
    dense = make("resnet20", {}, 32)
    example = inputs_for(32)
    reorder_channels(dense, example)
    small = narrow(dense, example, 0.25).model.eval()
    data = generated_dataset(400, size=32)
    calib, test = data.subset(200), data.held_out(200, 200)
    path = build_portfolio(
        {"dense": dense, "small": small},
        example,
        tmp_path / "pf.zip",
        test_data=TestData(test.normalised(), test.labels, "test"),
        facts=VariantFacts(reference="dense", architecture="resnet20"),
        settings=BuildSettings(
            latency_iterations=30,
            measure_memory=False,
            cascade=CascadeCalibration(calib.normalised(), calib.labels, "held out", max_loss=0.02),
        ),
        say=lambda line: None,
    )
    with Portfolio.open(path) as pf:
        cascade = pf.manifest.cascade
    assert cascade is not None and cascade.steps == ("small", "dense") and cascade.samples == 200
    with torch.no_grad():
        models = {"small": small, "dense": dense}
        logits = {n: m(torch.as_tensor(calib.normalised())).double().numpy() for n, m in models.items()}
        test_logits = {n: m(torch.as_tensor(test.normalised())).double().numpy() for n, m in models.items()}
    assert cascade.reference_top1 == pytest.approx(float((logits["dense"].argmax(1) == calib.labels).mean()))
    for p in cascade.points:  # the torch models, walked here, give the figures recorded
        for images, outs, top1, shares in (
            (calib, logits, p.top1, p.exit_shares),
            (test, test_logits, p.test_top1, p.test_exit_shares),
        ):
            leave = softmax_top(outs["small"]) > p.thresholds[0]
            answer = np.where(leave, outs["small"].argmax(1), outs["dense"].argmax(1))
            assert top1 == pytest.approx(float((answer == images.labels).mean()), abs=1.5 / len(images))
            assert shares[0] == pytest.approx(float(leave.mean()), abs=1.5 / len(images))
    assert cascade.points[0].top1 >= cascade.reference_top1 - 0.02


def test_cli_export_cascade_needs_data(tmp_path):
    result = runner.invoke(app, ["export", "--arch", "resnet20", "-o", str(tmp_path / "pf.zip"), "--cascade"])
    assert result.exit_code == 2 and "--cascade needs labelled images" in result.output
    assert len(result.output.strip().splitlines()) == 1
