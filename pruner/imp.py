"""Sparse training runs: iterative magnitude pruning with rewinding (IMP), and one-shot baselines.

A run directory holds ``run.json`` (the configuration and its hash), ``rewind.pt`` (the weights at the rewind
step of the dense run) and one folder per level::

    RUN_DIR/level_<k>/checkpoint.pt   model + mask (edgeshift checkpoint, weights_only)
    RUN_DIR/level_<k>/mask.pt         the mask alone
    RUN_DIR/level_<k>/log.jsonl       loss and accuracy per epoch
    RUN_DIR/level_<k>/metrics.json    written last: a level is finished when it exists

Level k keeps ``(1 - prune_fraction) ** k`` of the conv and linear weights. ``imp`` prunes the previous level's
trained weights by global magnitude, rewinds the survivors to the rewind step and retrains from there; the
one-shot methods build level k's mask in one go (``magnitude`` from the trained dense model, ``random`` and
``synflow`` at initialisation) and train it the same way. Killed at any point, the same command resumes at the
first unfinished level; finished levels are never rewritten; a directory made with another configuration is
refused.
"""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from edgeshift.core.atomic import atomic_path, write_text_atomic
from edgeshift.core.errors import EdgeshiftError

from . import distributed, sparse
from .checkpoint import load_checkpoint, save_checkpoint
from .data import Dataset, load_dataset
from .models import sources
from .models.record import record_of, set_record
from .train import TrainConfig, config_dict, set_determinism, train

METHODS = ("imp", "magnitude", "random", "synflow")


