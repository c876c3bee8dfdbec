"""The build side's ONNX half (needs the ``build`` extra): export with conv-BN fused, simplified and checked,
variant profiling, the portfolio package, reports and the pipeline.

Heavy imports happen on first use of an attribute, so ``import edgeshift.exporter`` stays cheap.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "export_onnx": "edgeshift.exporter.onnx_export",
    "build_portfolio": "edgeshift.exporter.portfolio",
    "export_portfolio": "edgeshift.exporter.export_cmd",
    "write_report": "edgeshift.exporter.report",
    "OrtMeasurer": "edgeshift.exporter.profile",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'edgeshift.exporter' has no attribute {name!r}")
