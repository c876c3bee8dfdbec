"""The portfolio manifest: one typed record, written by the exporter and read by the runtime. Torch-free.

A portfolio is a ZIP (DEFLATE) holding ``manifest.json`` and ``variants/<name>.onnx``. ``manifest.json`` is
``Manifest.to_dict()``; ``parse_manifest`` reads it back through the project's strict loader
(``edgeshift.core.config``), so a key the writer adds without adding it here, a missing key, or a value of the
wrong type is refused, and then checks what types cannot say (safe names, hashes, ranges, order). Untrusted input:
every failure is a ``PortfolioError`` naming the field.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any, Literal, Optional

from edgeshift.core.config import load
from edgeshift.core.errors import PortfolioError

SCHEMA_VERSION = 5  # 2: INT8 variants, the ladder, latency rounds and profile; 3: device_timing; 4: nested; 5: cascade
READABLE_SCHEMAS = (1, 2, 3, 4, 5)  # an older manifest is a newer one without the new optional fields
MANIFEST_NAME = "manifest.json"
CHECKS_NAME = "checks.npy"  # preprocessed inputs a device re-checks INT8 variants on (float32 [count, C, H, W])
MAX_CHECK_INPUTS = 16
VARIANT_DIR = "variants/"
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")  # \Z, not $: "$" also matches before a final newline
SHA_RE = re.compile(r"[0-9a-f]{64}\Z")
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
MAX_VARIANT_BYTES = 2 * 1024**3  # an ONNX protobuf cannot exceed 2 GiB
MAX_INPUT_VALUES = 1 << 24  # one input item (C x H x W): 3 x 2364 x 2364; every warm-up allocates a batch of them
MAX_IMAGE_SIDE = 8192  # preprocessing.size: what every image is resized to
MAX_LABELS, MAX_TEXT = 100_000, 1024  # classes; characters in a label, name or reason

Shape = tuple[Optional[int], ...]  # batch first, None = dynamic


@dataclass(frozen=True, kw_only=True)
class InputSpec:
    name: str
    shape: Shape
    dtype: Literal["float32"] = "float32"
    layout: str = "NCHW"


@dataclass(frozen=True, kw_only=True)
class OutputSpec:
    name: str
    shape: Shape


@dataclass(frozen=True, kw_only=True)
class Preprocessing:
    mean: tuple[float, ...]  # per channel, after scaling
    std: tuple[float, ...]
    layout: str = "NCHW"
    scale: float = 1 / 255  # applied to raw pixel values first
    size: tuple[int, ...] = ()  # (height, width) images are resized to


@dataclass(frozen=True, kw_only=True)
class Accuracy:
    top1: float
    top5: Optional[float] = None
    samples: int = 0
    dataset: str = ""


@dataclass(frozen=True, kw_only=True)
class Latency:
    """Measured at build time: batch-1 percentiles, warm-up excluded, on ``machine`` with ``threads`` threads."""

    p50_ms: float
    p95_ms: float
    p99_ms: float
    throughput: Optional[float] = None
    batch: int = 1
    calls: int = 0
    threads: int = 1
    machine: str = ""
    profile: str = ""  # the device profile the variant was timed under
    round_p50_ms: tuple[float, ...] = ()  # medians of the interleaved timing rounds


@dataclass(frozen=True, kw_only=True)
class Quantization:
    """How an INT8 variant was made (``onnxruntime.quantization``, static or dynamic) and how far it is from its
    source."""

    source: str  # the FP32 variant it was quantized from
    format: Literal["qoperator", "qdq", "dynamic"]
    activations: Literal["uint8", "int8"]
    weights: Literal["int8"] = "int8"
    per_channel: bool = True
    reduce_range: bool = False
    calibration_samples: int
    calibration_method: str
    calibration_dataset: str = ""
    agreement_top1: Optional[float] = None  # share of the test images whose top-1 matches the source's
    max_logit_deviation: Optional[float] = None  # largest |logit - source logit| on the test images
    test_samples: int = 0
    candidates_p50_ms: Optional[dict[str, float]] = None  # format auto: each candidate's p50, timed interleaved


@dataclass(frozen=True, kw_only=True)
class SharedWeight:
    """One weight a nested variant takes from its base: the base's initializer of the same name, sliced."""

    name: str
    ranges: tuple[tuple[tuple[int, int], ...], ...]  # per dimension: the [start, stop) runs kept, ascending
    # per kept output channel (the first dimension): a factor the slice is multiplied by (float32), where the width
    # has batch norms of its own (fused into the weight); None: the slice as it is
    scale: Optional[tuple[float, ...]] = None


