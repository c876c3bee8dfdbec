"""The device runtime: serve predictions from one variant and switch variants live without downtime.

A request reads the active slot once (a single reference, swapped atomically) and runs to completion on that
session, so a switch never interrupts or mixes requests: in-flight requests finish on the old session, which is
released when the last of them returns. A switch builds the next variant's session on a background thread
(``building.build_slot``: inflate, create, warm), then swaps the reference. A switch toward a slower variant is
paced while requests are served (see ``building``); a switch to a faster one is not: it is how the runtime
answers overload, and finishing it sooner is what helps requests. What was served is in ``request_log``; what
the policy sees is ``monitor.observe``. Torch-free.
"""

from __future__ import annotations

import math
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Sequence

import numpy as np

from edgeshift import device_profiles
from edgeshift.core.errors import EdgeshiftError, InputShapeError, UnknownNameError

from . import policies
from .building import Built, Slot, SwitchRecord, build_slot
from .cascade import check_thresholds, choose_point, run_cascade, spin_stopping
from .ladder import device_ladder
from .manifest import Cascade
from .monitor import observe
from .portfolio import Portfolio
from .request_log import RequestLog
from .session import session_plan
from .vetting import vet_portfolio

__all__ = ["Runtime", "SwitchRecord"]


class _CascadeState:
    """The cascade a runtime serves: the steps' sessions, the thresholds in use, where inputs left, and each step's
    latency as measured while serving (a moving average per call, seeded with the manifest's p50)."""

    SMOOTHING = 0.1

    def __init__(self, calibrated: Cascade, fixed: tuple[float, ...] | None, target_ms: float | None, step_ms):
        self.calibrated = calibrated
        self.steps = calibrated.steps
        self.target_ms = target_ms
        self.point: int | None = None if fixed is not None else 0
        self.thresholds = fixed if fixed is not None else calibrated.points[0].thresholds
        self.slots: list[Slot] = []
        self._lock = threading.Lock()
        self._exits = [0] * len(self.steps)
        self._ms = [float(v) for v in step_ms]

    def run_step(self, k: int, items: np.ndarray) -> np.ndarray:
        slot = self.slots[k]
        t = time.perf_counter()
        out = slot.session.run(None, {slot.input_name: items})[0]
        ms = (time.perf_counter() - t) * 1e3
        with self._lock:
            self._ms[k] += self.SMOOTHING * (ms - self._ms[k])
        return out

    def count(self, answered: np.ndarray) -> None:
        if len(answered) == 1:  # one input (the device's usual request): no histogram to build
            with self._lock:
                self._exits[int(answered[0])] += 1
            return
        counts = np.bincount(answered, minlength=len(self.steps))
        with self._lock:
            for k, n in enumerate(counts):
                self._exits[k] += int(n)

    def step_ms(self) -> list[float]:
        with self._lock:
            return list(self._ms)

    def use(self, point: int) -> None:
        self.point = point
        self.thresholds = self.calibrated.points[point].thresholds

    def describe(self) -> dict:
        with self._lock:
            return {
                "steps": list(self.steps),
                "thresholds": list(self.thresholds),
                "point": self.point,
                "target_ms": self.target_ms,
                "exits": dict(zip(self.steps, self._exits)),
                "step_ms": dict(zip(self.steps, self._ms)),
            }


