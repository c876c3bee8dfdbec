"""edgeshift: prune a trained CNN into exact, smaller and faster ONNX variants, and run them on edge devices.

The front door of the device side, torch-free::

    from edgeshift import Runtime, Portfolio, load_profile

The build side (needs ``pip install 'edgeshift[build]'``) is ``edgeshift.pruner`` (``create_model``,
``prune_zero_channels``, ...) and ``edgeshift.exporter`` (``export_onnx``, ``build_portfolio``, ...).

Names are imported on first use, so ``import edgeshift`` costs nothing and imports no layer below it early.
"""

from __future__ import annotations

from edgeshift.core.lazy import lazy_exports

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

__getattr__, __dir__ = lazy_exports("edgeshift", _EXPORTS)