@dataclass(frozen=True, kw_only=True)
class Nested:
    """A narrower width of a nested network, built on the device from its base variant's weights
    (``edgeshift.runtime.nested``): the member ``file`` holds its skeleton (the ONNX model without the shared
    weights' data); ``sha256`` and ``bytes`` of the record are those of the ONNX bytes assembled from it."""

    base: str  # the variant whose weights it slices: stored whole, FP32
    width: float  # the fraction of every nested channel group it keeps
    skeleton_sha256: str
    skeleton_bytes: int
    shared: tuple[SharedWeight, ...]


@dataclass(frozen=True, kw_only=True)
class VariantRecord:
    name: str  # [A-Za-z0-9._-], at most 64
    file: str  # variants/<name>.onnx
    sha256: str
    bytes: int  # ONNX bytes, inflated
    deflated_bytes: Optional[int] = None
    params: int
    macs: int
    compression: float
    recipe: str = ""
    reference: bool  # the dense model, always kept
    accuracy: Optional[Accuracy] = None
    latency: Optional[Latency] = None
    peak_memory_bytes: Optional[int] = None  # RSS growth of a fresh process creating and running the session
    exactness: Optional[dict[str, Optional[float]]] = None  # deviations: ONNX vs torch, pruned vs unpruned
    op_counts: Optional[dict[str, int]] = None
    precision: Literal["fp32", "int8"] = "fp32"
    quantization: Optional[Quantization] = None  # INT8 variants only
    # "pending": built on another CPU than the device's (an ARM profile on x86), so untimed for it; the runtime
    # leaves it alone until `edgeshift bench --save` on the device keeps it (faster than its source, agreeing)
    device_timing: Optional[Literal["pending"]] = None
    nested: Optional[Nested] = None  # schema 4: a narrower width built from its base's weights


@dataclass(frozen=True, kw_only=True)
class DroppedVariant:
    name: str
    reason: str


@dataclass(frozen=True, kw_only=True)
class Ladder:
    """What the policies step along (``edgeshift.runtime.ladder``), as measured at build time."""

    steps: tuple[str, ...]  # variant names, fastest first
    profile: str  # the device profile the steps were timed under
    threads: int
    min_gain: float  # each step down is at least this much faster (relative p50), faster in every interleaved round
    machine: str = ""


@dataclass(frozen=True, kw_only=True)
class CheckInputs:
    """A few preprocessed inputs (calibration images) shipped in ``checks.npy``: on the device, ``bench`` runs every
    INT8 variant and its FP32 source on them and refuses one whose top-1 agrees less than the profile's floor (a CPU
    whose INT8 kernels compute differently)."""

    file: str  # checks.npy
    sha256: str
    bytes: int
    count: int


@dataclass(frozen=True, kw_only=True)
class CascadePoint:
    """One operating point of a confidence cascade: where each input leaves, and what that gave on the images it
    was calibrated on (and, where the portfolio has them, on its test images)."""

    # per step but the last: an input leaves at step k when its top-1 softmax probability exceeds thresholds[k]
    thresholds: tuple[float, ...]
    top1: float  # the cascade's top-1 on the calibration images
    exit_shares: tuple[float, ...]  # per step: the share of the calibration images answered there
    test_top1: Optional[float] = None  # the same on the test images the variants' accuracy is measured on
    test_exit_shares: tuple[float, ...] = ()


@dataclass(frozen=True, kw_only=True)
class Cascade:
    """A confidence cascade over some of the portfolio's variants (``edgeshift.runtime.cascade``): the fastest step
    runs first and an input goes on to the next only while its top-1 probability is at or under that step's
    threshold; the last step answers the rest. ``points[0]`` is the calibrated one (its top-1 loss against the last
    step bounded by ``max_loss`` at 95% on the calibration images); the others lose more for less time, for the
    runtime to pick from under a latency target."""

    steps: tuple[str, ...]  # variant names, fastest first; the last is the reference the loss is measured against
    points: tuple[CascadePoint, ...]  # most accurate first
    max_loss: float  # top-1 (a fraction) the calibrated point may lose against the last step
    reference_top1: float  # the last step's top-1 on the calibration images
    samples: int  # calibration images: never those the test figures come from
    dataset: str = ""
    profile: str = ""  # the device profile the steps' costs were timed under


