"""A nested variant's stored form: its ONNX model less every weight its base already holds.

With nested widths ("Self-adaptive neural network for edge devices", sec. 4.2) a narrower level's weights are the
leading slices of the wider level's in every channel group, and conv-BN fusion keeps them so (it scales each output
channel by its own batch-norm statistics, which the levels share). So each initializer of the narrower export that
equals the leading slice of the base export's initializer of the same name, bit for bit, is *shared*: the stored
skeleton keeps its name, type and dimensions, drops its data, and records the ranges; everything else (a weight a
level tuned on its own, a bias whose channels moved) stays in the skeleton. The device splices the two back with
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

from .onnx_export import _ort_outputs


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
        mine = numpy_helper.to_array(tensor)
        if mine.ndim != full.ndim or any(s > f for s, f in zip(mine.shape, full.shape)):
            continue
        leading = full[tuple(slice(0, s) for s in mine.shape)]
        if np.ascontiguousarray(leading, "<f4").tobytes() != np.ascontiguousarray(mine, "<f4").tobytes():
            continue
        for key in ("raw_data", "float_data"):
            tensor.ClearField(key)
        shared.append(SharedWeight(name=tensor.name, ranges=tuple(((0, int(s)),) for s in mine.shape)))
        values += mine.size
    skeleton = model.SerializeToString()
    assembled = assemble(skeleton, base, [(w.name, w.ranges) for w in shared], len(narrow) + 64 * len(shared) + 64)
    got, want = (_ort_outputs(b, [example])[0] for b in (assembled, narrow))
    if got.tobytes() != want.tobytes():
        raise EdgeshiftError(
            f"a nested variant assembled from its base computes other outputs than its own export (max deviation "
            f"{float(np.abs(got - want).max()):.3g}); this is a bug: please report it"
        )
    return NestedForm(skeleton, assembled, tuple(shared), values)
