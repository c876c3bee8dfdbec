"""The portfolio: export every variant, profile it, drop what another variant beats, pack one DEFLATE ZIP."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import io
import json
import os
import tempfile
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx

import edgeshift
from edgeshift.core.atomic import atomic_path, check_output_path
from edgeshift.core.errors import EdgeshiftError
from edgeshift.device_profiles import DeviceProfile
from edgeshift.device_profiles.profile import cross_built
from edgeshift.pruner.data import CIFAR_MEAN, CIFAR_STD
from edgeshift.pruner.metrics import count_params
from edgeshift.pruner.routing import RoutedNetwork
from edgeshift.runtime.cascade import describe
from edgeshift.runtime.ladder import LadderPoint, build_ladder, is_faster, ladder_accuracy, not_faster_reason
from edgeshift.runtime.manifest import (
    CHECKS_NAME,
    MANIFEST_NAME,
    NAME_RE,
    SCHEMA_VERSION,
    Accuracy,
    CheckInputs,
    DroppedVariant,
    InputSpec,
    Ladder,
    Latency,
    Manifest,
    Nested,
    OutputSpec,
    Preprocessing,
    Quantization,
    VariantRecord,
    parse_manifest,
    variant_file,
)
from edgeshift.runtime.measure import LatencyStats, machine_label
from edgeshift.runtime.memprobe import measure_session_memory
from edgeshift.runtime.session import create_session

from .cascade import NoFasterStep, StepOutputs, calibrate
from .nesting import nested_form
from .onnx_export import INPUT_NAME, OUTPUT_NAME, export_onnx, op_counts
from .profile import (
    DEFLATE_LEVEL,
    TestData,
    accuracy_from_logits,
    deflated_size,
    onnx_logits,
    profile_threads,
    time_interleaved_models,
    timing_profile,
)
from .quantize import Calibration, agreement, fastest_int8
from .routing import export_parts, export_routed, routed_int8


@dataclass(frozen=True)
class Tolerance:
    """Two variants closer than this on every axis are near-duplicates; the smaller one stays."""

    accuracy: float = 0.001  # absolute top-1
    latency: float = 0.03  # relative p50
    size: float = 0.03  # relative bytes


def _top1(v: dict) -> float | None:
    return (v.get("accuracy") or {}).get("top1")


def _beats(a: dict, b: dict) -> bool:
    """a is at least as good as b on accuracy, latency and size, and strictly better on one. Without measured
    accuracy for both, nothing beats anything: size alone never decides that a variant is worse."""
    acc_a, acc_b = _top1(a), _top1(b)
    if acc_a is None or acc_b is None:
        return False
    lat_a, lat_b = a["latency"]["p50_ms"], b["latency"]["p50_ms"]
    ge = acc_a >= acc_b and lat_a <= lat_b and a["bytes"] <= b["bytes"]
    return ge and (acc_a > acc_b or lat_a < lat_b or a["bytes"] < b["bytes"])


def _near(a: dict, b: dict, tol: Tolerance) -> bool:
    acc_a, acc_b = _top1(a), _top1(b)
    if acc_a is None or acc_b is None:
        return False
    rel = lambda x, y: abs(x - y) / max(abs(x), abs(y), 1e-12)  # noqa: E731
    return (
        abs(acc_a - acc_b) <= tol.accuracy
        and rel(a["latency"]["p50_ms"], b["latency"]["p50_ms"]) <= tol.latency
        and rel(a["bytes"], b["bytes"]) <= tol.size
    )


def postprocess(variants: list[dict], tol: Tolerance = Tolerance()) -> tuple[list[dict], list[dict]]:
    """Drop variants another beats on accuracy, latency and size at once, and near-duplicates; the dense
    reference always stays. Returns (kept sorted by bytes, dropped with reasons)."""
    kept, dropped = [], []
    ordered = sorted(variants, key=lambda v: (v["bytes"], v["name"]))
    for v in ordered:
        if v.get("reference"):
            kept.append(v)
            continue
        winner = next((o for o in ordered if o is not v and _beats(o, v)), None)
        if winner is not None:
            dropped.append({"name": v["name"], "reason": f"beaten by {winner['name']} on accuracy, latency and size"})
            continue
        twin = next((o for o in kept if _near(o, v, tol)), None)
        if twin is not None:
            dropped.append({"name": v["name"], "reason": f"near-duplicate of {twin['name']} (within {tol})"})
            continue
        kept.append(v)
    return sorted(kept, key=lambda v: (v["bytes"], v["name"])), dropped


MIN_DEFLATE_SAVING = 0.10


def check_inputs_member(x: np.ndarray, count: int = 8) -> tuple[CheckInputs, bytes]:
    """The first ``count`` preprocessed inputs of ``x`` as ``checks.npy`` and its manifest record: what a device
    re-checks its INT8 variants on."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(x[:count], dtype="<f4"), allow_pickle=False)
    data = buf.getvalue()
    return CheckInputs(file=CHECKS_NAME, sha256=_sha256(data), bytes=len(data), count=len(x[:count])), data