MAX_CASCADE_STEPS, MAX_CASCADE_POINTS = 8, 16


@dataclass(frozen=True, kw_only=True)
class Manifest:
    schema_version: int
    producer: str = ""
    created: str = ""  # ISO 8601
    architecture: str = ""
    input: InputSpec
    output: OutputSpec
    preprocessing: Preprocessing
    labels: tuple[str, ...]  # one per output class
    variants: tuple[VariantRecord, ...]  # sorted by bytes, ascending
    dropped: tuple[DroppedVariant, ...] = ()  # what the post-processor removed, and why
    ladder: Optional[Ladder] = None  # absent in version-1 manifests: the runtime builds one from the latencies
    checks: Optional[CheckInputs] = None  # schema 3, with INT8 variants
    cascade: Optional[Cascade] = None  # schema 5: calibrated at export (--cascade)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


MAX_SHARED_RUNS = 1 << 20  # [start, stop) runs over all of a portfolio's shared weights


def member_bytes(v: VariantRecord) -> int:
    """What the variant's member in the ZIP inflates to: its skeleton for a nested variant, else its ONNX."""
    return v.nested.skeleton_bytes if v.nested is not None else v.bytes


def variant_file(name: str) -> str:
    return f"{VARIANT_DIR}{name}.onnx"


def _check_shape(shape: Shape, where: str) -> None:
    if not shape or len(shape) > 8:
        raise PortfolioError(f"manifest: {where} must be a list of 1..8 dimensions")
    for d in shape:
        if d is not None and not 0 < d <= 1 << 20:
            raise PortfolioError(f"manifest: {where} has a bad dimension {d!r} (positive int or null)")


def _check_input(m: Manifest) -> None:
    """An image batch: [N, C, H, W], the batch dimension alone dynamic, what preprocessing needs matching it."""
    shape, pre = m.input.shape, m.preprocessing
    if len(shape) != 4 or any(d is None for d in shape[1:]):
        raise PortfolioError(
            f"manifest: input.shape must be [N, C, H, W] with C, H and W fixed numbers, got {list(shape)}"
        )
    channels, height, width = (int(d) for d in shape[1:])  # type: ignore[arg-type]
    if channels * height * width > MAX_INPUT_VALUES:
        raise PortfolioError(f"manifest: input.shape {list(shape)} holds more than {MAX_INPUT_VALUES} values an item")
    for key in ("mean", "std"):
        if len(getattr(pre, key)) != channels:
            raise PortfolioError(f"manifest: preprocessing.{key} must be {channels} numbers (one per channel)")
    if any(v == 0 for v in pre.std):
        raise PortfolioError("manifest: preprocessing.std must not contain 0")
    if list(pre.size) != [height, width]:
        raise PortfolioError(
            f"manifest: preprocessing.size must be the input's [height, width] = [{height}, {width}], got "
            f"{list(pre.size)[:4]}"
        )
    if not 0 < pre.scale <= 1:
        raise PortfolioError("manifest: preprocessing.scale must be in (0, 1]")


def _check_texts(m: Manifest) -> None:
    if not 0 < len(m.labels) <= MAX_LABELS:
        raise PortfolioError(f"manifest: labels must be 1..{MAX_LABELS} names")
    texts = [m.architecture, m.producer, m.created, m.input.name, m.output.name, *m.labels]
    texts += [d.name for d in m.dropped] + [d.reason for d in m.dropped] + [v.recipe for v in m.variants]
    if any(len(t) > MAX_TEXT for t in texts) or len(m.dropped) > MAX_LABELS:
        raise PortfolioError(f"manifest: a name, label or reason is longer than {MAX_TEXT} characters")


