"""Device profiles: how to run ONNX Runtime on one kind of device, loaded from TOML with strict validation.

A profile file::

    name = "rpi4"
    description = "..."

    [execution]
    providers = ["XnnpackExecutionProvider", "CPUExecutionProvider"]  # in order of preference
    intra_op_threads = 4          # int, or "auto" (the machine's cores)
    inter_op_threads = 1
    graph_optimization = "all"    # disable | basic | extended | all
    execution_mode = "sequential" # sequential | parallel
    session_config = {}           # ORT session config entries
    engine_cache = ""             # a folder for compiled engines (TensorRT): one per variant, by its sha256

    [execution.provider_options.XnnpackExecutionProvider]
    intra_op_num_threads = 4      # options passed to that provider, values as strings or numbers

    [execution.when.XnnpackExecutionProvider]  # replaces the above when this provider is present and leads
    intra_op_threads = 1          # XNNPACK owns the cores; ORT's own pool stays at 1, not spinning
    session_config = { "session.intra_op.allow_spinning" = "0" }

    [serving]
    batch_size = 1
    latency_target_ms = 50.0
    memory_budget_mb = 512        # int, or "auto" (half the available memory)
    preload_neighbours = false    # keep the next smaller/larger variant's session warm
    switch_cpu_share = 0.25       # while serving, a switch to a larger variant inflates this share of the time

    [benchmark]
    warmup = 10
    iterations = 100
    max_seconds = 20.0
    rounds = 5                    # interleaved rounds when variants are compared
    ladder_min_gain = 0.10        # each ladder step down is at least this much faster

    [quantization]                # INT8 variants built for this device (build side only)
    format = "qdq"                # qoperator | qdq | auto (time both on this machine, keep the faster)
    activations = "int8"          # uint8 | int8
    per_channel = true
    reduce_range = false          # 7-bit weights: x86 without VNNI, where u8 x s8 products can saturate

Every key, its default and its help are stated once, in the dataclasses below; ``edgeshift.core.config`` loads
them, so an unknown key or a value of the wrong type is an error naming the file and the key. Torch-free.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Literal, Union

from edgeshift.core.config import load, read_toml, setting
from edgeshift.core.errors import ProfileError

GraphOptimization = Literal["disable", "basic", "extended", "all"]
ExecutionMode = Literal["sequential", "parallel"]
OptionValue = Union[str, int, float, bool]


def _providers(value: tuple[str, ...]) -> str | None:
    return "must be a non-empty list of provider names" if not value else None


def _share(value: float) -> str | None:
    return None if 0 < value <= 1 else "must be in (0, 1] (1 = switch at full speed)"


@dataclass(frozen=True)
class ProviderOverrides:
    """Settings that replace ``[execution]``'s when one provider is the first of the profile's that is present.

    Why: thread settings belong to the provider doing the work. XNNPACK runs its own pool, so ORT's should be 1;
    the CPU provider needs ORT's pool at the device's cores. Which one a device gets depends on the onnxruntime
    build installed there (PyPI's aarch64 wheels have no XNNPACK), so it is decided when a session is made."""

    intra_op_threads: Union[int, None] = setting(None, "ORT's intra-op threads (unset: [execution]'s)", minimum=0)
    inter_op_threads: Union[int, None] = setting(None, "ORT's inter-op threads (unset: [execution]'s)", minimum=0)
    session_config: dict[str, str] = setting({}, "ORT session config entries, added to [execution]'s")


@dataclass(frozen=True)
class ExecutionSettings:
    providers: tuple[str, ...] = setting(
        ("CPUExecutionProvider",), "ONNX Runtime providers, preferred first; missing ones are skipped", check=_providers
    )
    intra_op_threads: Union[int, Literal["auto"]] = setting(
        1, "threads inside one operator; 'auto': the machine's cores (0 lets ORT choose)", minimum=0
    )
    inter_op_threads: int = setting(1, "threads across operators (parallel mode only)", minimum=0)
    graph_optimization: GraphOptimization = setting("all", "ORT graph optimisation level")
    execution_mode: ExecutionMode = setting("sequential", "ORT execution mode")
    session_config: dict[str, str] = setting({}, "ORT session config entries")
    provider_options: dict[str, dict[str, OptionValue]] = setting({}, "provider name -> its options")
    when: dict[str, ProviderOverrides] = setting(
        {}, "provider name -> settings that replace these when it is the first present (threads per provider)"
    )
    engine_cache: str = setting(
        "",
        "folder for compiled engines (TensorRT): a subfolder per variant named by its sha256, and a shared timing "
        "cache, so a switch loads an engine instead of building one; '~' expands, empty: no cache",
    )


@dataclass(frozen=True)
class ServingSettings:
    batch_size: int = setting(1, "requests per inference call", minimum=1)
    latency_target_ms: float = setting(100.0, "the p95 the latency-slo policy aims for", minimum=0)
    memory_budget_mb: Union[int, Literal["auto"]] = setting(
        1024, "what the runtime may use for sessions; 'auto': half the available memory", minimum=0
    )
    preload_neighbours: bool = setting(False, "keep the neighbours' sessions warm for sub-ms switches")
    switch_cpu_share: float = setting(
        0.25, "while serving, a switch up inflates this share of the time, resting between pieces", check=_share
    )


@dataclass(frozen=True)
class BenchmarkSettings:
    warmup: int = setting(10, "untimed calls before timing", minimum=0)
    iterations: int = setting(100, "timed calls at most", minimum=1)
    max_seconds: float = setting(20.0, "per variant, at most", minimum=0)
    rounds: int = setting(
        5, "interleaved timing rounds when variants are compared (noise = spread of rounds)", minimum=1
    )
    ladder_min_gain: float = setting(
        0.10,
        "a ladder step down must be at least this much faster (relative p50), and faster in every interleaved "
        "round (bar one from 4 rounds on)",
        check=lambda v: None if 0 <= v < 1 else "must be in [0, 1)",
    )


QuantFormat = Literal["qoperator", "qdq", "auto"]
ActivationType = Literal["uint8", "int8"]


@dataclass(frozen=True)
class QuantizationSettings:
    format: QuantFormat = setting(
        "qdq",
        "INT8 model format: qoperator (QLinearConv; fastest on x86 with VNNI), qdq (Quantize/DequantizeLinear "
        "pairs; ORT's default, ARM and TensorRT), auto (build both, time them on this machine, keep the faster)",
    )
    activations: ActivationType = setting(
        "int8",
        "activation type: uint8 or int8 (weights are int8); ignored by format auto, which tries "
        "qoperator+uint8 and qdq+int8",
    )
    per_channel: bool = setting(True, "one weight scale per output channel")
    reduce_range: bool = setting(False, "7-bit weights, for x86 CPUs without VNNI where u8 x s8 can saturate")


@dataclass(frozen=True)
class DeviceProfile:
    name: str = setting("", "the profile's name (default: the file's stem)")
    description: str = setting("", "the device, in words")
    execution: ExecutionSettings = dataclasses.field(default_factory=ExecutionSettings)
    serving: ServingSettings = dataclasses.field(default_factory=ServingSettings)
    benchmark: BenchmarkSettings = dataclasses.field(default_factory=BenchmarkSettings)
    quantization: QuantizationSettings = dataclasses.field(default_factory=QuantizationSettings)
    source: str = dataclasses.field(default="", init=False)  # the file it came from


def cpu_profile(threads: int = 1, name: str = "cpu") -> DeviceProfile:
    """The CPU provider alone with ``threads`` intra-op threads (0: ORT chooses): how the build machine times
    variants when no device profile is named."""
    return DeviceProfile(
        name=name,
        description=f"CPU provider, {threads} intra-op threads",
        execution=ExecutionSettings(intra_op_threads=threads),
    )


TENSORRT = "TensorrtExecutionProvider"
CPU = "CPUExecutionProvider"


@dataclass(frozen=True)
class SessionPlan:
    """What a session under a profile really gets from the onnxruntime build at hand: the providers present (CPU
    last), their options, and the thread settings of the provider that leads. Reported by ``bench`` and the
    runtime, since the profile alone does not say which of its providers a device has."""

    providers: tuple[str, ...]
    provider_options: tuple[dict[str, str], ...]
    missing: tuple[str, ...]  # the profile's providers this build lacks
    intra_op_threads: int
    inter_op_threads: int
    session_config: dict[str, str]
    engine_dir: str | None = None  # this variant's compiled-engine folder (TensorRT with an engine_cache)

    @property
    def lead(self) -> str:
        """The provider that runs the model (the first present; later ones take what it cannot)."""
        return self.providers[0]

    @property
    def provider_threads(self) -> dict[str, int]:
        """Thread counts given to providers through their options (e.g. XNNPACK's intra_op_num_threads)."""
        found = {}
        for name, options in zip(self.providers, self.provider_options):
            for key, value in options.items():
                if "threads" in key and value.isdigit():
                    found[name] = int(value)
        return found

    def describe(self) -> dict:
        """The plan as JSON-ready figures."""
        return {
            "providers": list(self.providers),
            "lead": self.lead,
            "missing": list(self.missing),
            "intra_op_threads": self.intra_op_threads,
            "inter_op_threads": self.inter_op_threads,
            "provider_threads": self.provider_threads,
            "session_config": dict(self.session_config),
        }

    def summary(self) -> str:
        """One line: e.g. ``CPUExecutionProvider, 4 intra-op threads``."""
        return execution_summary(self.describe())


def execution_summary(execution: dict) -> str:
    """A ``SessionPlan.describe()`` document in words: the leading provider and the threads in effect."""
    extra = "".join(
        f", {p} {n} threads" for p, n in execution["provider_threads"].items() if p in execution["providers"]
    )
    return f"{execution['lead']}, {execution['intra_op_threads']} intra-op threads{extra}"


def plan_session(profile: DeviceProfile, available: Iterable[str], variant_sha256: str | None = None) -> SessionPlan:
    """The session plan for ``profile`` given the providers this onnxruntime build has (``available``): the
    profile's providers that are present, in order, CPU last; ``[execution.when.<lead>]`` applied for the one that
    leads; a TensorRT engine folder per variant when the profile names an ``engine_cache``."""
    ex = profile.execution
    have = set(available)
    chosen = [p for p in ex.providers if p in have]
    missing = tuple(p for p in ex.providers if p not in have)
    if CPU not in chosen:
        chosen.append(CPU)
    options = [{k: str(v) for k, v in ex.provider_options.get(p, {}).items()} for p in chosen]
    overrides = ex.when.get(chosen[0], ProviderOverrides())
    engine_dir = None
    if TENSORRT in chosen and ex.engine_cache and variant_sha256:
        cache = Path(ex.engine_cache).expanduser()
        engine_dir = str(cache / variant_sha256)
        options[chosen.index(TENSORRT)].update(
            trt_engine_cache_enable="True",
            trt_engine_cache_path=engine_dir,
            trt_timing_cache_enable="True",
            trt_timing_cache_path=str(cache),
        )
    return SessionPlan(
        providers=tuple(chosen),
        provider_options=tuple(options),
        missing=missing,
        intra_op_threads=int(ex.intra_op_threads if overrides.intra_op_threads is None else overrides.intra_op_threads),
        inter_op_threads=ex.inter_op_threads if overrides.inter_op_threads is None else overrides.inter_op_threads,
        session_config={**ex.session_config, **overrides.session_config},
        engine_dir=engine_dir,
    )


def _half_available_mb() -> int:
    import psutil

    return int(psutil.virtual_memory().available / 2 / 2**20)


def parse_profile(document: dict, source: str) -> DeviceProfile:
    """Validate a parsed TOML document and build the profile, with "auto" values resolved on this machine."""
    p = load(DeviceProfile, document, source=source, error=ProfileError)
    ex, sv = p.execution, p.serving
    for name in ex.when:  # a misspelt provider here would silently never apply
        if name not in ex.providers and name != CPU:
            raise ProfileError(
                f"{source}: [execution.when.{name}] names a provider not in execution.providers "
                f"({', '.join(ex.providers)})"
            )
    execution = dataclasses.replace(
        ex,
        intra_op_threads=os.cpu_count() or 1 if ex.intra_op_threads == "auto" else ex.intra_op_threads,
        provider_options={k: {o: str(v) for o, v in opts.items()} for k, opts in ex.provider_options.items()},
    )
    serving = dataclasses.replace(
        sv, memory_budget_mb=_half_available_mb() if sv.memory_budget_mb == "auto" else sv.memory_budget_mb
    )
    profile = dataclasses.replace(p, name=p.name or Path(source).stem, execution=execution, serving=serving)
    object.__setattr__(profile, "source", source)
    return profile


def load_profile_file(path: str | os.PathLike) -> DeviceProfile:
    return parse_profile(read_toml(path, error=ProfileError, what="device profile file"), str(path))
