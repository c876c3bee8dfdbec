"""A nested variant's stored form: its ONNX model less every weight its base already holds.

With nested widths ("Self-adaptive neural network for edge devices", sec. 4.2) a narrower level's weights are the
leading slices of the wider level's in every channel group. Conv-BN fusion scales each output channel by its batch
norm, and each level has norms of its own (statistics from its own fine-tune; with joint training, Slimmable
Networks sec. 3.2, affine parameters too): so a fused weight is the slice with each output channel scaled by the
ratio of the two levels' norms, or, where they agree, the slice itself bit for bit. Each initializer of the
narrower export found so in the base export's initializer of the same name is *shared*: the stored skeleton keeps
its name, type and dimensions, drops its data, and records the ranges and the per-channel ratio (one float32 per
channel; none for a plain slice); the device builds it with the same float32 product (within float rounding of
the level's own export, checked on its outputs). Everything else (a weight a level tuned on its own, a fused bias)
stays in the skeleton. The device splices the two back with
``edgeshift.runtime.nested.assemble``, the function used here, so the bytes hashed here are the bytes it builds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from edgeshift.core.errors import EdgeshiftError
from edgeshift.runtime.manifest import SharedWeight
from edgeshift.runtime.nested import assemble

from .onnx_export import DEFAULT_RTOL as EXPORT_RTOL
from .onnx_export import _ort_outputs

SCALE_RTOL = 1e-6  # a weight is a scaled slice when scaling the slice reproduces it this closely (float rounding)


@dataclass(frozen=True)
class NestedForm:
    """What a nested variant ships (``skeleton``), what it assembles to on the device (``assembled``), and how."""

    skeleton: bytes
    assembled: bytes
    shared: tuple[SharedWeight, ...]
    shared_values: int  # elements taken from the base


def nested_form(narrow: bytes, base: bytes, example: np.ndarray) -> NestedForm:
    """Split ``narrow`` (a narrower level's ONNX) into a skeleton and the slices of ``base`` it shares; check that
    what the device will assemble computes exactly what ``narrow`` does on ``example``."""
    model = onnx.load_from_string(narrow)
    base_weights = {
        t.name: numpy_helper.to_array(t)
        for t in onnx.load_from_string(base).graph.initializer
        if t.data_type == onnx.TensorProto.FLOAT
    }
    shared, values = [], 0
    for tensor in model.graph.initializer:
        full = base_weights.get(tensor.name)
        if tensor.data_type != onnx.TensorProto.FLOAT or full is None or not tensor.dims:
            continue
        mine = numpy_helper.to_array(tensor).astype("<f4")
        if mine.ndim != full.ndim or any(s > f for s, f in zip(mine.shape, full.shape)):
            continue
        leading = np.ascontiguousarray(full[tuple(slice(0, s) for s in mine.shape)], "<f4")
        scale = None
        if leading.tobytes() != mine.tobytes():
            scale = _row_scale(leading, mine)
            if scale is None or mine.ndim < 2:  # a bias is as small as its scale would be: kept whole
                continue
        for key in ("raw_data", "float_data"):
            tensor.ClearField(key)
        ranges = tuple(((0, int(s)),) for s in mine.shape)
        shared.append(SharedWeight(name=tensor.name, ranges=ranges, scale=scale))
        values += mine.size
    skeleton = model.SerializeToString()
    parts = [(w.name, w.ranges, w.scale) for w in shared]
    assembled = assemble(skeleton, base, parts, len(narrow) + 64 * len(shared) + 64)
    got, want = (_ort_outputs(b, [example])[0] for b in (assembled, narrow))
    deviation = float(np.abs(got.astype(np.float64) - want).max())
    scaled = any(w.scale is not None for w in shared)
    if (got.tobytes() != want.tobytes()) if not scaled else deviation > EXPORT_RTOL * float(np.abs(want).max()):
        raise EdgeshiftError(
            f"a nested variant assembled from its base computes other outputs than its own export (max deviation "
            f"{deviation:.3g}); this is a bug: please report it"
        )
    return NestedForm(skeleton, assembled, tuple(shared), values)


def _row_scale(leading: np.ndarray, mine: np.ndarray) -> tuple[float, ...] | None:
    """The float32 factor per row (first dimension) that makes ``leading`` into ``mine`` to within float rounding,
    as the device computes it; None when no such factor does."""
    rows_l = leading.reshape(len(leading), -1).astype(np.float64)
    rows_m = mine.reshape(len(mine), -1).astype(np.float64)
    norm = (rows_l * rows_l).sum(1)
    if (norm == 0).any():
        return None
    factor = ((rows_l * rows_m).sum(1) / norm).astype(np.float32)
    made = leading * factor.reshape(-1, *[1] * (leading.ndim - 1))
    if np.abs(made.astype(np.float64) - mine).max() > SCALE_RTOL * max(float(np.abs(mine).max()), 1e-30):
        return None
    return tuple(float(f) for f in factor)
