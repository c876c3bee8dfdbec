"""Step 1 of the pipeline: every ``[[methods]]`` table's method makes its variants, through the one method protocol
(``edgeshift.pruner.methods``); or, with ``[variants] targets``, each target's candidates.

Every method is given the same context: the model source, the data, the training settings, the device profile
(resolved once) with the measurers built for it, and the trained dense model on demand. Resumable: every file a
method writes is skipped when it exists.
"""

from __future__ import annotations

import functools
import shutil
from collections.abc import Callable
from pathlib import Path

from edgeshift.core.atomic import atomic_path
from edgeshift.device_profiles import DeviceProfile, load_profile
from edgeshift.pruner.imp import run_sparse
from edgeshift.pruner.methods import METHODS, DataChoice, MethodContext
from edgeshift.pruner.methods.sparse_training import run_config
from edgeshift.pruner.models.sources import ModelSpec
from edgeshift.pruner.train import TrainConfig

from ..layer_prices import LatencyPricer, MacsPricer
from ..profile import OrtMeasurer
from .config import PipelineConfig
from .targets import build_target_variants


def train_config(cfg: PipelineConfig) -> TrainConfig:
    t = cfg.train
    return TrainConfig(
        epochs=t.epochs,
        batch_size=t.batch_size,
        lr=t.lr,
        weight_decay=t.weight_decay,
        optimizer=t.optimizer,
        warmup_steps=t.warmup,
        seed=t.seed,
    )


def model_spec(cfg: PipelineConfig) -> ModelSpec:
    m = cfg.model
    return ModelSpec(m.arch, tuple(sorted(m.kwargs.items())), m.weights or None, m.input_size or None)


def data_choice(cfg: PipelineConfig) -> DataChoice:
    d = cfg.data
    return DataChoice(d.path, d.train_samples or None, d.test_samples or None)


def dense(cfg: PipelineConfig, variants: Path, context: MethodContext) -> Path:
    """The dense trained model (``[variants] dense``, or level 0 of a sparse run with no levels), shared by the
    methods that start from it and by the targets, copied to ``variants/dense.pt`` so the portfolio calls it
    ``dense``."""
    path = variants / "dense.pt"
    if not path.exists() and cfg.variants.dense:
        with atomic_path(path) as tmp:
            shutil.copyfile(cfg.variants.dense, tmp)
    if not path.exists():
        run_sparse(variants / "dense-run", run_config(context, "imp"), context.train, 0)
        with atomic_path(path) as tmp:
            shutil.copyfile(variants / "dense-run" / "level_0" / "checkpoint.pt", tmp)
    return path


def method_context(
    cfg: PipelineConfig, variants: Path, profile: DeviceProfile, say: Callable[[str], None] = print
) -> MethodContext:
    """What every method of this run is given; the dense model is trained on the first method's call for it."""
    holder: list[MethodContext] = []
    context = MethodContext(
        folder=variants,
        model=model_spec(cfg),
        data=data_choice(cfg),
        train=train_config(cfg),
        profile=profile,
        measure=OrtMeasurer(profile),
        pricers={"latency": LatencyPricer(profile), "macs": MacsPricer()},
        dense=functools.cache(lambda: dense(cfg, variants, holder[0])),
        say=say,
    )
    holder.append(context)
    return context


def build_variants(cfg: PipelineConfig, out: Path, profile: DeviceProfile | None = None) -> list[Path]:
    """Step 1: every method's checkpoints in table order (the dense model once), or with ``[variants] targets``
    each target's candidates (resumable); returns the sources for the exporter. ``profile``: the run's, resolved
    once (default: ``[deploy] profile``)."""
    profile = profile or load_profile(cfg.deploy.profile)
    variants = out / "variants"
    variants.mkdir(exist_ok=True)
    context = method_context(cfg, variants, profile)
    if cfg.variants.targets:
        return build_target_variants(cfg, variants, context.dense(), profile)
    sources: list[Path] = []
    for choice in cfg.methods:
        made = METHODS.get(choice.name)().make_variants(choice.settings, context)
        sources += [p for p in made if p not in sources]
    return sources
