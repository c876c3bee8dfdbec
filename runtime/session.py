"""The one way a session is made: ONNX Runtime under a device profile, with provider fallback. Torch-free."""

from __future__ import annotations

import warnings

_warned: set[tuple[str, ...]] = set()


def providers_for(profile) -> tuple[list[str], list[dict]]:
    """The profile's providers that this onnxruntime build has, in order, with their options; CPU last.

    Providers it lacks are skipped with one warning per distinct set."""
    import onnxruntime as ort

    available = set(ort.get_available_providers())
    wanted = list(profile.execution.providers)
    chosen = [p for p in wanted if p in available]
    missing = tuple(p for p in wanted if p not in available)
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    if missing and missing not in _warned:
        _warned.add(missing)
        warnings.warn(
            f"profile {profile.name}: {', '.join(missing)} not available in this onnxruntime build; "
            f"using {', '.join(chosen)}",
            RuntimeWarning,
            stacklevel=3,
        )
    options = [dict(profile.execution.provider_options.get(p, {})) for p in chosen]
    return chosen, options


_OPT_LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}


def profile_session_options(profile):
    """ONNX Runtime session options from a device profile's [execution] table."""
    import onnxruntime as ort

    ex = profile.execution
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(ex.intra_op_threads)
    opts.inter_op_num_threads = int(ex.inter_op_threads)
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _OPT_LEVELS[ex.graph_optimization])
    opts.log_severity_level = 3
    opts.execution_mode = (
        ort.ExecutionMode.ORT_PARALLEL if ex.execution_mode == "parallel" else ort.ExecutionMode.ORT_SEQUENTIAL
    )
    for key, value in ex.session_config.items():
        opts.add_session_config_entry(key, value)
    return opts


def create_session(model: bytes | str, profile):
    """A session under ``profile`` from ONNX bytes or the path of an in-memory file (``Portfolio.inflated_path``)."""
    import onnxruntime as ort

    providers, options = providers_for(profile)
    return ort.InferenceSession(model, profile_session_options(profile), providers=providers, provider_options=options)


def session_for_variant(portfolio, name: str, profile, pace=None):
    """Inflate ``name`` (hash-checked) and build its session; returns (session, inflate_ms, create_ms).

    ``pace`` is passed to the inflation (``edgeshift.runtime.portfolio.Pace``); inflate_ms includes any time it
    slept."""
    import time

    t0 = time.perf_counter()
    with portfolio.inflated_path(name, pace) as path:
        model = path if path is not None else portfolio.inflate(name, pace)
        t1 = time.perf_counter()
        session = create_session(model, profile)
    t2 = time.perf_counter()
    return session, (t1 - t0) * 1e3, (t2 - t1) * 1e3


def absorb_first_session_cost(portfolio, profile) -> None:
    """Build and run one throwaway session, so ONNX Runtime's one-time set-up (allocators, thread pools) is not
    charged to whichever variant a measurement happens to start with."""
    import numpy as np

    session = session_for_variant(portfolio, portfolio.names[0], profile)[0]
    inp = session.get_inputs()[0]
    session.run(None, {inp.name: np.zeros([1 if not isinstance(d, int) else d for d in inp.shape], np.float32)})
