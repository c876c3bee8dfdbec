"""edgeshift's device runtime: numpy + ONNX Runtime only, never torch or onnx."""

from edgeshift.core.errors import EdgeshiftError

__all__ = ["EdgeshiftError"]