def parse_manifest(document: Any, max_variants: int = 1024) -> Manifest:
    """The typed manifest from a parsed ``manifest.json``; raise PortfolioError naming the first bad field.
    ``max_variants``: the most variants a portfolio may hold here (the device profile's limits)."""
    if isinstance(document, dict) and document.get("schema_version", 1) not in READABLE_SCHEMAS:
        raise PortfolioError(
            f"manifest: schema_version {document['schema_version']!r} is not supported (this runtime reads "
            f"{', '.join(map(str, READABLE_SCHEMAS))}); rebuild the portfolio or upgrade edgeshift"
        )
    m = load(Manifest, document, source="manifest", error=PortfolioError)
    _check_shape(m.input.shape, "input.shape")
    _check_shape(m.output.shape, "output.shape")
    _check_input(m)
    _check_texts(m)
    if not m.variants:
        raise PortfolioError("manifest: the portfolio has no variants")
    if len(m.variants) > max_variants:
        raise PortfolioError(
            f"manifest: {len(m.variants)} variants, more than the {max_variants} the profile allows "
            "(limits.max_variants)"
        )
    seen = set()
    for i, v in enumerate(m.variants):
        where = f"variants[{i}]"
        if not NAME_RE.match(v.name):
            raise PortfolioError(f"manifest: {where}.name {v.name!r} is not a safe name ([A-Za-z0-9._-], <= 64)")
        if v.name in seen:
            raise PortfolioError(f"manifest: variant name {v.name!r} appears twice")
        seen.add(v.name)
        if v.file != variant_file(v.name):
            raise PortfolioError(f"manifest: {where}.file must be {variant_file(v.name)!r}, got {v.file!r}")
        if not SHA_RE.match(v.sha256):
            raise PortfolioError(f"manifest: {where}.sha256 must be 64 lowercase hex digits")
        if not 0 < v.bytes <= MAX_VARIANT_BYTES:
            raise PortfolioError(f"manifest: {where}.bytes {v.bytes} out of range")
        if v.params < 0 or v.macs < 0:
            raise PortfolioError(f"manifest: {where}.params and .macs must be >= 0")
        if v.accuracy is not None:
            for key in ("top1", "top5"):
                val = getattr(v.accuracy, key)
                if val is not None and not 0 <= val <= 1:
                    raise PortfolioError(f"manifest: {where}.accuracy.{key} must be in [0, 1]")
        lat = v.latency
        if lat is not None and min(lat.p50_ms, lat.p95_ms, lat.p99_ms, *lat.round_p50_ms) < 0:
            raise PortfolioError(f"manifest: {where}.latency percentiles must be >= 0")
        if (v.precision == "int8") != (v.quantization is not None):
            raise PortfolioError(f"manifest: {where}: an int8 variant, and only one, has a quantization record")
        if v.quantization is not None and not NAME_RE.match(v.quantization.source):
            raise PortfolioError(f"manifest: {where}.quantization.source is not a safe name")
        if v.device_timing is not None and v.quantization is None:
            raise PortfolioError(f"manifest: {where}: only an INT8 variant can wait for the device's timing")
    _check_nested(m)
    if m.checks is not None:
        c = m.checks
        item = 1
        for d in m.input.shape[1:]:
            item *= int(d or 0)
        if c.file != CHECKS_NAME or not SHA_RE.match(c.sha256) or not 0 < c.count <= MAX_CHECK_INPUTS:
            raise PortfolioError(f"manifest: checks must name {CHECKS_NAME}, a sha256 and 1..{MAX_CHECK_INPUTS} inputs")
        if c.bytes != 128 + 4 * c.count * item:
            raise PortfolioError(
                f"manifest: checks.bytes {c.bytes} is not {c.count} float32 inputs of the input's shape"
            )
    sizes = [v.bytes for v in m.variants]
    if sizes != sorted(sizes):
        raise PortfolioError("manifest: variants must be sorted by bytes, ascending")
    if m.ladder is not None:
        steps = m.ladder.steps
        if not steps or len(set(steps)) != len(steps) or not set(steps) <= seen:
            raise PortfolioError("manifest: ladder.steps must name distinct variants of the portfolio")
        if set(steps) & {v.name for v in m.variants if v.device_timing == "pending"}:
            raise PortfolioError("manifest: ladder.steps name a variant still waiting for the device's timing")
        if not 0 <= m.ladder.min_gain < 1:
            raise PortfolioError("manifest: ladder.min_gain must be in [0, 1)")
    if m.cascade is not None:
        _check_cascade(m.cascade, m)
    return m


def _fraction(value: float) -> bool:
    return math.isfinite(value) and 0 <= value <= 1