@dataclass(frozen=True)
class RunConfig:
    """Everything that decides a run's results (the level count only decides how far it goes)."""

    arch: str  # model source: a zoo name, timm/NAME, torchvision/NAME or package.module:function
    data: str  # 'generated' or a dataset path
    method: str = "imp"  # imp | magnitude | random | synflow
    prune_fraction: float = 0.5  # of the remaining weights, per level (0.2 is the classic IMP rate)
    rewind_step: int = 0  # optimiser step the survivors rewind to
    train_samples: int | None = None  # use a stratified subset of the training set
    test_samples: int | None = None  # ... and of the test set
    seed: int = 0  # initialisation, data order, random scorer
    arch_kwargs: tuple[tuple[str, object], ...] = ()  # keyword arguments of the model source
    weights: str | None = None  # a trained state dict the model starts from (instead of its initialisation)
    input_size: int | None = None  # square input side; default: the source's

    def hash(self, train: TrainConfig) -> str:
        run = asdict(self)
        for key in ("arch_kwargs", "weights", "input_size"):  # added later: at their defaults, old runs resume
            if not run[key]:
                del run[key]
        blob = json.dumps({"run": run, "train": config_dict(train)}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def size(self) -> int:
        """The square input side this run's model takes."""
        return sources.input_size_of(self.arch, self.input_size, dict(self.arch_kwargs))


def load_data(cfg: RunConfig, num_classes: int | None, size: int) -> tuple[Dataset, Dataset]:

    train_ds = load_dataset(cfg.data, "train", num_classes=num_classes or 10, size=size)
    test_ds = load_dataset(cfg.data, "test", num_classes=num_classes or 10, size=size)
    if cfg.train_samples:
        train_ds = train_ds.subset(cfg.train_samples, cfg.seed)
    if cfg.test_samples:
        test_ds = test_ds.subset(cfg.test_samples, cfg.seed)
    return train_ds, test_ds


def check_classes(model, ds: Dataset) -> None:
    n = record_of(model).num_classes
    if ds.num_classes != n:
        raise EdgeshiftError(
            f"the data has {ds.num_classes} classes, the model {n}: pass --num-classes "
            f"{ds.num_classes} or data with {n} classes"
        )


def build_model(cfg: RunConfig, num_classes: int, data: Dataset, arch_kwargs: dict | None = None):
    """The run's freshly initialised model (seeded: every call gives the same weights), with the data's
    normalisation recorded so the exporter can put it in the manifest."""
    set_determinism(cfg.seed)
    m = sources.create(
        cfg.arch,
        num_classes=num_classes,
        input_size=cfg.input_size,
        kwargs={**dict(cfg.arch_kwargs), **(arch_kwargs or {})},
    )
    if cfg.weights:
        sources.load_weights(m, cfg.weights, cfg.arch)
    set_record(m, record_of(m).with_normalisation(data.mean, data.std))
    return m


def prepare_run_dir(run_dir: Path, cfg: RunConfig, train_cfg: TrainConfig) -> dict:
    """Create ``run_dir`` or check it belongs to this configuration; returns its run.json.

    Under torchrun every process checks the folder before any of them writes (the check only reads), then rank 0
    creates it. Checking while rank 0 was writing made the other rank see a folder holding only run.json's
    temporary file and refuse it as "not an edgeshift run directory": the flaky failure of the README's
    torchrun line."""
    doc: dict[str, Any] = {"config_hash": cfg.hash(train_cfg), "run": asdict(cfg), "train": config_dict(train_cfg)}
    meta = run_dir / "run.json"
    old = None
    if run_dir.exists():
        if not meta.is_file():
            if any(run_dir.iterdir()):
                raise EdgeshiftError(f"{run_dir} exists and is not an edgeshift run directory; choose a new --out")
        else:
            old = json.loads(meta.read_text())
            if old.get("config_hash") != doc["config_hash"]:

                def same(part: str, key: str) -> bool:  # as JSON (tuples are lists); a later key at its default
                    theirs = old.get(part, {})
                    if key not in theirs:
                        return not doc[part][key]
                    return theirs[key] == json.loads(json.dumps(doc[part][key], default=str))

                diff = sorted(k for part in ("run", "train") for k in doc[part] if not same(part, k))
                raise EdgeshiftError(
                    f"{run_dir} holds a run with another configuration (differs in: "
                    f"{', '.join(diff)}); use a new --out or the same options"
                )
    distributed.barrier()  # every process has looked before anything is written
    if old is not None:
        return old
    if distributed.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(meta, json.dumps(doc, indent=2))
    return doc


def level_dir(run_dir: Path, k: int) -> Path:
    return run_dir / f"level_{k}"


def is_finished(run_dir: Path, k: int) -> bool:
    return (level_dir(run_dir, k) / "metrics.json").is_file()


def _save_level(run_dir: Path, k: int, model, mask, result, cfg: RunConfig, seconds: float) -> dict:
    d = level_dir(run_dir, k)
    metrics = {
        "level": k,
        "method": cfg.method,
        "sparsity": 1.0 - sparse.density(mask),
        "compression": 1.0 / max(sparse.density(mask), 1e-12),
        "test_accuracy": result.test_accuracy,
        "train_loss": result.train_loss,
        "steps": result.steps,
        "seconds": seconds,
        "nonzero_weights": int(sum(int(m.sum()) for m in mask.values())),
        "processes": distributed.world_size(),
    }
    if not distributed.is_main():
        distributed.barrier()
        return metrics
    save_checkpoint(
        model,
        d / "checkpoint.pt",
        masks=mask,
        meta={"level": k, "method": cfg.method, "test_accuracy": result.test_accuracy},
    )
    with atomic_path(d / "mask.pt") as tmp:
        torch.save({k2: v.clone() for k2, v in mask.items()}, tmp)
    write_text_atomic(d / "metrics.json", json.dumps(metrics, indent=2))  # last: marks the level finished
    distributed.barrier()
    return metrics


def _load_level_model(run_dir: Path, k: int):

    model, payload = load_checkpoint(level_dir(run_dir, k) / "checkpoint.pt")
    return model, payload["masks"]


def run_sparse(
    run_dir: Path,
    cfg: RunConfig,
    train_cfg: TrainConfig,
    levels: int,
    *,
    num_classes: int | None = None,
    arch_kwargs: dict | None = None,
    progress: bool = True,
    stop_after: int | None = None,
) -> list[dict]:
    """Run (or resume) levels 0..levels of ``cfg.method``; returns every finished level's metrics.

    ``stop_after`` ends the call after that many optimiser steps in all (used to test resumption).
    """
    if cfg.method not in METHODS:
        raise EdgeshiftError(f"unknown method {cfg.method!r}; known: {', '.join(METHODS)}")
    if not 0 < cfg.prune_fraction < 1:
        raise EdgeshiftError(f"--prune-fraction must be in (0, 1), got {cfg.prune_fraction}")
    size = cfg.size()  # an unknown or unbuildable model source fails here, before anything is written
    distributed.init_from_env()
    prepare_run_dir(run_dir, cfg, train_cfg)
    distributed.barrier()
    train_ds, test_ds = load_data(cfg, num_classes, size)
    classes = num_classes or train_ds.num_classes

    fresh_model = functools.partial(build_model, cfg, classes, train_ds, arch_kwargs)

    init = fresh_model()
    check_classes(init, train_ds)
    rewind_path = run_dir / "rewind.pt"
    metrics_out = []
    budget = [stop_after]

    def run_level(k: int, model, mask, start_step: int, rewind_step: int | None):
        d = level_dir(run_dir, k)
        if distributed.is_main():
            if d.exists():
                shutil.rmtree(d)  # an unfinished level: start it again from its beginning
            d.mkdir(parents=True)
        distributed.barrier()
        cfg_k = train_cfg
        if budget[0] is not None:
            total = train_cfg.total_steps(len(train_ds))
            if budget[0] < total - start_step:
                cfg_k = TrainConfig(
                    **{**asdict(train_cfg), "iterations": start_step + budget[0], "milestones": train_cfg.milestones}
                )
        t0 = time.perf_counter()
        res = train(
            model,
            train_ds,
            test_ds,
            cfg_k,
            mask=mask,
            start_step=start_step,
            rewind_step=rewind_step,
            log_path=d / "log.jsonl",
            progress=progress,
            label=f"level {k}",
        )
        if budget[0] is not None:
            budget[0] -= res.steps - start_step
            if cfg_k is not train_cfg:
                raise _Interrupted()
        return res, time.perf_counter() - t0

    try:
        for k in range(levels + 1):
            if is_finished(run_dir, k):
                metrics_out.append(json.loads((level_dir(run_dir, k) / "metrics.json").read_text()))
                continue
            if k == 0:
                model, mask = fresh_model(), sparse.full_mask(init)
                res, secs = run_level(0, model, mask, 0, cfg.rewind_step)
                if distributed.is_main():
                    with atomic_path(rewind_path) as tmp:
                        torch.save(res.rewind_state, tmp)
                metrics_out.append(_save_level(run_dir, 0, model, mask, res, cfg, secs))
                continue
            model, mask = level_start(run_dir, cfg, k, fresh_model)
            res, secs = run_level(k, model, mask, cfg.rewind_step, None)
            metrics_out.append(_save_level(run_dir, k, model, mask, res, cfg, secs))
    except _Interrupted:
        pass
    return metrics_out


def level_start(run_dir: Path, cfg: RunConfig, k: int, fresh_model) -> tuple:
    """The model and mask level ``k >= 1`` starts from: the rewind-step weights times the level's mask."""
    rewind = torch.load(run_dir / "rewind.pt", map_location="cpu", weights_only=True)
    scorer_model = fresh_model()
    total = sum(m.numel() for m in sparse.full_mask(scorer_model).values())
    keep = int(round(total * (1 - cfg.prune_fraction) ** k))
    if cfg.method == "imp":
        prev, prev_mask = _load_level_model(run_dir, k - 1)
        mask = sparse.get("magnitude").score(prev, prev_mask, keep, cfg.seed)
    elif cfg.method == "magnitude":
        dense, _ = _load_level_model(run_dir, 0)
        mask = sparse.get("magnitude").score(dense, sparse.full_mask(dense), keep, cfg.seed)
    else:
        mask = sparse.get(cfg.method).score(scorer_model, sparse.full_mask(scorer_model), keep, cfg.seed + k)
    model = fresh_model()
    model.load_state_dict(rewind)
    sparse.apply_mask(model, mask)
    return model, mask


class _Interrupted(Exception):
    """The step budget of a test ran out mid-level: the level stays unfinished."""
