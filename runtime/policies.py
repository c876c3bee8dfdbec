"""Switch policies: each a small class behind one registry. Torch-free.

A policy sees an ``Observation`` of the last window (demand, latency, how much CPU the device gives us,
free memory) and the variants it chooses among, and returns a ``Decision`` or None. A policy that steps by
speed (``uses_ladder``) sees the ladder, fastest first, each step measured faster than the one above on this
device (``edgeshift.runtime.ladder``); "one step down" is then always a faster variant, never merely a smaller
one. The ``memory`` policy sees every variant, smallest first.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from edgeshift.core.registry import Registry


@dataclass(frozen=True)
class Observation:
    time: float  # seconds since start
    offered_qps: float  # requests arriving per second in the window
    served_qps: float  # requests completed per second in the window
    p95_ms: float | None  # request latency in the window (None: no requests)
    cpu_share: float  # speed available relative to the benchmark (1.0 = as measured, 0.5 = twice as slow)
    available_mb: float  # memory available on the device


@dataclass(frozen=True)
class VariantView:
    name: str
    index: int  # position in what the policy sees: the ladder (fastest first), or every variant by size
    top1: float  # accuracy (0 when unknown)
    latency_ms: float  # batch-1 p95 measured on this device (or at build time)
    memory_mb: float  # what a session of it costs


@dataclass(frozen=True)
class Decision:
    target: int  # index of the variant to switch to
    reason: str


class SwitchPolicy(ABC):
    """Decide which variant should be active, from one observation at a time."""

    name: str = ""
    uses_ladder: bool = True  # steps along the ladder (by measured speed); False: sees every variant by size

    def __init__(
        self,
        latency_target_ms: float = 50.0,
        memory_budget_mb: float = 1024.0,
        threads: int = 1,
        switch_every_windows: int = 5,
    ):
        self.latency_target_ms = latency_target_ms
        self.memory_budget_mb = memory_budget_mb
        self.threads = max(1, threads)
        self.switch_every_windows = max(1, switch_every_windows)

    def predicted_p95_ms(self, v: VariantView, obs: Observation) -> float:
        """Service time under the observed CPU share, inflated by queueing at the offered load (M/M/c-ish)."""
        service = v.latency_ms / max(obs.cpu_share, 1e-3)
        rho = obs.offered_qps * service / 1000.0 / self.threads
        return float("inf") if rho >= 1 else service / (1 - rho)

    @abstractmethod
    def decide(self, obs: Observation, variants: list[VariantView], active: int) -> Decision | None: ...


POLICIES: Registry[type[SwitchPolicy]] = Registry("policy")


@POLICIES.register("manual", help="never switches by itself")
class ManualPolicy(SwitchPolicy):
    """Never switches on its own: only ``switch_to`` moves the runtime."""

    name = "manual"

    def decide(self, obs, variants, active):
        return None


@POLICIES.register(
    "qps-trend", help="DNNShifter's rule: one ladder step faster when sustained throughput falls, slower when it rises"
)
class QpsTrendPolicy(SwitchPolicy):
    """DNNShifter's rule: one ladder step faster when the throughput the device sustains falls, one step slower
    (more accurate) when it rises; no search over the portfolio.

    The sustained throughput is the active variant's capacity, ``threads * 1000 / service_ms``; its trend is
    measured on ``cpu_share`` (capacity relative to the benchmark) so that a switch does not look like a trend.
    A falling trend, or demand above ``high_water`` of capacity, steps down; a rising trend steps up when the
    next slower step would still run below ``low_water`` of its capacity. Hysteresis: at most one switch per
    ``switch_every_windows`` windows (the profile's ``serving.switch_every_windows``), so steady load, saturated
    or not, does not flip it.
    """

    name = "qps-trend"

    def __init__(
        self,
        *args,
        window: int = 3,
        threshold: float = 0.1,
        high_water: float = 0.9,
        low_water: float = 0.6,
        **kw,
    ):
        super().__init__(*args, **kw)
        self.window, self.threshold = window, threshold
        self.high_water, self.low_water = high_water, low_water
        self._shares: list[float] = []
        self._quiet = 0

    def _capacity(self, v: VariantView, share: float) -> float:
        return self.threads * 1000.0 / max(v.latency_ms / max(share, 1e-3), 1e-6)

    def decide(self, obs, variants, active):
        self._shares.append(obs.cpu_share)
        self._shares = self._shares[-(self.window + 1) :]
        if self._quiet > 0:
            self._quiet -= 1
            return None
        cap = self._capacity(variants[active], obs.cpu_share)
        demand = obs.offered_qps / cap
        trend = 0.0
        if len(self._shares) > self.window:
            before = sum(self._shares[:-1]) / (len(self._shares) - 1)
            trend = (self._shares[-1] - before) / max(before, 1e-6)
        decision = None
        if active > 0 and (trend < -self.threshold or demand > self.high_water):
            why = (
                f"throughput falling {100 * trend:+.0f}% ({cap:.0f} qps sustained)"
                if trend < -self.threshold
                else f"demand {obs.offered_qps:.0f} qps is {100 * demand:.0f}% of capacity {cap:.0f} qps"
            )
            decision = Decision(active - 1, why)
        elif active < len(variants) - 1 and trend >= -self.threshold:
            bigger = self._capacity(variants[active + 1], obs.cpu_share)
            if obs.offered_qps < self.low_water * bigger and (trend > self.threshold or demand < self.low_water / 2):
                why = (
                    f"throughput rising {100 * trend:+.0f}%"
                    if trend > self.threshold
                    else f"demand {obs.offered_qps:.0f} qps is {100 * demand:.0f}% of capacity"
                )
                decision = Decision(active + 1, f"{why}; {variants[active + 1].name} sustains {bigger:.0f} qps")
        if decision is not None:
            self._quiet = self.switch_every_windows - 1
            self._shares = self._shares[-1:]
        return decision


@POLICIES.register("latency-slo", help="the most accurate variant whose predicted p95 meets the target")
class LatencySloPolicy(SwitchPolicy):
    """The most accurate variant whose predicted p95 meets the target. As soon as the active one misses it, steps
    down to the most accurate *faster* step predicted to meet it, or to the fastest step when none is: never to a
    slower one (a miss means predictions ran low, so a slower step "predicted" to fit would miss worse). Steps up
    only when a better one meets ``target * (1 - hysteresis)`` for ``patience`` windows."""

    name = "latency-slo"

    def __init__(self, *args, hysteresis: float = 0.2, patience: int = 3, **kw):
        super().__init__(*args, **kw)
        self.hysteresis, self.patience = hysteresis, patience
        self._streak = 0

    def decide(self, obs, variants, active):
        target = self.latency_target_ms
        predicted = [self.predicted_p95_ms(v, obs) for v in variants]
        fits = [i for i, p in enumerate(predicted) if p <= target]
        best = max(fits, key=lambda i: (variants[i].top1, -i)) if fits else 0
        current = predicted[active] if obs.p95_ms is None else max(predicted[active], obs.p95_ms)
        if current > target:
            self._streak = 0
            faster = [i for i in fits if i < active]  # the ladder is fastest first
            down = max(faster, key=lambda i: (variants[i].top1, -i)) if faster else 0
            if down == active:
                return None  # already the fastest step: nothing faster to go to
            why = (
                f"{variants[down].name} predicts {predicted[down]:.1f} ms"
                if faster
                else f"no faster step is predicted to meet it: the fastest, {variants[down].name}"
            )
            return Decision(down, f"p95 {current:.1f} ms misses the {target:g} ms target; {why}")
        if (
            best != active
            and variants[best].top1 > variants[active].top1
            and predicted[best] <= target * (1 - self.hysteresis)
        ):
            self._streak += 1
            if self._streak >= self.patience:
                self._streak = 0
                return Decision(
                    best,
                    f"{variants[best].name} is more accurate and predicts {predicted[best]:.1f} ms "
                    f"<= {target * (1 - self.hysteresis):.1f} ms for {self.patience} windows",
                )
        else:
            self._streak = 0
        return None


@POLICIES.register("memory", help="the largest variant that fits the memory available")
class MemoryPolicy(SwitchPolicy):
    """The largest variant whose session fits the memory available (and the profile's budget)."""

    name = "memory"
    uses_ladder = False

    def __init__(self, *args, reserve_mb: float = 64.0, **kw):
        super().__init__(*args, **kw)
        self.reserve_mb = reserve_mb

    def decide(self, obs, variants, active):
        room = min(obs.available_mb - self.reserve_mb + variants[active].memory_mb, self.memory_budget_mb)
        fitting = [i for i, v in enumerate(variants) if v.memory_mb <= room]
        target = max(fitting) if fitting else 0
        if target == active:
            return None
        return Decision(
            target,
            f"{room:.0f} MB available for the session; {variants[target].name} needs "
            f"{variants[target].memory_mb:.0f} MB",
        )


@POLICIES.register(
    "self-adaptive",
    help="the widest width (most accurate step) that meets the latency target at the CPU share left and fits the "
    "memory available",
)
class SelfAdaptivePolicy(SwitchPolicy):
    """The controller of "Self-adaptive neural network for edge devices" (sec. 3, sec. 4.3): from the device's
    state (the CPU share it gives us, the memory available, the latency target) to a width of a nested network,
    the most accurate ladder step that is predicted to meet the target and whose session fits; the fastest when
    none does. It covers the paper's three scenarios (``SCENARIOS``): with no constraint it keeps the widest step;
    with the CPU restricted it drops channel groups until the target is met again; with memory short it drops
    them until the session fits. A step up (adding groups back) waits until the wider step meets
    ``target * (1 - hysteresis)``, and after a switch it waits ``switch_every_windows`` windows."""

    name = "self-adaptive"

    def __init__(self, *args, hysteresis: float = 0.2, reserve_mb: float = 64.0, **kw):
        super().__init__(*args, **kw)
        self.hysteresis, self.reserve_mb = hysteresis, reserve_mb
        self._quiet = 0

    def width_for(self, obs: Observation, variants: list[VariantView], active: int, margin: float = 0.0) -> int:
        """The step the state calls for: the most accurate one meeting ``target * (1 - margin)`` and fitting."""
        room = min(obs.available_mb - self.reserve_mb + variants[active].memory_mb, self.memory_budget_mb)
        target = self.latency_target_ms * (1 - margin)
        fits = [
            i
            for i, v in enumerate(variants)
            if self.predicted_p95_ms(v, obs) <= target and (v.memory_mb <= room or i == 0)
        ]
        return max(fits, key=lambda i: (variants[i].top1, i)) if fits else 0

    def decide(self, obs, variants, active):
        if self._quiet > 0:
            self._quiet -= 1
            return None
        target = self.width_for(obs, variants, active)
        if target > active:  # more channel groups back only with room to spare
            target = max(active, self.width_for(obs, variants, active, self.hysteresis))
        if target == active:
            return None
        self._quiet = self.switch_every_windows - 1
        v = variants[target]
        return Decision(
            target,
            f"{v.name} predicts {self.predicted_p95_ms(v, obs):.1f} ms at {100 * obs.cpu_share:.0f}% CPU (target "
            f"{self.latency_target_ms:g} ms) and needs {v.memory_mb:.0f} MB of {obs.available_mb:.0f} MB available",
        )


@dataclass(frozen=True)
class Scenario:
    """A device state from "Self-adaptive neural network for edge devices", sec. 3: what the controller is for."""

    name: str
    help: str
    cpu_share: float  # of the speed the ladder was measured at
    memory_share: float | None  # memory available, as a share of what the widest step's session needs; None: ample

    def observation(
        self, variants: list[VariantView], active: int, offered_qps: float = 0.0, reserve_mb: float = 64.0
    ) -> Observation:
        """The state as a policy sees it while ``variants[active]`` runs: the device's free memory is what the
        scenario leaves for a session, plus the policy's reserve, less what the active session holds."""
        widest = max(v.memory_mb for v in variants)
        room = 1e9 if self.memory_share is None else self.memory_share * widest
        available = room + reserve_mb - variants[active].memory_mb
        return Observation(0.0, offered_qps, offered_qps, None, self.cpu_share, available)


SCENARIOS = {
    s.name: s
    for s in (
        Scenario("no-constraint", "the device meets the widest model's needs", 1.0, None),
        Scenario("restricted-cpu", "low-power mode: 30% less processing power", 0.7, None),
        Scenario("limited-memory", "other applications leave less memory than the widest model uses", 1.0, 0.5),
    )
}


def names() -> list[str]:
    return POLICIES.names()


def get(name: str, **kw) -> SwitchPolicy:
    """Build the policy called ``name`` with ``kw``; unknown names list the known ones."""
    return POLICIES.get(name)(**kw)


def for_profile(name: str, profile) -> SwitchPolicy:
    """The policy called ``name`` with a device profile's serving settings: latency target, memory budget and
    hysteresis."""
    serving = profile.serving
    return get(
        name,
        latency_target_ms=serving.latency_target_ms,
        memory_budget_mb=serving.memory_budget_mb,
        switch_every_windows=serving.switch_every_windows,
    )
