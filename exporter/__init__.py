"""The build side's ONNX half (needs the ``build`` extra): export with conv-BN fused, simplified and checked,
variant profiling, the portfolio package, reports and the pipeline.

Heavy imports happen on first use of an attribute, so ``import edgeshift.exporter`` stays cheap.
"""

from __future__ import annotations

from edgeshift.core.lazy import lazy_exports

_EXPORTS = {
    "export_onnx": "edgeshift.exporter.onnx_export",
    "build_portfolio": "edgeshift.exporter.portfolio",
    "BuildSettings": "edgeshift.exporter.portfolio",
    "VariantFacts": "edgeshift.exporter.portfolio",
    "export_portfolio": "edgeshift.exporter.export_cmd",
    "write_report": "edgeshift.exporter.report",
    "OrtMeasurer": "edgeshift.exporter.profile",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports("edgeshift.exporter", _EXPORTS)
