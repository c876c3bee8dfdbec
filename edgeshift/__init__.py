"""edgeshift: prune a trained CNN into exact, smaller and faster ONNX variants, and run them on edge devices.

The front door of the device side, torch-free::

    from edgeshift import Runtime, Portfolio, load_profile

The build side (needs ``pip install 'edgeshift[build]'``) is ``edgeshift.pruner`` (``create_model``,
``prune_zero_channels``, ...) and ``edgeshift.exporter`` (``export_onnx``, ``build_portfolio``, ...).

Names are imported on first use, so ``import edgeshift`` costs nothing and imports no layer below it early.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Runtime": "edgeshift.runtime.engine",
    "SwitchRecord": "edgeshift.runtime.engine",
    "Portfolio": "edgeshift.runtime.portfolio",
    "DeviceProfile": "edgeshift.device_profiles",
    "load_profile": "edgeshift.device_profiles",
    "EdgeshiftError": "edgeshift.core.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'edgeshift' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
