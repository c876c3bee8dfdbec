"""The pipeline's configuration: one TOML file, every key with its default and help stated once, below.

    [model]   arch = "resnet20"
    [data]    path = "generated"          # or an ImageFolder root / CIFAR-10 python folder
    [[methods]] name = "layerprune" ...   # one table per method (`edgeshift methods`), its own settings
    [train]   epochs, batch_size, lr, warmup, weight_decay, optimizer, seed
    [deploy]  profile, policy, trace, export_test_samples, latency_iterations, align, int8, calibration_*, cascade*
    [variants] targets = [0.75, 0.5]     # latency targets instead of the methods' variants (targets.py)
    [output]  dir = "out/pipeline"

Loaded by ``edgeshift.core.config``: an unknown section or key, or a value of the wrong type, is an error naming
the file and the key. Each ``[[methods]]`` table is checked against its own method's settings dataclass; the
pipeline names no method. The old single ``[method]`` table is still read, with a one-line note showing its new
form.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgeshift.core.config import load, read_toml, setting
from edgeshift.core.errors import InputFileError, UnknownNameError, require_file
from edgeshift.pruner.layers.criteria import CRITERIA
from edgeshift.pruner.methods import METHODS
from edgeshift.pruner.methods.base import one_of
from edgeshift.pruner.train import OPTIMIZERS

from ..quantize import CALIBRATION_METHODS, CalibrationMethodName


@dataclass(frozen=True)
class ModelSection:
    arch: str = setting("resnet20", "model source: a zoo name, timm/NAME, torchvision/NAME or package.module:function")
    kwargs: dict[str, Any] = setting({}, "keyword arguments of the model source (a TOML table)")
    weights: str = setting("", "a trained state dict the model starts from (empty: its initialisation)")
    input_size: int = setting(0, "square input side (0: the source's)", minimum=0)


@dataclass(frozen=True)
class DataSection:
    path: str = setting("generated", "'generated', an ImageFolder root or a CIFAR-10 python folder")
    train_samples: int = setting(0, "stratified training subset (0: the whole training split)", minimum=0)
    test_samples: int = setting(0, "stratified test subset for training-time evaluation (0: all)", minimum=0)


TARGET_FAMILIES = ("slim", "layerprune", "layerprune+slim")


def _targets(values: tuple[float, ...]) -> str | None:
    return (
        None
        if all(0 < v <= 1 for v in values)
        else ("must be fractions of the dense model's p50 in (0, 1], e.g. [0.75, 0.5]")
    )


def _distill_weight(value: float) -> str | None:
    return None if 0 <= value < 1 else "must be a share of the loss in [0, 1), e.g. 0.9"


def _families(values: tuple[str, ...]) -> str | None:
    unknown = [v for v in values if v not in TARGET_FAMILIES]
    if unknown or not values:
        return f"must be some of {', '.join(TARGET_FAMILIES)}" + (f" (not {unknown[0]!r})" if unknown else "")
    return None


@dataclass(frozen=True)
class VariantsSection:
    targets: tuple[float, ...] = setting(
        (),
        "latency targets, fractions of the dense model's p50 under [deploy] "
        "profile, in (0, 1]: per target, the most accurate candidate that "
        "meets it (empty: the [[methods]] tables' variants)",
        check=_targets,
    )
    dense: str = setting(
        "", "targets: an edgeshift checkpoint of the trained dense model to start from (empty: train one per [train])"
    )
    candidates: tuple[str, ...] = setting(
        TARGET_FAMILIES,
        "targets: candidate families, some of slim (learned widths) | layerprune | layerprune+slim",
        check=_families,
    )
    finetune_epochs: float = setting(
        1.0,
        "targets: every candidate's training budget in epochs (slim: half learns the gates, half fine-tunes)",
        minimum=0.01,
    )
    lr: float = setting(0.01, "targets: peak learning rate of that training (small: the model is trained)")
    align: int = setting(8, "targets: slim keeps widths multiples of this while its gates learn", minimum=1)
    pad_to: int = setting(
        16,
        "targets: slim also times its widths rounded up to multiples of this (zero channels, "
        "exact) and keeps them where faster under the profile (on AVX-512 ONNX Runtime's "
        "blocked layout is 16 wide: BENCHMARKS.md, 'Latency targets'); 1: as trained",
        minimum=1,
    )
    int8_loss_ok: float = setting(
        0.5,
        "targets, with [deploy] int8: where the dense model's INT8 form meets a "
        "target and loses at most this many points of top-1 on the test samples, "
        "no FP32-sized candidate is trained for that target (on a short budget none "
        "comes that close); negative: train them anyway",
    )
    criterion: str = setting(
        "imprint", "targets: the layer criterion that orders the blocks removed", check=one_of(CRITERIA)
    )
    distill: float = setting(
        0.0,
        "targets: share of every candidate's training loss that matches the dense "
        "model's softened outputs (knowledge distillation, temperature 4), in [0, 1); "
        "0: labels only",
        check=_distill_weight,
    )


@dataclass(frozen=True)
class TrainSection:
    epochs: int = setting(3, "per level / per variant", minimum=1)
    batch_size: int = setting(64, "training batch size", minimum=1)
    lr: float = setting(0.05, "peak learning rate")
    warmup: int = setting(20, "linear warm-up steps", minimum=0)
    weight_decay: float = setting(5e-4, "L2 penalty")
    optimizer: str = setting(
        "sgd",
        "sgd (momentum 0.9) or adamw (what vision transformers train with, at a learning rate near 1e-3)",
        check=lambda v: None if v in OPTIMIZERS else f"must be one of {', '.join(OPTIMIZERS)}",
    )
    seed: int = setting(0, "data order, initialisation and pruning seeds")


@dataclass(frozen=True)
class DeploySection:
    profile: str = setting("host", "device profile for bench and simulate (name or TOML path)")
    policy: str = setting("qps-trend", "switch policy replayed by simulate")
    trace: str = setting("", "a load trace (CSV/JSON); empty: a built-in trace that rises and falls")
    export_test_samples: int = setting(500, "test images for the portfolio's ONNX Runtime accuracy", minimum=0)
    latency_iterations: int = setting(50, "timed calls per variant at export", minimum=1)
    align: int = setting(
        1,
        "round pruned widths up to multiples of this with zero channels (exact; 8 helps 2+ "
        "threads; 1 keeps the widths pruning leaves)",
        minimum=1,
    )
    int8: bool = setting(
        False,
        "add an INT8 variant of each (format from the profile's [quantization]); kept only "
        "when measured faster than its FP32 source",
    )
    calibration_samples: int = setting(64, "int8: training images for calibration", minimum=1)
    calibration_method: CalibrationMethodName = setting(
        "minmax",
        "int8: minmax | entropy | percentile",
        check=lambda v: None if v in CALIBRATION_METHODS else f"must be one of {', '.join(CALIBRATION_METHODS)}",
    )
    cascade: bool = setting(
        False,
        "calibrate a confidence cascade over the portfolio (the fastest step first, an input going on while unsure; "
        "`edgeshift run --cascade`)",
    )
    cascade_loss: float = setting(0.5, "cascade: points of top-1 it may lose against the reference", minimum=0)
    cascade_samples: int = setting(
        500, "cascade: test-split images it is calibrated on, other than those measured", minimum=1
    )


@dataclass(frozen=True)
class OutputSection:
    dir: str = setting("out/pipeline", "everything goes here")


# keys added to [deploy], [model] and [variants] after run folders existed, with their defaults
LATER_MODEL_KEYS: dict[str, Any] = {"kwargs": {}, "weights": "", "input_size": 0}
LATER_DEPLOY_KEYS = {
    "align": 1,
    "int8": False,
    "calibration_samples": 64,
    "calibration_method": "minmax",
    "cascade": False,
    "cascade_loss": 0.5,
    "cascade_samples": 500,
}
LATER_VARIANTS_KEYS = {"distill": 0.0, "pad_to": 16, "int8_loss_ok": 0.5, "criterion": "imprint"}

DEFAULT_METHOD = "imp"  # what a configuration with neither [[methods]] nor [variants] targets runs


@dataclass(frozen=True)
class MethodChoice:
    """One ``[[methods]]`` table: a method's name and its settings (an instance of the method's ``Settings``)."""

    name: str
    settings: Any


@dataclass(frozen=True)
class PipelineConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    methods: tuple[MethodChoice, ...] = ()
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
        for choice, table in zip(self.methods, doc.get("methods", [])):
            # a method's settings added after run folders existed: at their defaults, those folders stay resumable
            for key, default in getattr(type(choice.settings), "LATER", {}).items():
                if table["settings"].get(key, object()) == default:
                    del table["settings"][key]
        for section, keys in (
            ("deploy", LATER_DEPLOY_KEYS),
            ("model", LATER_MODEL_KEYS),
            ("variants", LATER_VARIANTS_KEYS),
        ):
            for key, default in keys.items():
                if section in doc and doc[section][key] == default:
                    del doc[section][key]  # at its default a later-added key keeps earlier run folders resumable
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


SECTIONS = ("model", "data", "methods", "train", "deploy", "variants", "output")
# the old single [method] table's keys that a method's settings call otherwise
OLD_METHOD_KEYS = {"pai_mode": "mode"}


def _method_choice(table: Any, where: str, source: str) -> MethodChoice:
    if not isinstance(table, dict):
        raise InputFileError(f"{source}: {where} must be a table, got {type(table).__name__}")
    if "name" not in table:
        raise InputFileError(f"{source}: {where} lacks 'name'; known methods: {', '.join(METHODS.names())}")
    name = table["name"]
    if not isinstance(name, str) or name not in METHODS:
        raise InputFileError(f"{source}: {UnknownNameError('method', str(name), METHODS.names())}")
    settings = load(
        METHODS.get(name).Settings,
        {k: v for k, v in table.items() if k != "name"},
        source=source,
        error=InputFileError,
        section=where,
    )
    return MethodChoice(name, settings)


def _toml_value(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, bool) else str(value).lower()


def _from_old_method(table: Any, document: dict, source: str) -> list[dict]:
    """The old ``[method]`` table as one ``[[methods]]`` table: its method's own keys (the rest were never read),
    with a one-line note showing the new form."""
    if not isinstance(table, dict):
        raise InputFileError(f"{source}: [method] must be a table, got {type(table).__name__}")
    name = table.get("name", DEFAULT_METHOD)
    if not isinstance(name, str) or name not in METHODS:
        raise InputFileError(f"{source}: {UnknownNameError('method', str(name), METHODS.names())}")
    own = {f.name for f in dataclasses.fields(METHODS.get(name).Settings)}
    new = {"name": name}
    for key, value in table.items():
        key = OLD_METHOD_KEYS.get(key, key)
        if key in own:
            new[key] = value
        if key == "criterion" and isinstance(variants := document.get("variants"), dict) and variants.get("targets"):
            # the targets' criterion was read from [method]; the caller's table is not changed
            document["variants"] = {"criterion": value, **variants}
    shown = " ".join(f"{k} = {_toml_value(v)}" for k, v in new.items())
    warnings.warn(
        f"{source}: [method] is the old form, read as [[methods]] {shown} (write it so)", FutureWarning, stacklevel=3
    )
    return [new]


def parse_config(document: dict, source: str = "<config>") -> PipelineConfig:
    """A validated PipelineConfig from a parsed TOML document."""
    document = dict(document)
    unknown = [k for k in document if k not in SECTIONS and k != "method"]
    if unknown:
        raise InputFileError(f"{source}: unknown section [{unknown[0]}]; known: {', '.join(SECTIONS)}")
    if "method" in document and "methods" in document:
        raise InputFileError(f"{source}: [method] and [[methods]] both given; keep the [[methods]] tables")
    tables = document.pop("methods", None)
    if "method" in document:
        tables = _from_old_method(document.pop("method"), document, source)
    if tables is not None and not isinstance(tables, list):
        raise InputFileError(f"{source}: methods must be [[methods]] tables, one per method")
    cfg = load(PipelineConfig, document, source=source, error=InputFileError)
    if tables is None:
        tables = [] if cfg.variants.targets else [{"name": DEFAULT_METHOD}]
    if not tables and not cfg.variants.targets:
        raise InputFileError(f"{source}: no [[methods]] table and no [variants] targets: nothing makes variants")
    choices = tuple(_method_choice(t, f"methods[{i}]", source) for i, t in enumerate(tables))
    names = [c.name for c in choices]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise InputFileError(
            f"{source}: method {twice[0]!r} has two [[methods]] tables; give it one (its settings "
            "take lists, one variant per value)"
        )
    return dataclasses.replace(cfg, methods=choices)


def load_config(
    path: str | Path, *, arch: str | None = None, data: str | None = None, out: str | None = None
) -> PipelineConfig:
    """Read a pipeline TOML file; ``arch``/``data``/``out`` override the file (``make demo DATA=... ARCH=...``)."""
    require_file(path, "pipeline configuration")
    document = read_toml(path, error=InputFileError)
    for (section, key), value in ((("model", "arch"), arch), (("data", "path"), data), (("output", "dir"), out)):
        if value:
            document.setdefault(section, {})[key] = value
    return parse_config(document, str(path))
