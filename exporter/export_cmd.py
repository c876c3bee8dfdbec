"""Library side of ``edgeshift export``: checkpoints or run directories in, one portfolio out."""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch
from torch import nn

from edgeshift.core.atomic import check_output_path
from edgeshift.core.errors import EdgeshiftError, InputFileError
from edgeshift.device_profiles import DeviceProfile, load_profile
from edgeshift.pruner.checkpoint import load_model
from edgeshift.pruner.data import load_dataset
from edgeshift.pruner.gating import gated_network
from edgeshift.pruner.models.record import ModelRecord, record_of
from edgeshift.pruner.models.sources import ModelSpec
from edgeshift.pruner.models.zoo import input_shape
from edgeshift.pruner.routing import routed_network
from edgeshift.pruner.structured import PruneReport, prune_zero_channels

from .portfolio import BuildSettings, CascadeCalibration, NestedSource, VariantFacts, build_portfolio
from .profile import TestData
from .quantize import CALIBRATION_METHODS, Calibration, CalibrationMethodName

LEVEL_RE = re.compile(r"^level_(\d+)$")


@dataclass
class Source:
    name: str  # variant name
    checkpoint: Path | None  # None: built from ``spec``
    recipe: str
    spec: ModelSpec | None = None  # a model source with its weights


def discover_sources(paths: list[Path]) -> list[Source]:
    """Checkpoint files as given; a run directory contributes each finished ``level_<k>/checkpoint.pt``."""
    found: list[Source] = []
    for p in paths:
        p = Path(p)
        if p.is_file():
            found.append(Source(re.sub(r"[^A-Za-z0-9._-]", "_", p.stem), p, "checkpoint"))
        elif p.is_dir():
            levels = sorted((int(m.group(1)), d) for d in p.iterdir() if d.is_dir() and (m := LEVEL_RE.match(d.name)))
            finished = [(k, d) for k, d in levels if (d / "metrics.json").is_file() and (d / "checkpoint.pt").is_file()]
            if not finished:
                raise InputFileError(
                    f"{p} holds no finished levels (expected {p}/level_<k>/checkpoint.pt "
                    "with metrics.json, as written by `edgeshift imp`)"
                )
            for k, d in finished:
                method = json.loads((d / "metrics.json").read_text()).get("method", "imp")
                found.append(Source(f"level{k}", d / "checkpoint.pt", f"{method} level {k}"))
        else:
            raise InputFileError(f"not found: {p} (pass checkpoint files or run directories)")
    names = [s.name for s in found]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise EdgeshiftError(f"two sources would both be named {dupes[0]!r}; rename one of the files")
    return found


def nested_sources(levels: dict[str, tuple[str, float]]) -> dict[str, NestedSource]:
    """Each narrower width whose full width (same nest run) is also exported, with that one as its base."""
    bases = {family: name for name, (family, width) in levels.items() if width == 1.0}
    return {
        name: NestedSource(bases[family], width)
        for name, (family, width) in levels.items()
        if width < 1.0 and family in bases
    }


