"""How each pipeline method makes its variants: each calls the library function that already does it.

A method is ``(cfg, variants_dir) -> sources for the exporter`` (checkpoints and run folders), resumable: every
file it writes is skipped when it exists.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from edgeshift.core.atomic import atomic_path

from .config import METHODS, PipelineConfig


def train_config(cfg: PipelineConfig, epochs: int | None = None):
    from edgeshift.pruner.train import TrainConfig

    t = cfg.train
    return TrainConfig(epochs=epochs if epochs is not None else t.epochs, batch_size=t.batch_size, lr=t.lr,
                       weight_decay=t.weight_decay, warmup_steps=t.warmup, seed=t.seed)


def run_config(cfg: PipelineConfig, method: str):
    from edgeshift.pruner.imp import RunConfig

    return RunConfig(arch=cfg.model.arch, data=cfg.data.path, method=method,
                     prune_fraction=cfg.method.prune_fraction, rewind_step=cfg.method.rewind_step,
                     train_samples=cfg.data.train_samples or None, test_samples=cfg.data.test_samples or None,
                     seed=cfg.train.seed, arch_kwargs=tuple(sorted(cfg.model.kwargs.items())),
                     weights=cfg.model.weights or None, input_size=cfg.model.input_size or None)


def _sparse(cfg: PipelineConfig, variants: Path) -> list[Path]:
    from edgeshift.pruner.imp import run_sparse

    run_sparse(variants / "run", run_config(cfg, cfg.method.name), train_config(cfg), cfg.method.levels)
    return [variants / "run"]


for _name, _help in (("imp", "iterative magnitude pruning with rewinding"), ("magnitude", "one-shot |w|"),
                     ("random", "one-shot random"), ("synflow", "one-shot SynFlow")):
    METHODS.add(_name, _sparse, _help)


def dense(cfg: PipelineConfig, variants: Path) -> Path:
    """The dense trained model (``[variants] dense``, or level 0 of a sparse run with no levels), shared by pai,
    layerprune and the targets, copied to ``variants/dense.pt`` so the portfolio calls it ``dense``."""
    from edgeshift.pruner.imp import run_sparse

    path = variants / "dense.pt"
    if not path.exists() and cfg.variants.dense:
        with atomic_path(path) as tmp:
            shutil.copyfile(cfg.variants.dense, tmp)
    if not path.exists():
        run_sparse(variants / "dense-run", run_config(cfg, "imp"), train_config(cfg), 0)
        with atomic_path(path) as tmp:
            shutil.copyfile(variants / "dense-run" / "level_0" / "checkpoint.pt", tmp)
    return path


@METHODS.register("pai", help="pruning at initialisation (edgeshift pai), then trained (edgeshift train --init)")
def _pai(cfg: PipelineConfig, variants: Path) -> list[Path]:
    from edgeshift.pruner.imp import load_data
    from edgeshift.pruner.pai import PaiConfig, save_pai
    from edgeshift.pruner.train_checkpoint import train_checkpoint

    m = cfg.method
    sources = [dense(cfg, variants)]
    run = run_config(cfg, "pai")
    classes = load_data(run, None, run.size())[0].num_classes
    for p in m.sparsities:
        path, init = variants / f"pai-{float(p):g}.pt", variants / f"pai-{float(p):g}-init.pt"
        if not path.exists():
            if not init.exists():
                save_pai(PaiConfig(cfg.model.arch, float(p), scorer=m.scorer, mode=m.pai_mode, num_classes=classes,
                                   seed=cfg.train.seed, profile=False, input_size=run.input_size,
                                   arch_kwargs=run.arch_kwargs), init)
            train_checkpoint(path, train_config(cfg), data=cfg.data.path, init=init,
                             train_samples=cfg.data.train_samples or None, test_samples=cfg.data.test_samples or None,
                             seed=cfg.train.seed)
        sources.append(path)
    return sources


@METHODS.register("layerprune", help="layer removal from the dense model (edgeshift layerprune)")
def _layerprune(cfg: PipelineConfig, variants: Path) -> list[Path]:
    from edgeshift.pruner.layers.layerprune import LayerPruneConfig, layerprune_checkpoint

    from ..profile import OrtMeasurer

    m = cfg.method
    d = dense(cfg, variants)
    sources = [d]
    measure = OrtMeasurer(cfg.deploy.profile)
    for n in m.remove:
        path = variants / f"layerprune-{int(n)}.pt"
        if not path.exists():
            layerprune_checkpoint(d, path, LayerPruneConfig(criterion=m.criterion, remove=int(n),
                                                            profile=cfg.deploy.profile, seed=cfg.train.seed),
                                  data=cfg.data.path, finetune=train_config(cfg, m.finetune_epochs) if
                                  m.finetune_epochs else None, train_samples=cfg.data.train_samples or None,
                                  test_samples=cfg.data.test_samples or None, measure=measure)
        sources.append(path)
    return sources


def build_variants(cfg: PipelineConfig, out: Path) -> list[Path]:
    """Step 1: the method's checkpoints, or with ``[variants] targets`` each target's candidates (resumable);
    returns the sources for the exporter."""
    variants = out / "variants"
    variants.mkdir(exist_ok=True)
    if cfg.variants.targets:
        from .targets import build_target_variants

        return build_target_variants(cfg, variants, dense(cfg, variants))
    return METHODS.get(cfg.method.name)(cfg, variants)