def write_portfolio(
    out_path: str | os.PathLike,
    manifest: Manifest,
    onnx: dict[str, bytes],
    min_saving: float = MIN_DEFLATE_SAVING,
    checks: bytes | None = None,
) -> Path:
    """Pack ``manifest.json``, ``variants/<name>.onnx`` and, with INT8 variants, ``checks.npy`` into one standard
    ZIP, atomically.

    Members are DEFLATEd, except a variant that DEFLATE shrinks by less than ``min_saving`` (a dense model):
    it is STORED, so a switch to it does not spend CPU inflating what barely compressed.
    """
    document = manifest.to_dict()
    parse_manifest(json.loads(json.dumps(document)))  # what a device will read back: the same checks, here
    out_path = Path(out_path)
    with atomic_path(out_path) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=DEFLATE_LEVEL) as z:
            z.writestr(MANIFEST_NAME, json.dumps(document, indent=1))
            for v in manifest.variants:
                data = onnx[v.name]
                deflated = v.deflated_bytes or deflated_size(data)
                method = zipfile.ZIP_DEFLATED if deflated <= (1 - min_saving) * len(data) else zipfile.ZIP_STORED
                z.writestr(v.file, data, compress_type=method)
            if checks is not None:
                z.writestr(CHECKS_NAME, checks)
    return out_path


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class _Built:
    """One variant on its way into the portfolio: its ONNX bytes, its manifest entry, its session and logits."""

    entry: dict
    data: bytes
    session: object
    logits: np.ndarray | None


def _op_counts(data: bytes) -> dict[str, int]:

    return op_counts(onnx.load_model_from_string(data))


def _point(b: _Built, stats: LatencyStats) -> LadderPoint:
    return LadderPoint(
        b.entry["name"], ladder_accuracy(_top1(b.entry), b.entry["reference"]), stats.p50_ms, stats.round_p50_ms
    )


