"""The one way a session is made: ONNX Runtime under a device profile, with provider fallback. Torch-free."""

from __future__ import annotations

import heapq
import os
import threading
import time
import warnings

from edgeshift.core.errors import EdgeshiftError, PortfolioError
from edgeshift.device_profiles.profile import SessionPlan, plan_session

_warned: set[tuple] = set()


def session_plan(profile, variant_sha256: str | None = None) -> SessionPlan:
    """The profile's plan on this onnxruntime build (see ``plan_session``); providers it lacks are skipped with
    one warning per distinct set."""
    import onnxruntime as ort

    plan = plan_session(profile, ort.get_available_providers(), variant_sha256)
    cores = os.cpu_count() or 1
    threads = max(plan.intra_op_threads, *plan.provider_threads.values(), 0)
    if threads > cores and ("threads", profile.name, threads) not in _warned:
        _warned.add(("threads", profile.name, threads))
        warnings.warn(
            f"profile {profile.name}: {threads} threads on this machine's {cores} cores; they will take turns (a "
            "profile for another device? its latencies here are not that device's)",
            RuntimeWarning,
            stacklevel=3,
        )
    if plan.missing and plan.missing not in _warned:
        _warned.add(plan.missing)
        warnings.warn(
            f"profile {profile.name}: {', '.join(plan.missing)} not available in this onnxruntime build; "
            f"using {plan.summary()}",
            RuntimeWarning,
            stacklevel=3,
        )
    return plan


_OPT_LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}


def session_options(profile, plan: SessionPlan):
    """ONNX Runtime session options: the profile's [execution] table with the plan's threads and config."""
    import onnxruntime as ort

    ex = profile.execution
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = plan.intra_op_threads
    opts.inter_op_num_threads = plan.inter_op_threads
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _OPT_LEVELS[ex.graph_optimization])
    opts.log_severity_level = 4  # fatal only: what ORT refuses is raised, and said in one line, by the caller
    opts.execution_mode = (
        ort.ExecutionMode.ORT_PARALLEL if ex.execution_mode == "parallel" else ort.ExecutionMode.ORT_SEQUENTIAL
    )
    for key, value in plan.session_config.items():
        opts.add_session_config_entry(key, value)
    return opts


def create_session(
    model: bytes | str,
    profile,
    variant_sha256: str | None = None,
    plan: SessionPlan | None = None,
    *,
    shared_pool: bool = False,
):
    """A session under ``profile`` from ONNX bytes or the path of an in-memory file (``Portfolio.inflated_path``);
    ``variant_sha256`` names the variant's own engine folder where the profile caches compiled engines. ``plan``:
    one already made for this variant (``session_plan``), so a switch plans once. ``shared_pool``: run on the
    process's one thread pool (``set_global_thread_pool_sizes``, ``edgeshift.runtime.timing_process``)."""
    import onnxruntime as ort

    plan = plan or session_plan(profile, variant_sha256)
    if plan.engine_dir is not None:
        os.makedirs(plan.engine_dir, exist_ok=True)
    options = session_options(profile, plan)
    options.use_per_session_threads = not shared_pool
    return ort.InferenceSession(
        model,
        options,
        providers=list(plan.providers),
        provider_options=[dict(o) for o in plan.provider_options],
    )


def one_line(exc: BaseException) -> str:
    """An exception's message on one line, at most 400 characters (ONNX Runtime's can run to pages)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 400 else text[:400] + " ..."


class _Watchdog:
    """One thread for every bounded call, started once: at a call's deadline it sets the call's terminate flag.
    (A timer thread per call costs ~4 ms on a 2-core device when it starts beside a session's first run.)"""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[list] = []  # [deadline, sequence, RunOptions, active]
        self._sequence = 0
        self._thread: threading.Thread | None = None

    def watch(self, options, seconds: float) -> list:
        with self._cond:
            self._sequence += 1
            entry = [time.monotonic() + seconds, self._sequence, options, True]
            heapq.heappush(self._heap, entry)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="edgeshift-deadlines", daemon=True)
                self._thread.start()
            elif self._heap[0] is entry:  # earlier than what the thread waits for
                self._cond.notify()
        return entry

    @staticmethod
    def done(entry: list) -> None:
        entry[3] = False  # the thread drops it when it comes up

    def _loop(self) -> None:
        with self._cond:
            while True:
                now = time.monotonic()
                while self._heap and (not self._heap[0][3] or self._heap[0][0] <= now):
                    entry = heapq.heappop(self._heap)
                    if entry[3]:
                        entry[2].terminate = True
                self._cond.wait(self._heap[0][0] - now if self._heap else None)


_watchdog = _Watchdog()


def run_bounded(session, feed: dict, seconds: float, what: str, error: type[EdgeshiftError] = PortfolioError):
    """``session.run(None, feed)``, stopped after ``seconds`` (ONNX Runtime's terminate flag, checked between
    operators): for warm-up calls on a graph that may never finish. A failure or the deadline is ``error``,
    naming ``what``."""
    import onnxruntime as ort

    options = ort.RunOptions()
    options.log_severity_level = 4
    entry = _watchdog.watch(options, seconds)
    try:
        return session.run(None, feed, options)
    except Exception as exc:  # noqa: BLE001 - ORT's own error classes
        if options.terminate:
            raise error(f"{what}: one call ran past {seconds:g} s (the profile's limits.run_seconds)") from None
        raise error(f"{what}: ONNX Runtime cannot run it: {one_line(exc)}") from None
    finally:
        _watchdog.done(entry)


def engine_cached(plan: SessionPlan) -> bool | None:
    """Whether the plan's compiled engine is already in the profile's cache (None: no engine cache in use)."""
    if plan.engine_dir is None:
        return None
    return os.path.isdir(plan.engine_dir) and any(os.scandir(plan.engine_dir))


def session_for_variant(portfolio, name: str, profile, pace=None, plan: SessionPlan | None = None):
    """Inflate ``name`` (hash-checked) and build its session; returns (session, inflate_ms, create_ms).

    ``pace`` is passed to the inflation (``edgeshift.runtime.portfolio.Pace``); inflate_ms includes any time it
    slept. ``plan``: the variant's session plan, where the caller already made it."""
    t0 = time.perf_counter()
    with portfolio.inflated_path(name, pace) as path:
        model = path if path is not None else portfolio.inflate(name, pace)
        t1 = time.perf_counter()
        try:
            session = create_session(model, profile, portfolio.info(name).sha256, plan)
        except Exception as exc:  # noqa: BLE001 - ORT's own error classes
            raise PortfolioError(
                f"{portfolio.path}: variant {name!r}: ONNX Runtime cannot load it: {one_line(exc)}"
            ) from None
    t2 = time.perf_counter()
    return session, (t1 - t0) * 1e3, (t2 - t1) * 1e3


def absorb_first_session_cost(portfolio, profile) -> None:
    """Build and run one throwaway session, so ONNX Runtime's one-time set-up (allocators, thread pools) is not
    charged to whichever variant a measurement happens to start with."""
    import numpy as np

    name = portfolio.names[0]
    session = session_for_variant(portfolio, name, profile)[0]
    inp = session.get_inputs()[0]
    feed = {inp.name: np.zeros([1 if not isinstance(d, int) else d for d in inp.shape], np.float32)}
    run_bounded(session, feed, profile.limits.run_seconds, f"{portfolio.path}: variant {name!r}")