def export_portfolio(
    paths: list[Path],
    out: Path,
    *,
    data: str | None = None,
    test_samples: int = 1000,
    prune: bool = True,
    profile: DeviceProfile | str = "host",
    threads: int | None = None,
    latency_iterations: int | None = None,
    int8: bool = False,
    calibration_samples: int = 64,
    calibration_method: str = "minmax",
    measure_memory: bool = True,
    force: bool = False,
    align: int = 1,
    spec: ModelSpec | None = None,
    cascade: bool = False,
    cascade_loss: float = 0.5,
    cascade_samples: int = 2000,
) -> Path:
    """Load each source, prune it exactly (sparse checkpoints shrink, pruned ones are unchanged; widths rounded
    up to multiples of ``align`` with zero channels), and build one portfolio with accuracy measured through
    ONNX Runtime on ``data``'s test split and latency under the device ``profile``. ``int8`` adds an INT8 variant
    of each, calibrated on ``calibration_samples`` images of ``data``'s training split. ``cascade`` calibrates a
    confidence cascade on ``cascade_samples`` test-split images other than the ``test_samples`` measured, losing at
    most ``cascade_loss`` points of top-1 against the reference there."""
    if align > 1 and not prune:
        raise EdgeshiftError(f"--align {align} widens pruned layers; it needs pruning on the way (drop --no-prune)")
    if int8 and data is None:
        raise EdgeshiftError(
            "--int8 needs calibration images: pass --data (its training split calibrates, its "
            "test split measures accuracy)"
        )
    if int8 and calibration_method not in CALIBRATION_METHODS:
        raise EdgeshiftError(
            f"unknown calibration method {calibration_method!r}; choose one of {', '.join(CALIBRATION_METHODS)}"
        )
    if cascade and data is None:
        raise EdgeshiftError(
            "--cascade needs labelled images to calibrate on: pass --data (test-split images other than those "
            "measured calibrate it)"
        )
    if cascade and not 0 <= cascade_loss <= 100:
        raise EdgeshiftError(f"--cascade-loss is in points of top-1, in [0, 100]; got {cascade_loss:g}")
    if cascade and cascade_samples < 1:
        raise EdgeshiftError(f"--cascade-samples must be at least 1, got {cascade_samples}")
    if int8 and calibration_samples < 1:
        raise EdgeshiftError(f"--calibration-samples must be at least 1, got {calibration_samples}")
    # an unknown name or a bad file fails before any work
    device_profile = load_profile(profile) if isinstance(profile, str) else profile
    check_output_path(out, force)
    sources = discover_sources(paths)
    if spec is not None:
        if "dense" in {s.name for s in sources}:
            raise EdgeshiftError(
                "--arch's model is the variant 'dense', and a source is already named so; rename that file"
            )
        sources.insert(0, Source("dense", None, f"{spec.source}" + (" with its weights" if spec.weights else ""), spec))
    if not sources:
        raise EdgeshiftError(
            "nothing to export: pass checkpoint files or run directories, or --arch SOURCE (with --weights FILE)"
        )
    models: dict[str, nn.Module] = {}
    reports: dict[str, PruneReport] = {}
    recipes: dict[str, str] = {}
    totals: dict[str, int] = {}
    nonzeros: dict[str, int] = {}
    record: ModelRecord | None = None
    levels: dict[str, tuple[str, float]] = {}  # nested widths: variant -> (family, width)
    gated: set[str] = set()  # gated per input: never the reference (its heads make it the largest)
    for s in sources:
        model, checkpoint = load_model(s.checkpoint, s.spec)
        nest = checkpoint.get("meta", {}).get("nest")
        if isinstance(nest, dict) and isinstance(nest.get("family"), str):
            levels[s.name] = (nest["family"], float(nest["width"]))
        name = record_of(model).name
        if record is not None and name != record.name:
            raise EdgeshiftError(
                f"{s.checkpoint} is a {name}, the other sources are {record.name}: one portfolio holds one architecture"
            )
        record = record_of(model)
        weights = [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        total = sum(w.numel() for w in weights)
        nonzero = sum(int(torch.count_nonzero(w)) for w in weights)
        totals[s.name], nonzeros[s.name] = total, nonzero
        recipes[s.name] = s.recipe
        x = torch.randn(input_shape(model, 2), generator=torch.Generator().manual_seed(0))
        gate = checkpoint.get("meta", {}).get("gate")
        routing = checkpoint.get("meta", {}).get("routing")
        if routing is not None:  # the router and its signatures, sliced from the fine-tuned backbone: one graph
            model = routed_network(model, routing, x, str(s.checkpoint))
            if model.prune_report is not None:  # each signature pruned exactly here: the worst deviation recorded
                reports[s.name] = model.prune_report
            gated.add(s.name)
        elif gate is not None:  # the backbone with its trained heads, exported whole: masks are per input, not zeros
            model = gated_network(model, gate, x, str(s.checkpoint))
            gated.add(s.name)
        elif prune:
            model, reports[s.name] = prune_zero_channels(model, x, align=align)
        models[s.name] = model
    # against the largest source, so depth- or width-pruned sources count their missing weights too
    compressions = {n: max(totals.values()) / max(nonzeros[n], 1) for n in totals}
    assert record is not None  # there was at least one source
    test: TestData | None = None
    cascade_data: CascadeCalibration | None = None
    labels: list[str] | None = None
    # recorded by training; the data's own when given
    mean = list(record.normalisation.mean) if record.normalisation else None
    std = list(record.normalisation.std) if record.normalisation else None
    if data is not None:
        ds = load_dataset(data, "test", num_classes=record.classes, size=record.input_size)
        if ds.num_classes != record.num_classes:
            raise EdgeshiftError(f"the data has {ds.num_classes} classes, the model {record.num_classes}")
        if cascade:  # before the subset: the held-out images are the next ones of its permutation
            held = ds.held_out(min(test_samples, len(ds)), cascade_samples)
            cascade_data = CascadeCalibration(held.normalised(), held.labels, held.name, cascade_loss / 100)
        ds = ds.subset(test_samples)
        test, labels, mean, std = TestData(ds.normalised(), ds.labels, ds.name), ds.classes, list(ds.mean), list(ds.std)
    calibration = None
    if int8:
        assert data is not None and mean is not None and std is not None  # int8 needs --data, checked above
        train = load_dataset(data, "train", num_classes=record.classes, size=record.input_size)
        train = dataclasses.replace(train.subset(calibration_samples), mean=tuple(mean), std=tuple(std))
        method = cast(CalibrationMethodName, calibration_method)  # one of them: checked above
        calibration = Calibration(train.normalised(), method, train.name)
    example = torch.randn(input_shape(next(iter(models.values())), 2), generator=torch.Generator().manual_seed(0))
    plain = [n for n in compressions if n not in gated] or list(compressions)
    reference = max(plain, key=lambda n: (-compressions[n], n))
    return build_portfolio(
        models,
        example,
        out,
        test_data=test,
        facts=VariantFacts(
            labels,
            reports,
            compressions,
            recipes,
            reference,
            mean,
            std,
            record.name,
            nested_sources(levels),
            frozenset(gated),
        ),
        settings=BuildSettings(
            device_profile, threads, latency_iterations, calibration, measure_memory, force=force, cascade=cascade_data
        ),
    )
