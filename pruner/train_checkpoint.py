"""``edgeshift train``: a fresh zoo model, or a checkpoint with its masks enforced (e.g. a model pruned at
initialisation), trained and saved as a checkpoint. Data-parallel under torchrun; only rank 0 writes."""

from __future__ import annotations

from pathlib import Path

from edgeshift.core.errors import EdgeshiftError

from . import distributed
from .checkpoint import load_checkpoint, save_checkpoint
from .imp import RunConfig, build_model, check_classes, load_data
from .models.record import record_of, set_record
from .train import TrainConfig, TrainResult, train


def train_checkpoint(
    out: Path,
    train_cfg: TrainConfig,
    *,
    data: str,
    arch: str | None = None,
    init: Path | None = None,
    num_classes: int | None = None,
    train_samples: int | None = None,
    test_samples: int | None = None,
    seed: int = 0,
    arch_kwargs: dict | None = None,
    weights: str | None = None,
    input_size: int | None = None,
) -> tuple[TrainResult, int]:
    """Train ``arch`` from scratch or the checkpoint ``init`` (its masks enforced) and write ``out``.

    Returns (the training result, the number of processes)."""
    if (arch is None) == (init is None):
        raise EdgeshiftError("pass exactly one of --arch (train a fresh model) and --init (train a checkpoint)")
    if init is not None and (weights or arch_kwargs or input_size):
        raise EdgeshiftError(
            "--weights, --arch-kwargs and --input-size go with --arch; a checkpoint (--init) already records its model"
        )
    rank, world = distributed.init_from_env()
    masks, meta = None, {}
    if init is not None:
        model, payload = load_checkpoint(init)
        masks = payload.get("masks") or None
        meta = {"init": str(init), **{k: v for k, v in payload.get("meta", {}).items() if k == "pai"}}
        arch = record_of(model).name
    assert arch is not None
    cfg = RunConfig(
        arch=arch,
        data=data,
        train_samples=train_samples,
        test_samples=test_samples,
        seed=seed,
        arch_kwargs=tuple(sorted((arch_kwargs or {}).items())),
        weights=weights,
        input_size=input_size,
    )
    size = record_of(model).input_size if init is not None else cfg.size()
    train_ds, test_ds = load_data(cfg, num_classes, size)
    if init is None:
        model = build_model(cfg, num_classes or train_ds.num_classes, train_ds)
    else:
        set_record(model, record_of(model).with_normalisation(train_ds.mean, train_ds.std))
    check_classes(model, train_ds)
    res = train(model, train_ds, test_ds, train_cfg, mask=masks)
    if rank == 0:
        save_checkpoint(
            model,
            out,
            masks=masks,
            meta={
                **meta,
                "test_accuracy": res.test_accuracy,
                "steps": res.steps,
                "seconds": res.seconds,
                "processes": world,
            },
        )
    distributed.barrier()
    return res, world
