"""The portfolio: export every variant, profile it, drop what another variant beats, pack one DEFLATE ZIP."""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from edgeshift.pruner.data import CIFAR_MEAN, CIFAR_STD
from edgeshift.core.atomic import atomic_path, check_output_path
from edgeshift.core.errors import EdgeshiftError
from edgeshift.runtime.manifest import (
    MANIFEST_NAME,
    NAME_RE,
    SCHEMA_VERSION,
    Accuracy,
    DroppedVariant,
    InputSpec,
    Latency,
    Manifest,
    OutputSpec,
    Preprocessing,
    VariantRecord,
    parse_manifest,
    variant_file,
)

from .profile import DEFLATE_LEVEL, TestData, deflated_size, profile_variant



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
    return (abs(acc_a - acc_b) <= tol.accuracy and rel(a["latency"]["p50_ms"], b["latency"]["p50_ms"]) <= tol.latency
            and rel(a["bytes"], b["bytes"]) <= tol.size)


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


def write_portfolio(out_path: str | os.PathLike, manifest: Manifest, onnx: dict[str, bytes],
                    min_saving: float = MIN_DEFLATE_SAVING) -> Path:
    """Pack ``manifest.json`` and ``variants/<name>.onnx`` into one standard ZIP, atomically.

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
    return out_path


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def build_portfolio(variants: dict, example_inputs, out_path: str | os.PathLike, *, labels: list[str] | None = None,
                    test_data: TestData | None = None, prune_reports: dict | None = None,
                    compressions: dict[str, float] | None = None, recipes: dict[str, str] | None = None,
                    reference: str | None = None, mean: list[float] | None = None, std: list[float] | None = None,
                    architecture: str | None = None, threads: int = 1, latency_iterations: int = 100,
                    measure_memory: bool = True, tolerance: Tolerance = Tolerance(), force: bool = False) -> Path:
    """Export, profile, post-process and pack ``variants`` (name -> nn.Module) into one portfolio file.

    ``reference`` names the dense variant that is always kept (default: the one with the most parameters).
    Nothing is written at ``out_path`` unless every step succeeds.
    """
    from edgeshift.pruner.metrics import count_params

    from .onnx_export import INPUT_NAME, OUTPUT_NAME, export_onnx

    out_path = check_output_path(out_path, force)
    if not variants:
        raise EdgeshiftError("no variants to pack")
    for name in variants:
        if not NAME_RE.match(name):
            raise EdgeshiftError(f"variant name {name!r} is not safe; use letters, digits, '.', '_', '-'")
    prune_reports = prune_reports or {}
    reference = reference or max(variants, key=lambda n: count_params(variants[n]))
    channels = int(example_inputs.shape[1])
    entries, blobs = [], {}
    num_classes = None
    with tempfile.TemporaryDirectory(prefix="edgeshift-export-") as tmp:
        for name, model in variants.items():
            path = Path(tmp) / f"{name}.onnx"
            exp = export_onnx(model, example_inputs, path)
            data = path.read_bytes()
            prof = profile_variant(data, params=exp.params, macs=exp.macs, test_data=test_data,
                                   input_shape=tuple(example_inputs.shape), threads=threads,
                                   iterations=latency_iterations, memory_path=str(path) if measure_memory else None)
            num_classes = int(exp.output_shape[1])
            pr = prune_reports.get(name)
            pr = pr.to_dict() if hasattr(pr, "to_dict") else pr
            entries.append({
                "name": name, "file": variant_file(name), "sha256": _sha256(data), "bytes": len(data),
                "deflated_bytes": prof.deflated_bytes, "params": exp.params, "macs": exp.macs,
                "compression": float((compressions or {}).get(name, 1.0)),
                "recipe": (recipes or {}).get(name, "dense" if name == reference else "pruned"),
                "reference": name == reference,
                "accuracy": None if prof.top1 is None else {"top1": prof.top1, "top5": prof.top5,
                                                            "samples": prof.samples, "dataset": test_data.name},
                "latency": {**prof.latency.to_dict(), "threads": threads, "machine": prof.machine},
                "peak_memory_bytes": prof.peak_memory_bytes,
                "exactness": {"onnx_vs_torch_max_abs_diff": exp.max_abs_diff, "onnx_vs_torch_rel_diff": exp.rel_diff,
                              **({"prune_max_abs_diff": pr["max_abs_diff"], "prune_rel_diff": pr["rel_diff"]}
                                 if pr else {})},
                "op_counts": exp.op_counts,
            })
            blobs[name] = data
    kept, dropped = postprocess(entries, tolerance)
    size = int(example_inputs.shape[-1])
    labels = list(labels) if labels else [str(i) for i in range(num_classes)]
    if len(labels) != num_classes:
        raise EdgeshiftError(f"{len(labels)} labels given for a model with {num_classes} classes")
    manifest = Manifest(
        schema_version=SCHEMA_VERSION,
        producer="edgeshift 0.1.0",
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        architecture=architecture or "",
        input=InputSpec(name=INPUT_NAME, shape=(None, *map(int, example_inputs.shape[1:])), dtype="float32",
                        layout="NCHW"),
        output=OutputSpec(name=OUTPUT_NAME, shape=(None, num_classes)),
        preprocessing=Preprocessing(mean=tuple(mean or list(CIFAR_MEAN[:channels]) + [0.5] * (channels - 3)),
                                    std=tuple(std or list(CIFAR_STD[:channels]) + [0.25] * (channels - 3)),
                                    layout="NCHW", scale=1 / 255, size=(int(example_inputs.shape[-2]), size)),
        labels=tuple(labels),
        variants=tuple(_record(v) for v in kept),
        dropped=tuple(DroppedVariant(**d) for d in dropped),
    )
    return write_portfolio(out_path, manifest, blobs)


def _record(entry: dict) -> VariantRecord:
    """The manifest's typed record of one profiled variant (an unknown key is a TypeError: writer and reader
    share this one definition)."""
    acc, lat = entry.get("accuracy"), entry.get("latency")
    return VariantRecord(**{**entry, "accuracy": Accuracy(**acc) if acc else None,
                            "latency": Latency(**lat) if lat else None})