def _int8_variants(
    fp32: dict[str, _Built],
    calibration: Calibration,
    profile: DeviceProfile,
    test_data: TestData | None,
    feed: dict,
    say: Callable[[str], None],
    routed: Mapping[str, list[bytes]] | None = None,
) -> tuple[dict[str, _Built], list[dict]]:
    """An INT8 variant of every FP32 one in the profile's format; with ``format = "auto"`` every candidate is
    timed against the others (interleaved, under the profile) and the fastest kept. One whose top-1 agrees with its
    source on less than ``quantization.min_agreement`` of the test images is made again with the other
    ``reduce_range`` (u8 x s8 products saturate on x86 without VNNI), and dropped, with the figures, if neither
    reaches it. A ``routed`` variant's router and signatures are quantized one by one in one scheme and composed
    again (``routing.routed_int8``). Returns (kept, dropped with reasons)."""
    out, dropped = {}, []
    floor = profile.quantization.min_agreement
    for name, src in fp32.items():
        qname = f"{name}-int8"
        if not NAME_RE.match(qname):
            raise EdgeshiftError(f"variant name {name!r} is too long to name its INT8 variant; shorten it")
        tries = [
            profile,
            dataclasses.replace(
                profile,
                quantization=dataclasses.replace(
                    profile.quantization, reduce_range=not profile.quantization.reduce_range
                ),
            ),
        ]
        measured = []
        for attempt in tries:
            if routed and name in routed:
                choice = routed_int8(routed[name], calibration, attempt, feed, name=name)
            else:
                choice = fastest_int8(src.data, calibration, attempt, feed, name=name)
            logits = top1 = top5 = agree = deviation = None
            if test_data is not None and len(test_data.y) and src.logits is not None:
                logits = onnx_logits(choice.session, test_data.x)
                top1, top5 = accuracy_from_logits(logits, test_data.y)
                agree, deviation = agreement(src.logits, logits)
            measured.append((choice.scheme.reduce_range, agree))
            if agree is None or agree >= floor:
                break
            say(
                f"   {qname}: top-1 agrees with {name} on {100 * agree:.1f}% of the test images with reduce_range "
                f"{choice.scheme.reduce_range}, under the {100 * floor:.0f}% floor"
                + ("; trying the other setting" if attempt is tries[0] else "")
            )
        if agree is not None and agree < floor:
            figures = ", ".join(f"{100 * a:.1f}% with reduce_range {r}" for r, a in measured if a is not None)
            dropped.append(
                {
                    "name": qname,
                    "reason": f"INT8 agrees with its FP32 source {name} on {figures} of "
                    f"{_samples(test_data)} test images, under the profile's "
                    f"quantization.min_agreement {100 * floor:.0f}%",
                }
            )
            continue
        scheme, data, session, timed = choice.scheme, choice.data, choice.session, choice.candidates_p50_ms
        if timed is not None:
            say(
                f"   {qname}: format auto, p50 "
                + ", ".join(f"{k} {v:.3f} ms" for k, v in timed.items())
                + f" -> {scheme.label}"
            )
        e = src.entry
        entry = {
            **e,
            "name": qname,
            "file": variant_file(qname),
            "sha256": _sha256(data),
            "bytes": len(data),
            "deflated_bytes": deflated_size(data),
            "reference": False,
            "recipe": f"{e['recipe']}, INT8 {scheme.label}",
            "accuracy": None if top1 is None else {**e["accuracy"], "top1": top1, "top5": top5},
            "exactness": None,
            "op_counts": _op_counts(data),
            "precision": "int8",
            "nested": None,  # stored whole: INT8 weights are not slices of the base's FP32 ones
            "quantization": Quantization(
                source=name,
                format=scheme.format,
                activations=scheme.activations,
                per_channel=scheme.per_channel,
                reduce_range=scheme.reduce_range,
                calibration_samples=len(calibration.x),
                calibration_method=calibration.method,
                calibration_dataset=calibration.dataset,
                agreement_top1=agree,
                max_logit_deviation=deviation,
                test_samples=0 if test_data is None else len(test_data.y),
                candidates_p50_ms=timed,
            ),
        }
        out[qname] = _Built(entry, data, session, logits)
    return out, dropped


def _samples(test: TestData | None) -> int:
    return len(test.y) if test is not None else 0


@dataclass(frozen=True)
class NestedSource:
    """A variant that is a narrower width of another (nested widths): its weights are slices of ``base``'s."""

    base: str  # the widest level's variant name
    width: float  # the fraction of every nested channel group it keeps


@dataclass(frozen=True)
class VariantFacts:
    """What the manifest says about the variants beyond what their modules show."""

    labels: list[str] | None = None  # class names (default: "0", "1", ...)
    prune_reports: Mapping[str, Any] = field(default_factory=dict)  # per variant: its exact prune's report
    compressions: Mapping[str, float] = field(default_factory=dict)  # per variant: weights vs the largest source
    recipes: Mapping[str, str] = field(default_factory=dict)  # per variant: how it was made, in words
    reference: str | None = None  # the dense variant, always kept (default: the one with the most parameters)
    mean: list[float] | None = None  # the input normalisation the device applies
    std: list[float] | None = None
    architecture: str | None = None  # the model source's name
    nested: Mapping[str, NestedSource] = field(default_factory=dict)  # per narrower width: its base
    gated: frozenset[str] = frozenset()  # variants gated per input: kept only when measured faster than the reference


@dataclass(frozen=True)
class BuildSettings:
    """How a portfolio is built: the device profile it is timed under, and what else is made and measured."""

    profile: DeviceProfile | str = "host"
    threads: int | None = None  # overrides the profile's intra-op threads
    latency_iterations: int | None = None  # overrides the profile's timed calls per variant
    int8: Calibration | None = None  # calibration images: an INT8 variant of each, kept when measured faster
    measure_memory: bool = True  # each session's peak memory, in a fresh process
    tolerance: Tolerance = Tolerance()
    force: bool = False  # overwrite an existing portfolio
    cascade: CascadeCalibration | None = None  # held-out images: a confidence cascade calibrated on them


@dataclass(frozen=True)
class CascadeCalibration:
    """Labelled images a confidence cascade is calibrated on: never the test images its figures are reported on."""

    x: np.ndarray  # preprocessed float32 NCHW
    y: np.ndarray
    name: str = "calibration"
    max_loss: float = 0.005  # top-1 the cascade may lose against the reference (a fraction: 0.005 = 0.5 points)
    max_early: int = 2  # the most steps before the reference