class Runtime:
    """Serve a portfolio under a device profile and a switch policy.

    ``Runtime(portfolio, profile="host", policy="manual")`` starts on the ladder's middle step (or ``start``).
    The ladder (``edgeshift.runtime.ladder``: variants each measured faster than the one above) is ordered by this
    device's own figures when it has them: ``bench`` (a document or file from ``edgeshift bench``), else the bench
    saved beside the portfolio (``bench --save``) when it was measured here under this profile, else the manifest's.
    ``preload_neighbours`` (default: the profile's setting) keeps the next faster and slower steps' sessions
    warm so a switch to them is a reference swap. ``vet`` (default on): every variant is first made and run once in
    a process of its own under the profile's limits (``edgeshift.runtime.vetting``), since the portfolio is
    untrusted; off only for a file you built yourself. ``switch_cpu_share`` (default: the profile's setting, 1 = no
    pacing) is the share of the time a build toward a slower variant works while requests are being served.

    ``cascade=True`` serves the portfolio's calibrated confidence cascade (``edgeshift.runtime.cascade``) instead of
    one variant: every step's session is kept warm and each input leaves at the first step sure enough of it. Its
    ``thresholds`` are the calibrated ones unless given; with ``latency_target_ms`` (and no thresholds given) the
    runtime moves live among the calibrated operating points, the most accurate one whose expected time per input
    meets the target on the steps' latencies measured here. ``stats()["cascade"]`` counts where inputs left. Its
    sessions stop their threads spinning at the end of each run (``cascade.spin_stopping``).
    """

    def __init__(
        self,
        portfolio,
        profile="host",
        policy="manual",
        *,
        start: str | None = None,
        preload_neighbours: bool | None = None,
        switch_cpu_share: float | None = None,
        warmup_runs: int = 1,
        decide_every: float = 1.0,
        bench: str | os.PathLike | dict | None = None,
        vet: bool = True,
        cascade: bool = False,
        thresholds: Sequence[float] | None = None,
        latency_target_ms: float | None = None,
    ):
        self.profile = device_profiles.load_profile(profile) if isinstance(profile, (str, os.PathLike)) else profile
        self.portfolio = (
            portfolio if isinstance(portfolio, Portfolio) else Portfolio.open(portfolio, self.profile.limits)
        )
        self._owns_portfolio = not isinstance(portfolio, Portfolio)
        serving = self.profile.serving
        self.policy = policies.for_profile(policy, self.profile) if isinstance(policy, str) else policy
        self.preload_neighbours = serving.preload_neighbours if preload_neighbours is None else preload_neighbours
        self.switch_cpu_share = serving.switch_cpu_share if switch_cpu_share is None else switch_cpu_share
        if not 0 < self.switch_cpu_share <= 1:
            raise ValueError(f"switch_cpu_share must be in (0, 1], got {self.switch_cpu_share}")
        self.warmup_runs = warmup_runs
        spec = self.portfolio.input_spec
        self._input_shape = spec.shape
        self._input_dtype = np.dtype(spec.dtype)
        self._t0 = time.perf_counter()
        self._lock = threading.Lock()  # bookkeeping: switch records, standby sessions
        self._switch_lock = threading.Lock()  # one switch at a time
        # Normal priority on purpose: pacing (not niceness) keeps builds off the requests' tail, and a switch down
        # under overload must not starve behind the requests it is meant to relieve.
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="edgeshift-switch")
        self._standby: dict[str, Slot] = {}
        self._log = RequestLog()
        self._switches: list[SwitchRecord] = []
        self._pending: Future | None = None
        self._cascade: _CascadeState | None = None
        try:
            self.ladder = device_ladder(self.portfolio, self.profile, bench)
            self._cascade = self._cascade_state(cascade, thresholds, latency_target_ms, start)
            if self._cascade is not None:
                start = self._cascade.steps[-1]
            name = start or self.ladder.steps[(len(self.ladder.steps) - 1) // 2]
            self.portfolio.info(name)  # unknown start -> error naming the variants
            self._check_usable(name)
            if vet:
                vet_portfolio(self.portfolio, self.profile)
            first = self._build(name)
            if self._cascade is not None:
                self._cascade.slots = [
                    first.slot if step == name else self._build(step).slot for step in self._cascade.steps
                ]
        except BaseException:
            self._executor.shutdown(wait=False)
            if self._owns_portfolio:
                self.portfolio.close()
            raise
        self._active = first.slot
        total = first.inflate_ms + first.create_ms + first.warm_ms
        self._switches.append(
            SwitchRecord(
                "",
                name,
                "start",
                0.0,
                first.inflate_ms,
                first.create_ms,
                first.warm_ms,
                total,
                False,
                first.yielded_ms,
                first.engine_cached,
                first.sliced,
            )
        )
        if self.preload_neighbours and self._cascade is None:  # a cascade keeps its own steps warm
            self._executor.submit(self._refresh_standby)
        self.decide_every = decide_every
        self._closing = threading.Event()
        self._fastest_ms: dict[str, float] = {}  # per variant: the fastest window median seen on this device
        self._monitor = None
        live_cascade = self._cascade is not None and self._cascade.target_ms is not None
        if (self.policy.name != "manual" or live_cascade) and decide_every > 0:
            self._monitor = threading.Thread(target=self._monitor_loop, name="edgeshift-policy", daemon=True)
            self._monitor.start()

    # -- serving ------------------------------------------------------------------------------------------
    @property
    def active(self) -> str:
        return self._active.name

    @property
    def variants(self) -> list[str]:
        return self.portfolio.names

    def _expected(self) -> str:
        return "(" + ", ".join("N" if d is None else str(d) for d in self._input_shape) + f") {self._input_dtype}"

    def check_input(self, batch) -> np.ndarray:
        """Return ``batch`` if it matches the manifest's input; else raise InputShapeError naming both."""
        if not isinstance(batch, np.ndarray):
            raise InputShapeError(f"input must be a numpy array shaped {self._expected()}, got {type(batch).__name__}")
        ok = (
            batch.ndim == len(self._input_shape)
            and all(d is None or d == s for d, s in zip(self._input_shape, batch.shape))
            and batch.shape[0] >= 1
        )
        if not ok or batch.dtype != self._input_dtype:
            raise InputShapeError(f"input is {tuple(batch.shape)} {batch.dtype}; expected {self._expected()}")
        return batch

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Run one batch on the active variant."""
        return self.predict_with_variant(batch)[0]

    def predict_with_variant(self, batch: np.ndarray) -> tuple[np.ndarray, str]:
        """Run one batch; also say which variant produced the result ("cascade" in cascade mode)."""
        if self._cascade is not None:
            return self._run_cascade(self._cascade, batch)[0], "cascade"
        self.check_input(batch)
        slot = self._active  # one read: this request runs wholly on this session
        t = self._log.started()
        try:
            out = slot.session.run(None, {slot.input_name: batch})[0]
        except Exception:
            self._log.failed()
            raise
        self._log.finished(t, slot.name)
        return out, slot.name

    def predict_cascade(self, batch: np.ndarray) -> tuple[np.ndarray, list[str]]:
        """Run one batch through the cascade: each item's logits from the step that answered it, and that step."""
        state = self._cascade
        if state is None:
            raise EdgeshiftError("this runtime serves one variant: start it with cascade=True to run the cascade")
        logits, answered = self._run_cascade(state, batch)
        return logits, [state.steps[k] for k in answered]

    def _run_cascade(self, state: _CascadeState, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(logits, index of the step that answered each item), logged and counted."""
        self.check_input(batch)
        thresholds = state.thresholds  # one read: this request runs wholly on these thresholds
        t = self._log.started()
        try:
            logits, answered = run_cascade(state.run_step, batch, thresholds)
        except Exception:
            self._log.failed()
            raise
        self._log.finished(t, "cascade")
        state.count(answered)
        return logits, answered

    def _cascade_state(
        self, wanted: bool, thresholds: Sequence[float] | None, target_ms: float | None, start: str | None
    ) -> _CascadeState | None:
        if not wanted:
            if thresholds is not None or target_ms is not None:
                raise EdgeshiftError("thresholds and a latency target are for the cascade: pass cascade=True")
            return None
        calibrated = self.portfolio.manifest.cascade
        if calibrated is None:
            raise EdgeshiftError(
                "this portfolio has no calibrated cascade: export it with `edgeshift export --cascade --data ...`"
            )
        if self.policy.name != "manual" or start is not None:
            raise EdgeshiftError(
                "a cascade chooses a step per input: it runs without a switch policy or a start variant"
            )
        for step in calibrated.steps:
            self._check_usable(step)
        if target_ms is not None and not (math.isfinite(target_ms) and target_ms > 0):
            raise EdgeshiftError(f"the cascade's latency target must be a positive number of ms, got {target_ms:g}")
        fixed = None if thresholds is None else check_thresholds(thresholds, len(calibrated.steps))
        p50 = [self.portfolio.info(s).record.latency for s in calibrated.steps]
        step_ms = [lat.p50_ms if lat is not None else 1.0 for lat in p50]
        return _CascadeState(calibrated, fixed, None if fixed is not None else target_ms, step_ms)

    def _retune_cascade(self) -> None:
        """Under a latency target: the most accurate operating point expected to meet it on this device's step
        latencies, measured while serving."""
        state = self._cascade
        if state is None or state.target_ms is None:
            return
        point = choose_point(state.calibrated.points, state.step_ms(), state.target_ms)
        state.use(point)

    # -- switching ----------------------------------------------------------------------------------------
    def _build(self, name: str, paced: bool = True) -> Built:
        """Inflate, create and warm ``name``'s session.

        ``paced``: while requests are being served, rest between inflated pieces (``building``)."""
        return build_slot(
            self.portfolio,
            name,
            self.profile if self._cascade is None else spin_stopping(self.profile),
            dtype=self._input_dtype,
            warmup_runs=self.warmup_runs,
            cpu_share=self.switch_cpu_share if paced else 1.0,
            serving=self._log.serving,
        )

    def _usable(self) -> list[str]:
        """Every variant the runtime may run, by size (not those waiting for this device's bench)."""
        usable = set(self.ladder.usable or self.portfolio.names)
        return [n for n in self.portfolio.names if n in usable]

    def _order(self) -> list[str]:
        """What the policy chooses among: the ladder (fastest first), or every usable variant by size."""
        return list(self.ladder.steps) if self.policy.uses_ladder else self._usable()

    def _neighbours(self, name: str) -> set[str]:
        names = self._order()
        if name not in names:
            names = self._usable()
        i = names.index(name)
        return {names[j] for j in (i - 1, i + 1) if 0 <= j < len(names)}

    def _slower(self, name: str, than: str) -> bool:
        """``name`` is measured slower than ``than`` (by bytes where latencies are unknown or equal)."""
        known = self.ladder.p95_ms
        if name in known and than in known and known[name] != known[than]:
            return known[name] > known[than]
        return self.portfolio.info(name).bytes > self.portfolio.info(than).bytes

    def _refresh_standby(self) -> None:
        """Keep warm sessions for the active variant's neighbours only."""
        wanted = self._neighbours(self.active)
        with self._lock:
            for name in list(self._standby):
                if name not in wanted:
                    del self._standby[name]
            missing = [n for n in wanted if n not in self._standby]
        for name in missing:
            slot = self._build(name).slot
            with self._lock:
                if name in self._neighbours(self.active):
                    self._standby[name] = slot

    def _do_switch(self, name: str, reason: str, requested: float) -> SwitchRecord:
        with self._switch_lock:
            source = self.active
            if name == source:
                return SwitchRecord(source, name, reason, requested - self._t0, 0, 0, 0, 0, True)
            with self._lock:
                slot = self._standby.pop(name, None)
            standby = slot is not None
            built = None
            if slot is None:
                built = self._build(name, paced=self._slower(name, source))
                slot = built.slot
            old = self._active
            self._active = slot  # the swap: one reference assignment
            with self._lock:
                if self.preload_neighbours and old.name in self._neighbours(name):
                    self._standby[old.name] = old  # the old session is a neighbour now: keep it warm
            record = SwitchRecord(
                source,
                name,
                reason,
                requested - self._t0,
                built.inflate_ms if built else 0.0,
                built.create_ms if built else 0.0,
                built.warm_ms if built else 0.0,
                (time.perf_counter() - requested) * 1e3,
                standby,
                built.yielded_ms if built else 0.0,
                built.engine_cached if built else None,
                built.sliced if built else False,
            )
            with self._lock:
                self._switches.append(record)
        if self.preload_neighbours:
            self._refresh_standby()
        return record

    def _check_usable(self, name: str) -> None:
        if name not in self._usable():
            raise EdgeshiftError(
                f"variant {name!r} was built for this device on another CPU and waits for this device's timing: run "
                "`edgeshift bench --save` here, which keeps it if it is faster than its source"
            )

    def switch_to(self, name: str, reason: str = "manual", wait: bool = True):
        """Make ``name`` the active variant. ``wait=False`` returns a Future and keeps serving meanwhile."""
        if self._cascade is not None:
            raise EdgeshiftError("a cascade runtime serves every step of its cascade: there is nothing to switch")
        if name not in self.portfolio.names:
            raise UnknownNameError("variant", name, self.portfolio.names)
        self._check_usable(name)
        fut = self._executor.submit(self._do_switch, name, reason, time.perf_counter())
        self._pending = fut
        return fut.result() if wait else fut

    # -- live policy ----------------------------------------------------------------------------------------
    def observe(self, window: float) -> tuple:
        """The last ``window`` seconds as the policy sees them: (Observation, variant views, active index)."""
        return observe(
            self.portfolio,
            self._log.recent(window),
            self.active,
            self._fastest_ms,
            window,
            time.perf_counter() - self._t0,
            self._order(),
            self.ladder.p95_ms,
        )

    def _monitor_loop(self) -> None:
        while not self._closing.wait(self.decide_every):
            if self._cascade is not None:
                self._retune_cascade()
                continue
            if self._pending is not None and not self._pending.done():
                continue  # one switch at a time
            obs, views, active = self.observe(self.decide_every)
            decision = self.policy.decide(obs, views, active)
            if decision is not None and decision.target != active and not self._closing.is_set():
                self.switch_to(views[decision.target].name, reason=f"{self.policy.name}: {decision.reason}", wait=False)

    # -- reporting ----------------------------------------------------------------------------------------
    def execution(self) -> dict:
        """What the active session really runs on: its providers (ONNX Runtime's own answer) and the threads and
        config the profile's plan gave it on this onnxruntime build."""
        plan = session_plan(self.profile).describe()
        providers = self._active.session.get_providers()
        return {**plan, "providers": providers, "lead": providers[0]}

    def stats(self) -> dict:
        with self._lock:
            out = {
                "active": self.active,
                **self._log.counts(),
                "switches": len(self._switches) - 1,
                "ladder": list(self.ladder.steps),
                "ladder_source": self.ladder.source,
                "execution": self.execution(),
                "switch_log": [s.to_dict() for s in self._switches],
                "standby": sorted(self._standby),
            }
            if self._cascade is not None:
                out["cascade"] = self._cascade.describe()
        out.update(self._log.percentiles_ms())
        return out

    def close(self) -> None:
        self._closing.set()
        if self._cascade is not None:
            self._cascade.slots = []
        if self._monitor is not None:
            self._monitor.join()
        self._executor.shutdown(wait=True)
        with self._lock:
            self._standby.clear()
        if self._owns_portfolio:
            self.portfolio.close()

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
