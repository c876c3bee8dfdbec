"""The pipeline's configuration: one TOML file, every key with its default and help stated once, below.

    [model]   arch = "resnet20"
    [data]    path = "generated"          # or an ImageFolder root / CIFAR-10 python folder
    [method]  name = "imp"                # imp | magnitude | random | synflow | pai | layerprune
    [train]   epochs, batch_size, lr, warmup, weight_decay, seed
    [deploy]  profile, policy, trace, export_test_samples, latency_iterations, align, int8, calibration_*
    [variants] targets = [0.75, 0.5]     # latency targets instead of [method]'s variants (targets.py)
    [output]  dir = "out/pipeline"

Loaded by ``edgeshift.core.config``: an unknown section or key, or a value of the wrong type, is an error naming
the file and the key.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgeshift.core.config import load, load_toml, setting
from edgeshift.core.errors import InputFileError, require_file
from edgeshift.core.registry import Registry

from ..quantize import CALIBRATION_METHODS

# name -> the function that builds that method's variants (``methods.py`` registers them where they are defined)
METHODS: Registry = Registry("method")


def _fractions(values: tuple[float, ...]) -> str | None:
    return None if values and all(0 < v < 1 for v in values) else "must be values in (0, 1)"


def _counts(values: tuple[int, ...]) -> str | None:
    return None if values and all(n >= 1 for n in values) else "must be counts >= 1"


@dataclass(frozen=True)
class ModelSection:
    arch: str = setting("resnet20", "model source: a zoo name, timm/NAME, torchvision/NAME or "
                                    "package.module:function")
    kwargs: dict[str, Any] = setting({}, "keyword arguments of the model source (a TOML table)")
    weights: str = setting("", "a trained state dict the model starts from (empty: its initialisation)")
    input_size: int = setting(0, "square input side (0: the source's)", minimum=0)


@dataclass(frozen=True)
class DataSection:
    path: str = setting("generated", "'generated', an ImageFolder root or a CIFAR-10 python folder")
    train_samples: int = setting(0, "stratified training subset (0: the whole training split)", minimum=0)
    test_samples: int = setting(0, "stratified test subset for training-time evaluation (0: all)", minimum=0)


@dataclass(frozen=True)
class MethodSection:
    name: str = setting("imp", "how the variants are made: imp | magnitude | random | synflow | pai | layerprune")
    levels: int = setting(4, "imp and one-shot methods: levels after the dense one", minimum=0)
    prune_fraction: float = setting(0.5, "imp and one-shot: of the remaining weights per level")
    rewind_step: int = setting(5, "imp: the step survivors rewind to", minimum=0)
    sparsities: tuple[float, ...] = setting((0.5, 0.8, 0.9), "pai: one variant per sparsity", check=_fractions)
    pai_mode: str = setting("reconvene", "pai: reconvene | all-layers | inverted | unstructured")
    scorer: str = setting("magnitude", "pai: the unstructured scorer")
    criterion: str = setting("imprint", "layerprune: the layer criterion")
    remove: tuple[int, ...] = setting((1, 2, 3), "layerprune: one variant per count of removed candidates",
                                      check=_counts)
    finetune_epochs: int = setting(1, "layerprune: fine-tuning epochs per variant", minimum=0)


TARGET_FAMILIES = ("slim", "layerprune", "layerprune+slim")


def _targets(values: tuple[float, ...]) -> str | None:
    return None if all(0 < v <= 1 for v in values) else ("must be fractions of the dense model's p50 in (0, 1], "
                                                         "e.g. [0.75, 0.5]")


def _distill_weight(value: float) -> str | None:
    return None if 0 <= value < 1 else "must be a share of the loss in [0, 1), e.g. 0.9"


def _families(values: tuple[str, ...]) -> str | None:
    unknown = [v for v in values if v not in TARGET_FAMILIES]
    if unknown or not values:
        return f"must be some of {', '.join(TARGET_FAMILIES)}" + (f" (not {unknown[0]!r})" if unknown else "")
    return None


@dataclass(frozen=True)
class VariantsSection:
    targets: tuple[float, ...] = setting((), "latency targets, fractions of the dense model's p50 under [deploy] "
                                             "profile, in (0, 1]: per target, the most accurate candidate that "
                                             "meets it (empty: [method]'s variants)", check=_targets)
    dense: str = setting("", "targets: an edgeshift checkpoint of the trained dense model to start from (empty: "
                             "train one per [train])")
    candidates: tuple[str, ...] = setting(TARGET_FAMILIES, "targets: candidate families, some of slim (learned "
                                                           "widths) | layerprune | layerprune+slim",
                                          check=_families)
    finetune_epochs: float = setting(1.0, "targets: every candidate's training budget in epochs (slim: half "
                                          "learns the gates, half fine-tunes)", minimum=0.01)
    lr: float = setting(0.01, "targets: peak learning rate of that training (small: the model is trained)")
    align: int = setting(8, "targets: slim keeps widths multiples of this while its gates learn", minimum=1)
    pad_to: int = setting(16, "targets: slim also times its widths rounded up to multiples of this (zero channels, "
                              "exact) and keeps them where faster under the profile (on AVX-512 ONNX Runtime's "
                              "blocked layout is 16 wide: BENCHMARKS.md, 'Latency targets'); 1: as trained",
                          minimum=1)
    int8_loss_ok: float = setting(0.5, "targets, with [deploy] int8: where the dense model's INT8 form meets a "
                                       "target and loses at most this many points of top-1 on the test samples, "
                                       "no FP32-sized candidate is trained for that target (on a short budget none "
                                       "comes that close); negative: train them anyway")
    distill: float = setting(0.0, "targets: share of every candidate's training loss that matches the dense "
                                  "model's softened outputs (knowledge distillation, temperature 4), in [0, 1); "
                                  "0: labels only", check=_distill_weight)


@dataclass(frozen=True)
class TrainSection:
    epochs: int = setting(3, "per level / per variant", minimum=1)
    batch_size: int = setting(64, "training batch size", minimum=1)
    lr: float = setting(0.05, "peak learning rate")
    warmup: int = setting(20, "linear warm-up steps", minimum=0)
    weight_decay: float = setting(5e-4, "L2 penalty")
    seed: int = setting(0, "data order, initialisation and pruning seeds")


@dataclass(frozen=True)
class DeploySection:
    profile: str = setting("host", "device profile for bench and simulate (name or TOML path)")
    policy: str = setting("qps-trend", "switch policy replayed by simulate")
    trace: str = setting("", "a load trace (CSV/JSON); empty: a built-in trace that rises and falls")
    export_test_samples: int = setting(500, "test images for the portfolio's ONNX Runtime accuracy", minimum=0)
    latency_iterations: int = setting(50, "timed calls per variant at export", minimum=1)
    align: int = setting(1, "round pruned widths up to multiples of this with zero channels (exact; 8 helps 2+ "
                            "threads; 1 keeps the widths pruning leaves)", minimum=1)
    int8: bool = setting(False, "add an INT8 variant of each (format from the profile's [quantization]); kept only "
                                "when measured faster than its FP32 source")
    calibration_samples: int = setting(64, "int8: training images for calibration", minimum=1)
    calibration_method: str = setting("minmax", "int8: minmax | entropy | percentile",
                                      check=lambda v: None if v in CALIBRATION_METHODS
                                      else f"must be one of {', '.join(CALIBRATION_METHODS)}")


@dataclass(frozen=True)
class OutputSection:
    dir: str = setting("out/pipeline", "everything goes here")


# keys added to [deploy], [model] and [variants] after run folders existed, with their defaults
LATER_MODEL_KEYS: dict[str, Any] = {"kwargs": {}, "weights": "", "input_size": 0}
LATER_DEPLOY_KEYS = {"align": 1, "int8": False, "calibration_samples": 64, "calibration_method": "minmax"}
LATER_VARIANTS_KEYS = {"distill": 0.0, "pad_to": 16, "int8_loss_ok": 0.5}


@dataclass(frozen=True)
class PipelineConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    method: MethodSection = field(default_factory=MethodSection)
    train: TrainSection = field(default_factory=TrainSection)
    deploy: DeploySection = field(default_factory=DeploySection)
    variants: VariantsSection = field(default_factory=VariantsSection)
    output: OutputSection = field(default_factory=OutputSection)

    def hash(self) -> str:
        """What the run folder is named by and checked against: everything but where it goes."""
        doc = asdict(self)
        doc.pop("output")
        if self.variants == VariantsSection():
            del doc["variants"]  # added later: at its defaults, earlier run folders stay resumable
        for section, keys in (("deploy", LATER_DEPLOY_KEYS), ("model", LATER_MODEL_KEYS),
                              ("variants", LATER_VARIANTS_KEYS)):
            for key, default in keys.items():
                if section in doc and doc[section][key] == default:
                    del doc[section][key]  # at its default a later-added key keeps earlier run folders resumable
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def parse_config(document: dict, source: str = "<config>") -> PipelineConfig:
    """A validated PipelineConfig from a parsed TOML document."""
    cfg = load(PipelineConfig, document, source=source, error=InputFileError)
    METHODS.entry(cfg.method.name)  # an unknown method fails here, naming the known ones
    return cfg


def load_config(path: str | Path, *, arch: str | None = None, data: str | None = None,
                out: str | None = None) -> PipelineConfig:
    """Read a pipeline TOML file; ``arch``/``data``/``out`` override the file (``make demo DATA=... ARCH=...``)."""
    require_file(path, "pipeline configuration")
    overrides = {key: value for key, value in ((("model", "arch"), arch), (("data", "path"), data),
                                               (("output", "dir"), out)) if value}
    cfg = load_toml(PipelineConfig, path, error=InputFileError, overrides=overrides)
    METHODS.entry(cfg.method.name)
    return cfg