def build_portfolio(
    variants: dict,
    example_inputs,
    out_path: str | os.PathLike,
    *,
    test_data: TestData | None = None,
    facts: VariantFacts = VariantFacts(),
    settings: BuildSettings = BuildSettings(),
    say: Callable[[str], None] = print,
) -> Path:
    """Export, check, time, post-process and pack ``variants`` (name -> nn.Module) into one portfolio file.

    Every variant is timed against the others in one interleaved run under the device profile (``settings``).
    With calibration images, an INT8 variant of each is made in the profile's ``[quantization]`` format and kept
    only when measured faster than its FP32 source and as accurate as its floor. The ladder the runtime's policies
    step along is measured here and recorded in the manifest. Nothing is written at ``out_path`` unless every
    step succeeds.
    """
    labels, reference, mean, std = facts.labels, facts.reference, facts.mean, facts.std
    prune_reports, compressions, recipes = dict(facts.prune_reports), facts.compressions, facts.recipes
    int8, tolerance = settings.int8, settings.tolerance
    force, measure_memory = settings.force, settings.measure_memory
    threads, latency_iterations = settings.threads, settings.latency_iterations

    out_path = check_output_path(out_path, force)
    if not variants:
        raise EdgeshiftError("no variants to pack")
    for name in variants:
        if not NAME_RE.match(name):
            raise EdgeshiftError(f"variant name {name!r} is not safe; use letters, digits, '.', '_', '-'")
    timing = timing_profile(settings.profile, threads=threads, iterations=latency_iterations)
    threads_used = profile_threads(timing)
    reference = reference or max(variants, key=lambda n: count_params(variants[n]))
    channels = int(example_inputs.shape[1])
    built: dict[str, _Built] = {}
    routed: dict[str, list[bytes]] = {}  # a routed variant's parts (router, signatures): quantized one by one
    num_classes = 0  # the variants' output width, from the first export
    with tempfile.TemporaryDirectory(prefix="edgeshift-export-") as tmp:
        for name, model in variants.items():
            path = Path(tmp) / f"{name}.onnx"
            if isinstance(model, RoutedNetwork):  # router and signatures composed into one graph of If branches
                parts = export_parts(model, example_inputs)
                exp = export_routed(model, example_inputs, path, parts=parts)
                routed[name] = [data for data, _ in parts]
            else:
                exp = export_onnx(model, example_inputs, path)
            data = path.read_bytes()
            session = create_session(data, timing)
            logits = top1 = top5 = None
            if test_data is not None and len(test_data.y):
                logits = onnx_logits(session, test_data.x)
                top1, top5 = accuracy_from_logits(logits, test_data.y)
            say(
                f"   {name}: exported ({len(built) + 1}/{len(variants)}), {exp.params:,} params, {len(data):,} ONNX "
                f"bytes, max |ONNX - torch| {exp.max_abs_diff:.1e}"
                + ("" if top1 is None else f", top-1 {100 * top1:.2f}% on {_samples(test_data)} test images")
            )
            num_classes = int(exp.output_shape[1])
            report = prune_reports.get(name)
            pr = report.to_dict() if report is not None and hasattr(report, "to_dict") else report
            built[name] = _Built(
                {
                    "name": name,
                    "file": variant_file(name),
                    "sha256": _sha256(data),
                    "bytes": len(data),
                    "deflated_bytes": deflated_size(data),
                    "params": exp.params,
                    "macs": exp.macs,
                    "compression": float(compressions.get(name, 1.0)),
                    "recipe": recipes.get(name, "dense" if name == reference else "pruned"),
                    "reference": name == reference,
                    "accuracy": None
                    if top1 is None
                    else {
                        "top1": top1,
                        "top5": top5,
                        "samples": _samples(test_data),
                        "dataset": test_data.name if test_data else "",
                    },
                    "exactness": {
                        "onnx_vs_torch_max_abs_diff": exp.max_abs_diff,
                        "onnx_vs_torch_rel_diff": exp.rel_diff,
                        **({"prune_max_abs_diff": pr["max_abs_diff"], "prune_rel_diff": pr["rel_diff"]} if pr else {}),
                    },
                    "op_counts": exp.op_counts,
                },
                data,
                session,
                logits,
            )
        skeletons = _share_nested(built, facts.nested, np.asarray(example_inputs, np.float32), say)
        # a real image where there are some: a routed variant's time depends on the signature its input takes
        x1 = (
            np.ascontiguousarray(test_data.x[:1], np.float32)
            if test_data is not None and len(test_data.y)
            else np.random.default_rng(0).standard_normal((1, *example_inputs.shape[1:])).astype(np.float32)
        )
        feed = {INPUT_NAME: x1}
        dropped: list[dict] = []
        if int8 is not None:
            say(
                f"== INT8: {len(built)} variants, {len(int8.x)} calibration images ({int8.method}), format "
                f"{timing.quantization.format} (profile {timing.name})"
            )
            quantized, disagreeing = _int8_variants(dict(built), int8, timing, test_data, feed, say, routed)
            built.update(quantized)
            dropped += disagreeing
        say(
            f"== timing {len(built)} variants against each other under profile {timing.name} ({threads_used} "
            f"threads, {timing.benchmark.rounds} interleaved rounds)"
        )
        stats = time_interleaved_models({n: b.data for n, b in built.items()}, feed, timing, batch=1)
        cascade_logits = {}
        if settings.cascade is not None:
            say(f"== cascade: {len(built)} variants on {len(settings.cascade.y)} calibration images")
            cascade_logits = {n: onnx_logits(b.session, settings.cascade.x) for n, b in built.items()}
        machine = machine_label()
        elsewhere = cross_built(timing)
        for name, b in list(built.items()):
            q = b.entry.get("quantization")
            if q is None:
                continue
            if elsewhere:  # this machine's speed says nothing of the device's: the device's bench decides
                b.entry["device_timing"] = "pending"
                say(
                    f"   {name}: built for {timing.machine}, kept untimed: `edgeshift bench --save` on the device "
                    "keeps or drops it"
                )
                continue
            mine, source = _point(b, stats[name]), _point(built[q.source], stats[q.source])
            if not is_faster(mine, source):
                dropped.append(
                    {
                        "name": name,
                        "reason": "INT8 "
                        + not_faster_reason(mine, source)
                        + (f" under profile {timing.name} ({threads_used} threads)"),
                    }
                )
                del built[name]
        for name in sorted(facts.gated & set(built)):  # masks that skip no work here cost their heads: dropped
            mine, dense = _point(built[name], stats[name]), _point(built[reference], stats[reference])
            if name != reference and not is_faster(mine, dense):
                reason = not_faster_reason(mine, dense) + f" under profile {timing.name} ({threads_used} threads)"
                dropped.append({"name": name, "reason": ("routed " if name in routed else "gated ") + reason})
                del built[name]
        for name, b in built.items():
            b.session = None  # release before the memory probes
            latency = stats[name].to_dict()
            del latency["thread_pool"]  # how it was timed; not a manifest field (schema 2)
            b.entry["latency"] = {**latency, "threads": threads_used, "machine": machine, "profile": timing.name}
            peak = None
            if measure_memory:
                path = Path(tmp) / f"{name}.probe.onnx"
                path.write_bytes(b.data)
                peak = measure_session_memory(str(path), threads_used)["peak_growth"]
            b.entry["peak_memory_bytes"] = peak
    # a variant pending the device's own timing is neither beaten nor laddered on this machine's figures
    pending = [b.entry for b in built.values() if b.entry.get("device_timing") == "pending"]
    kept, beaten = postprocess([b.entry for b in built.values() if b.entry not in pending], tolerance)
    kept, beaten = _keep_bases(kept, beaten, built)
    dropped += beaten
    ladder = build_ladder([_point(built[e["name"]], stats[e["name"]]) for e in kept], timing.benchmark.ladder_min_gain)
    cascade = None
    if settings.cascade is not None:
        c = settings.cascade
        # every variant kept and timed here may be a step (not one pending the device's timing); the reference is
        # always kept
        names = [e["name"] for e in kept]
        outputs = {n: StepOutputs(cascade_logits[n], stats[n].p50_ms, built[n].logits) for n in names}
        try:
            cascade = calibrate(
                outputs,
                reference,
                c.y,
                max_loss=c.max_loss,
                max_early=c.max_early,
                test_labels=None if test_data is None else test_data.y,
                samples_name=c.name,
                profile=timing.name,
            )
            say(f"   {describe(cascade)}")
        except NoFasterStep as exc:  # a measurement, not a mistake: the portfolio is still worth writing
            say(f"   no cascade: {exc}")
    kept = sorted(kept + pending, key=lambda v: (v["bytes"], v["name"]))
    size = int(example_inputs.shape[-1])
    labels = list(labels) if labels else [str(i) for i in range(num_classes)]
    if len(labels) != num_classes:
        raise EdgeshiftError(f"{len(labels)} labels given for a model with {num_classes} classes")
    has_int8 = any(e.get("precision") == "int8" for e in kept)
    checks_record, checks_data = check_inputs_member(int8.x) if int8 is not None and has_int8 else (None, None)
    manifest = Manifest(
        schema_version=SCHEMA_VERSION,
        producer=f"edgeshift {edgeshift.__version__}",
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        architecture=facts.architecture or "",
        input=InputSpec(
            name=INPUT_NAME, shape=(None, *map(int, example_inputs.shape[1:])), dtype="float32", layout="NCHW"
        ),
        output=OutputSpec(name=OUTPUT_NAME, shape=(None, num_classes)),
        preprocessing=Preprocessing(
            mean=tuple(mean or list(CIFAR_MEAN[:channels]) + [0.5] * (channels - 3)),
            std=tuple(std or list(CIFAR_STD[:channels]) + [0.25] * (channels - 3)),
            layout="NCHW",
            scale=1 / 255,
            size=(int(example_inputs.shape[-2]), size),
        ),
        labels=tuple(labels),
        variants=tuple(_record(v) for v in kept),
        dropped=tuple(DroppedVariant(**d) for d in dropped),
        ladder=Ladder(
            steps=tuple(ladder),
            profile=timing.name,
            threads=threads_used,
            min_gain=timing.benchmark.ladder_min_gain,
            machine=machine,
        ),
        checks=checks_record,
        cascade=cascade,
    )
    members = {n: skeletons.get(n, b.data) for n, b in built.items()}
    return write_portfolio(out_path, manifest, members, checks=checks_data)


