"""The portfolio manifest: its schema, and validation of untrusted manifests. Torch-free.

A portfolio is a ZIP (DEFLATE) holding ``manifest.json`` and ``variants/<name>.onnx``. The manifest:

    schema_version  int, == SCHEMA_VERSION
    producer        str
    created         str (ISO 8601)
    architecture    str
    input           {name: str, shape: [null|int, ...] (batch first, null = dynamic), dtype: "float32",
                     layout: "NCHW"}
    output          {name: str, shape: [null|int, ...]}
    preprocessing   {mean: [float], std: [float], layout: "NCHW", scale: float, size: [int, int]}
    labels          [str] (one per output class)
    variants        [variant, ...] sorted by bytes, ascending
    dropped         [{name, reason}] variants the post-processor removed

    variant: name (str, [A-Za-z0-9._-]), file ("variants/<name>.onnx"), sha256 (hex), bytes (int),
             params (int), macs (int), compression (float), recipe (str), reference (bool),
             accuracy ({top1, top5, samples, dataset} or null),
             latency ({p50_ms, p95_ms, p99_ms, throughput, batch, threads, machine} or null),
             exactness ({max_abs_diff, rel_diff, stage} or null)
"""

from __future__ import annotations

import re
from typing import Any

from edgeshift.core.errors import PortfolioError

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
VARIANT_DIR = "variants/"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
SHA_RE = re.compile(r"^[0-9a-f]{64}$")
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
MAX_VARIANT_BYTES = 2 * 1024**3  # an ONNX protobuf cannot exceed 2 GiB
DTYPES = ("float32",)


def variant_file(name: str) -> str:
    return f"{VARIANT_DIR}{name}.onnx"


def _need(obj: dict, key: str, kinds, where: str, allow_none: bool = False):
    if key not in obj:
        raise PortfolioError(f"manifest: {where} lacks {key!r}")
    value = obj[key]
    if value is None and allow_none:
        return None
    if isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)):
        raise PortfolioError(f"manifest: {where}.{key} must be {_kind_name(kinds)}, got a boolean")
    if not isinstance(value, kinds):
        raise PortfolioError(f"manifest: {where}.{key} must be {_kind_name(kinds)}, got {type(value).__name__}")
    return value


def _kind_name(kinds) -> str:
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    return " or ".join(k.__name__ for k in kinds)


def _shape(value, where: str) -> list:
    if not isinstance(value, list) or not value or len(value) > 8:
        raise PortfolioError(f"manifest: {where} must be a list of 1..8 dimensions")
    for d in value:
        if d is not None and (isinstance(d, bool) or not isinstance(d, int) or d <= 0 or d > 1 << 20):
            raise PortfolioError(f"manifest: {where} has a bad dimension {d!r} (positive int or null)")
    return value


def validate_manifest(m: Any) -> dict:
    """Check every field a device relies on; raise PortfolioError naming the first bad one."""
    if not isinstance(m, dict):
        raise PortfolioError("manifest: top level must be a JSON object")
    version = _need(m, "schema_version", int, "manifest")
    if version != SCHEMA_VERSION:
        raise PortfolioError(
            f"manifest: schema_version {version} is not supported (this runtime reads "
            f"{SCHEMA_VERSION}); rebuild the portfolio or upgrade edgeshift"
        )
    inp = _need(m, "input", dict, "manifest")
    _need(inp, "name", str, "input")
    _shape(_need(inp, "shape", list, "input"), "input.shape")
    if _need(inp, "dtype", str, "input") not in DTYPES:
        raise PortfolioError(f"manifest: input.dtype {inp['dtype']!r} unsupported; known: {', '.join(DTYPES)}")
    out = _need(m, "output", dict, "manifest")
    _need(out, "name", str, "output")
    _shape(_need(out, "shape", list, "output"), "output.shape")
    pre = _need(m, "preprocessing", dict, "manifest")
    channels = inp["shape"][1] if len(inp["shape"]) > 1 else None
    for key in ("mean", "std"):
        vals = _need(pre, key, list, "preprocessing")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals) or (
            channels and len(vals) != channels
        ):
            raise PortfolioError(f"manifest: preprocessing.{key} must be {channels} numbers")
    if any(v == 0 for v in pre["std"]):
        raise PortfolioError("manifest: preprocessing.std must not contain 0")
    labels = _need(m, "labels", list, "manifest")
    if not all(isinstance(x, str) for x in labels):
        raise PortfolioError("manifest: labels must be strings")
    variants = _need(m, "variants", list, "manifest")
    if not variants:
        raise PortfolioError("manifest: the portfolio has no variants")
    seen = set()
    for i, v in enumerate(variants):
        where = f"variants[{i}]"
        if not isinstance(v, dict):
            raise PortfolioError(f"manifest: {where} must be an object")
        name = _need(v, "name", str, where)
        if not NAME_RE.match(name):
            raise PortfolioError(f"manifest: {where}.name {name!r} is not a safe name ([A-Za-z0-9._-], <= 64)")
        if name in seen:
            raise PortfolioError(f"manifest: variant name {name!r} appears twice")
        seen.add(name)
        if _need(v, "file", str, where) != variant_file(name):
            raise PortfolioError(f"manifest: {where}.file must be {variant_file(name)!r}, got {v['file']!r}")
        if not SHA_RE.match(_need(v, "sha256", str, where)):
            raise PortfolioError(f"manifest: {where}.sha256 must be 64 lowercase hex digits")
        size = _need(v, "bytes", int, where)
        if not 0 < size <= MAX_VARIANT_BYTES:
            raise PortfolioError(f"manifest: {where}.bytes {size} out of range")
        for key in ("params", "macs"):
            if _need(v, key, int, where) < 0:
                raise PortfolioError(f"manifest: {where}.{key} must be >= 0")
        _need(v, "compression", (int, float), where)
        _need(v, "reference", bool, where)
        acc = _need(v, "accuracy", dict, where, allow_none=True)
        if acc is not None:
            for key in ("top1", "top5"):
                val = _need(acc, key, (int, float), f"{where}.accuracy")
                if not 0 <= val <= 1:
                    raise PortfolioError(f"manifest: {where}.accuracy.{key} must be in [0, 1]")
        lat = _need(v, "latency", dict, where, allow_none=True)
        if lat is not None:
            for key in ("p50_ms", "p95_ms", "p99_ms"):
                if _need(lat, key, (int, float), f"{where}.latency") < 0:
                    raise PortfolioError(f"manifest: {where}.latency.{key} must be >= 0")
    sizes = [v["bytes"] for v in variants]
    if sizes != sorted(sizes):
        raise PortfolioError("manifest: variants must be sorted by bytes, ascending")
    return m