def _check_cascade(c: Cascade, m: Manifest) -> None:
    """Distinct, servable steps; per point a threshold in [0, 1] per step but the last and exit shares that add up
    to one."""
    pending = {v.name for v in m.variants if v.device_timing == "pending"}
    names = {v.name for v in m.variants}
    if not 2 <= len(c.steps) <= MAX_CASCADE_STEPS or len(set(c.steps)) != len(c.steps):
        raise PortfolioError(f"manifest: cascade.steps must name 2..{MAX_CASCADE_STEPS} distinct variants")
    if not set(c.steps) <= names or set(c.steps) & pending:
        raise PortfolioError("manifest: cascade.steps must name variants of the portfolio the device may run")
    if not 1 <= len(c.points) <= MAX_CASCADE_POINTS:
        raise PortfolioError(f"manifest: cascade.points must hold 1..{MAX_CASCADE_POINTS} operating points")
    if not (_fraction(c.max_loss) and _fraction(c.reference_top1)) or c.samples < 1:
        raise PortfolioError("manifest: cascade.max_loss and reference_top1 must be in [0, 1], samples >= 1")
    for i, p in enumerate(c.points):
        where = f"cascade.points[{i}]"
        if len(p.thresholds) != len(c.steps) - 1 or not all(_fraction(t) for t in p.thresholds):
            raise PortfolioError(f"manifest: {where}.thresholds must be {len(c.steps) - 1} numbers in [0, 1]")
        for key, shares in (("exit_shares", p.exit_shares), ("test_exit_shares", p.test_exit_shares)):
            if key == "test_exit_shares" and not shares:
                continue
            if len(shares) != len(c.steps) or not all(_fraction(s) for s in shares) or abs(sum(shares) - 1) > 1e-6:
                raise PortfolioError(f"manifest: {where}.{key} must be one share per step in [0, 1], adding up to 1")
        if not _fraction(p.top1) or (p.test_top1 is not None and not _fraction(p.test_top1)):
            raise PortfolioError(f"manifest: {where}: top-1 figures must be in [0, 1]")


def _check_nested(m: Manifest) -> None:
    """A nested variant names a whole FP32 variant of the portfolio as its base, a width, a skeleton no larger than
    what it assembles to, and distinct shared weights with runs that are ordered and bounded."""
    by_name = {v.name: v for v in m.variants}
    runs = 0
    for i, v in enumerate(m.variants):
        n = v.nested
        if n is None:
            continue
        where = f"variants[{i}].nested"
        base = by_name.get(n.base)
        if base is None or base.nested is not None or base.precision != "fp32" or n.base == v.name:
            raise PortfolioError(f"manifest: {where}.base must name another whole FP32 variant of the portfolio")
        if v.precision != "fp32":
            raise PortfolioError(f"manifest: {where}: only an FP32 variant is nested")
        if not 0 < n.width <= 1:
            raise PortfolioError(f"manifest: {where}.width must be in (0, 1]")
        if not SHA_RE.match(n.skeleton_sha256) or not 0 < n.skeleton_bytes <= v.bytes:
            raise PortfolioError(f"manifest: {where} needs a sha256 and a size within the variant's bytes")
        names = [w.name for w in n.shared]
        if len(set(names)) != len(names) or any(not 0 < len(w) <= MAX_TEXT for w in names):
            raise PortfolioError(f"manifest: {where}.shared must name distinct weights")
        for w in n.shared:
            if len(w.ranges) > 8:
                raise PortfolioError(f"manifest: {where}.shared {w.name!r}: more than 8 dimensions")
            if w.scale is not None:
                kept = sum(stop - start for start, stop in w.ranges[0]) if w.ranges else 0
                if len(w.scale) != kept or not all(math.isfinite(f) for f in w.scale):
                    raise PortfolioError(
                        f"manifest: {where}.shared {w.name!r}: scale needs one finite number per kept row"
                    )
            for dim in w.ranges:
                runs += len(dim)
                previous = 0
                for start, stop in dim:
                    if not previous <= start < stop:
                        raise PortfolioError(f"manifest: {where}.shared {w.name!r}: runs must be ordered and non-empty")
                    previous = stop
        if runs > MAX_SHARED_RUNS:
            raise PortfolioError(f"manifest: more than {MAX_SHARED_RUNS:,} shared-weight runs")
