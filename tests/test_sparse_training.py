"""Sparse training on generated data: exact sparsity per level, rewinding, resumption, one-shot baselines."""

import json
import os

import numpy as np
import pytest
import torch

from edgeshift.core.errors import EdgeshiftError, InputFileError, UnknownNameError
from edgeshift.pruner import sparse
from edgeshift.pruner.checkpoint import load_checkpoint
from edgeshift.pruner.data import generated_dataset, load_dataset, load_imagefolder
from edgeshift.pruner.imp import RunConfig, build_model, level_start, run_sparse
from edgeshift.pruner.models import get
from edgeshift.pruner.train import TrainConfig, train

TRAIN = TrainConfig(epochs=1, batch_size=64, lr=0.05, seed=0)
KW = {"width": 8}


def cfg(method="imp", **kw):
    return RunConfig(
        arch="resnet20", data="generated", method=method, train_samples=256, test_samples=100, rewind_step=2, **kw
    )


def test_prune_global_keeps_exactly_the_highest_scores():
    mask = {"a": torch.ones(10, dtype=torch.bool), "b": torch.tensor([True, False, True])}
    scores = {"a": torch.arange(10.0), "b": torch.tensor([100.0, 1000.0, -1.0])}
    new = sparse.prune_global(scores, mask, 4)
    assert new["a"].tolist() == [False] * 7 + [True] * 3 and new["b"].tolist() == [True, False, False]


@pytest.mark.parametrize("name", ["magnitude", "random", "synflow"])
def test_every_scorer_hits_the_target_sparsity(name):
    model = get("resnet20", **KW)
    mask = sparse.full_mask(model)
    for k in (1, 3, 6):
        keep = sparse.target_keep(mask, 1 - 2.0**-k)
        got = sparse.get(name).score(model, mask, keep, 0)
        assert sum(int(m.sum()) for m in got.values()) == keep


def test_unknown_scorer():
    with pytest.raises(UnknownNameError, match="magnitude, random, synflow"):
        sparse.get("snip")


@pytest.fixture(scope="module")
def imp_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("imp") / "run"
    rows = run_sparse(run, cfg(), TRAIN, 3, arch_kwargs=KW, progress=False)
    return run, rows


def test_levels_have_exact_sparsity_and_masked_weights_are_zero(imp_run):
    run, rows = imp_run
    assert [r["level"] for r in rows] == [0, 1, 2, 3]
    for r in rows:
        k = r["level"]
        assert abs(r["sparsity"] - (1 - 2.0**-k)) <= 0.001
        model, payload = load_checkpoint(run / f"level_{k}" / "checkpoint.pt")
        params = sparse.prunable(model)
        for name, m in payload["masks"].items():
            assert torch.count_nonzero(params[name][~m]) == 0
        assert json.loads((run / f"level_{k}" / "metrics.json").read_text())["test_accuracy"] == r["test_accuracy"]
        assert len((run / f"level_{k}" / "log.jsonl").read_text().splitlines()) == 1


def test_each_level_starts_from_the_rewind_weights_times_its_mask(imp_run):
    run, _ = imp_run
    c = cfg()
    data = generated_dataset(256)
    rewind = torch.load(run / "rewind.pt", weights_only=True)
    model, mask = level_start(run, c, 2, lambda: build_model(c, 10, data, KW))
    state = model.state_dict()
    saved_mask = torch.load(run / "level_2" / "mask.pt", weights_only=True)
    for name, m in mask.items():
        assert torch.equal(m, saved_mask[name])
        assert torch.equal(state[name], rewind[name] * m)
    assert torch.equal(state["bn1.running_mean"], rewind["bn1.running_mean"])