def _share_nested(
    built: dict[str, _Built], nested: Mapping[str, NestedSource], example: np.ndarray, say: Callable[[str], None]
) -> dict[str, bytes]:
    """Give each narrower width its nested form (``exporter.nesting``): its entry records the skeleton and the
    shared slices, its bytes become the assembled ONNX (what is timed and quantized: what the device runs).
    Returns the skeletons, what the portfolio stores for them."""
    skeletons = {}
    for name, source in nested.items():
        if name not in built or source.base not in built or source.base == name or source.base in nested:
            raise EdgeshiftError(
                f"nested variant {name!r} names base {source.base!r}, which is not another, whole variant here"
            )
        b = built[name]
        form = nested_form(b.data, built[source.base].data, example)
        skeletons[name] = form.skeleton
        b.data = form.assembled
        b.entry.update(
            sha256=_sha256(form.assembled),
            bytes=len(form.assembled),
            deflated_bytes=deflated_size(form.skeleton),
            nested=Nested(
                base=source.base,
                width=source.width,
                skeleton_sha256=_sha256(form.skeleton),
                skeleton_bytes=len(form.skeleton),
                shared=form.shared,
            ),
        )
        say(
            f"   {name}: nested on {source.base}: {len(form.shared)} weights ({form.shared_values:,} values) sliced "
            f"from it on the device, {len(form.skeleton):,} of {len(form.assembled):,} bytes stored"
        )
    return skeletons


def _keep_bases(kept: list[dict], dropped: list[dict], built: dict[str, _Built]) -> tuple[list[dict], list[dict]]:
    """A base whose narrower widths stay is kept too (they are built from its weights), whatever beat it."""
    needed = {e["nested"].base for e in kept if e.get("nested") is not None}
    back = [d for d in dropped if d["name"] in needed]
    if not back:
        return kept, dropped
    names = {d["name"] for d in back}
    kept = sorted(kept + [built[n].entry for n in names], key=lambda v: (v["bytes"], v["name"]))
    return kept, [d for d in dropped if d["name"] not in names]


def _record(entry: dict) -> VariantRecord:
    """The manifest's typed record of one profiled variant (an unknown key is a TypeError: writer and reader
    share this one definition)."""
    acc, lat = entry.get("accuracy"), entry.get("latency")
    return VariantRecord(
        **{
            **entry,
            "accuracy": Accuracy(**acc) if acc else None,
            "latency": Latency(**{**lat, "round_p50_ms": tuple(lat["round_p50_ms"])}) if lat else None,
        }
    )