def test_a_killed_run_resumes_to_the_same_results_and_never_rewrites_finished_levels(imp_run, tmp_path):
    run_full, rows_full = imp_run
    run = tmp_path / "run"
    partial = run_sparse(
        run, cfg(), TRAIN, 3, arch_kwargs=KW, progress=False, stop_after=7
    )  # 4 + 2 steps, then dies in level 2
    assert [r["level"] for r in partial] == [0, 1]
    assert (run / "level_2").exists() and not (run / "level_2" / "metrics.json").exists()
    stamp = os.stat(run / "level_1" / "checkpoint.pt").st_mtime_ns
    rows = run_sparse(run, cfg(), TRAIN, 3, arch_kwargs=KW, progress=False)
    assert os.stat(run / "level_1" / "checkpoint.pt").st_mtime_ns == stamp
    assert [r["test_accuracy"] for r in rows] == [r["test_accuracy"] for r in rows_full]
    a = load_checkpoint(run / "level_3" / "checkpoint.pt")[0].state_dict()
    b = load_checkpoint(run_full / "level_3" / "checkpoint.pt")[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_directory_of_another_configuration_is_refused(imp_run):
    run, _ = imp_run
    before = {p: os.stat(p).st_mtime_ns for p in run.rglob("*")}
    with pytest.raises(EdgeshiftError, match="another configuration .*prune_fraction"):
        run_sparse(run, cfg(prune_fraction=0.2), TRAIN, 3, arch_kwargs=KW, progress=False)
    assert {p: os.stat(p).st_mtime_ns for p in run.rglob("*")} == before


@pytest.mark.parametrize("method", ["magnitude", "random", "synflow"])
def test_one_shot_baselines_write_the_same_level_layout(method, tmp_path):
    rows = run_sparse(
        tmp_path / "r", cfg(method), TrainConfig(iterations=2, batch_size=32), 2, arch_kwargs=KW, progress=False
    )
    assert [round(r["compression"]) for r in rows] == [1, 2, 4]
    assert all((tmp_path / "r" / f"level_{k}" / "mask.pt").is_file() for k in range(3))


@torch.no_grad()
def own_accuracy(model, ds) -> float:
    """Top-1 on ``ds``, counted here from the images and labels (not the trainer's own figure)."""
    model.eval()
    x = torch.from_numpy(ds.normalised())
    return float((model(x).argmax(1).numpy() == ds.labels).mean())


def test_training_learns_the_generated_data():
    train_ds, test_ds = generated_dataset(1024), generated_dataset(200, split_seed=1)
    model = get("resnet20", **KW)
    before = own_accuracy(model, test_ds)
    res = train(model, train_ds, test_ds, TrainConfig(epochs=4, batch_size=32, lr=0.1, warmup_steps=10), progress=False)
    after = own_accuracy(model, test_ds)
    assert before <= 0.3 and after >= 0.8  # ten classes: chance is 0.1; it learned, measured here
    assert res.test_accuracy == pytest.approx(after, abs=1e-9)  # and the trainer reports what it measured
    assert len(res.history) == 4 and res.history[-1]["step"] == 128


def test_masks_hold_after_every_step():
    model = get("resnet20", **KW)
    mask = sparse.get("random").score(model, sparse.full_mask(model), 1000, 0)
    assert sum(int(m.sum()) for m in mask.values()) == 1000
    params = sparse.prunable(model)
    for step in range(3):  # one optimiser step at a time: after each, every masked weight is exactly 0
        train(
            model,
            generated_dataset(128),
            generated_dataset(50, split_seed=1),
            TrainConfig(iterations=1, batch_size=32, seed=step),
            mask=mask,
            progress=False,
        )
        for k, m in mask.items():
            assert torch.count_nonzero(params[k].detach()[~m]) == 0, (step, k)
        assert any(torch.count_nonzero(params[k].detach()[m]) for k, m in mask.items())  # and it did train


def test_data_errors(tmp_path):
    with pytest.raises(InputFileError, match="data folder not found"):
        load_dataset(str(tmp_path / "nope"))
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "x.jpg").write_bytes(b"")
    with pytest.raises(InputFileError, match=r"not an ImageFolder dataset \(no train/ folder\)"):
        load_imagefolder(tmp_path / "flat")
    folder = image_folder(tmp_path / "ds", size=32, classes=("cat", "dog"))
    c = RunConfig(arch="resnet20", data=str(folder))
    with pytest.raises(EdgeshiftError, match="the data has 2 classes, the model 7"):
        run_sparse(tmp_path / "r", c, TRAIN, 1, num_classes=7, arch_kwargs=KW, progress=False)


def image_folder(root, size=8, classes=("cat", "dog"), n=3):
    from PIL import Image

    for split in ("train", "test"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(np.full((size, size, 3), 40 * i, np.uint8)).save(root / split / c / f"{i}.png")
    return root


def test_imagefolder_is_decoded_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGESHIFT_CACHE", str(tmp_path / "cache"))
    image_folder(tmp_path / "ds")
    ds = load_imagefolder(tmp_path / "ds", "train")
    assert ds.images.shape == (6, 8, 8, 3) and ds.classes == ["cat", "dog"] and ds.labels.tolist() == [0] * 3 + [1] * 3
    assert len(list((tmp_path / "cache").iterdir())) == 1
    again = load_imagefolder(tmp_path / "ds", "train")
    assert np.array_equal(again.images, ds.images)
