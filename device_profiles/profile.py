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
    format = "qdq"                # qoperator | qdq | dynamic | auto (time them on this machine, keep the fastest)
    activations = "int8"          # uint8 | int8
    per_channel = true
    reduce_range = false          # 7-bit weights: x86 without VNNI, where u8 x s8 products can saturate

    [limits]                      # what a portfolio, image or file may cost this device before it is refused
    variant_mb = 512              # the largest variant inflated in memory
    max_variants = 64
    max_nodes = 20000             # per variant, subgraphs included
    max_initializers = 20000
    memory_mb = 1536              # what loading and running one variant may add, in its vetting process
    load_seconds = 60.0           # a variant's session made and run once, at most
    run_seconds = 10.0            # one warm-up call, at most
    image_megapixels = 40.0       # an image's pixels, checked before it is decoded
    file_mb = 16                  # a bench result or load trace, checked before it is parsed

Every key, its default and its help are stated once, in the dataclasses below; ``edgeshift.core.config`` loads
them, so an unknown key, a value of the wrong type or out of range is an error naming the file and the key.

A profile comes from somewhere else, like a portfolio, so what reaches ONNX Runtime from it is an allow-list:
session config entries (``SESSION_CONFIG``), providers and their options (``PROVIDER_OPTIONS``), each value
checked; some entries ONNX Runtime knows name files or folders it then reads. Torch-free.
"""

from __future__ import annotations

import dataclasses
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Literal, Union

from edgeshift.core.config import load, read_toml, setting
from edgeshift.core.errors import ProfileError

GraphOptimization = Literal["disable", "basic", "extended", "all"]
ExecutionMode = Literal["sequential", "parallel"]
OptionValue = Union[str, int, float, bool]


def max_threads() -> int:
    """The most threads a profile may ask for here: a few per core (a profile written for a larger device still
    loads), never the tens of thousands that make ONNX Runtime's thread pool crash the process."""
    return max(8, 4 * (os.cpu_count() or 1))


_BOOL = ("0", "1")
_TRUE_FALSE = ("True", "False", "true", "false", "1", "0")

# Session config entries a profile may set, and the values each may take. ONNX Runtime has many more; some name
# files or folders it then reads (external initializers, compiled-model caches), so anything else is refused.
SESSION_CONFIG: dict[str, tuple[str, ...]] = {
    "session.intra_op.allow_spinning": _BOOL,
    "session.inter_op.allow_spinning": _BOOL,
    "session.force_spinning_stop": _BOOL,
    "session.set_denormal_as_zero": _BOOL,
    "session.disable_prepacking": _BOOL,
    "session.qdqisint8allowed": _BOOL,
    "session.disable_quant_qdq": _BOOL,
    "session.enable_quant_qdq_cleanup": _BOOL,
    "session.disable_cpu_ep_fallback": _BOOL,
    "mlas.enable_gemm_fastmath_arm64_bfloat16": _BOOL,
}


def _count(maximum: int) -> Callable[[str], bool]:
    return lambda v: v.isdigit() and len(v) <= 20 and int(v) <= maximum


def _one_of(*choices: str) -> Callable[[str], bool]:
    return lambda v: v in choices


_THREADS = "threads"  # checked against max_threads() when the profile is loaded
# Providers a profile may name, and the options each may be given (a check of the value as a string). Options
# that name files (TensorRT's caches: the kit sets those from engine_cache, per variant; QNN's backend library;
# calibration tables) are not among them.
PROVIDER_OPTIONS: dict[str, dict[str, Callable[[str], bool] | str]] = {
    "CPUExecutionProvider": {},
    "XnnpackExecutionProvider": {"intra_op_num_threads": _THREADS},
    "CUDAExecutionProvider": {
        "device_id": _count(64),
        "gpu_mem_limit": _count(2**50),
        "arena_extend_strategy": _one_of("kNextPowerOfTwo", "kSameAsRequested"),
        "cudnn_conv_algo_search": _one_of("EXHAUSTIVE", "HEURISTIC", "DEFAULT"),
        "do_copy_in_default_stream": _one_of(*_TRUE_FALSE),
    },
    "TensorrtExecutionProvider": {
        "device_id": _count(64),
        "trt_max_workspace_size": _count(2**50),
        "trt_fp16_enable": _one_of(*_TRUE_FALSE),
        "trt_builder_optimization_level": _count(5),
        "trt_max_partition_iterations": _count(10_000),
        "trt_min_subgraph_size": _count(10_000),
    },
    "OpenVINOExecutionProvider": {"device_type": _one_of("CPU", "GPU", "NPU"), "num_of_threads": _THREADS},
    "CoreMLExecutionProvider": {},
    "NnapiExecutionProvider": {},
    "ACLExecutionProvider": {},
    "ArmNNExecutionProvider": {},
    "DnnlExecutionProvider": {},
}


def _providers(value: tuple[str, ...]) -> str | None:
    if not value:
        return "must be a non-empty list of provider names"
    unknown = [p for p in value if p not in PROVIDER_OPTIONS]
    if unknown:
        return f"names {unknown[0]!r}, not a provider this kit knows ({', '.join(PROVIDER_OPTIONS)})"
    return None


def _session_config(value: dict[str, str]) -> str | None:
    for key, v in value.items():
        if key not in SESSION_CONFIG:
            return f"has {key!r}, not an entry a profile may set ({', '.join(SESSION_CONFIG)})"
        if v not in SESSION_CONFIG[key]:
            return f"has {key} = {v!r}; expected one of {', '.join(SESSION_CONFIG[key])}"
    return None


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
    session_config: dict[str, str] = setting(
        {}, "ORT session config entries, added to [execution]'s (an allow-list)", check=_session_config
    )


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
    session_config: dict[str, str] = setting(
        {}, f"ORT session config entries, only these: {', '.join(SESSION_CONFIG)}", check=_session_config
    )
    provider_options: dict[str, dict[str, OptionValue]] = setting(
        {}, "provider name -> its options (an allow-list per provider)"
    )
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
    batch_size: int = setting(1, "requests per inference call", minimum=1, maximum=1024)
    latency_target_ms: float = setting(100.0, "the p95 the latency-slo policy aims for", minimum=0, maximum=1e6)
    memory_budget_mb: Union[int, Literal["auto"]] = setting(
        1024, "what the runtime may use for sessions; 'auto': half the available memory", minimum=0, maximum=2**24
    )
    preload_neighbours: bool = setting(False, "keep the neighbours' sessions warm for sub-ms switches")
    switch_cpu_share: float = setting(
        0.25, "while serving, a switch up inflates this share of the time, resting between pieces", check=_share
    )
    switch_every_windows: int = setting(
        5,
        "a speed policy switches at most once per this many decision windows (hysteresis: steady load does not "
        "flip it)",
        minimum=1,
        maximum=10_000,
    )


@dataclass(frozen=True)
class BenchmarkSettings:
    warmup: int = setting(10, "untimed calls before timing", minimum=0, maximum=10_000)
    iterations: int = setting(100, "timed calls at most", minimum=1, maximum=1_000_000)
    max_seconds: float = setting(20.0, "per variant, at most", minimum=0, maximum=3600)
    rounds: int = setting(
        5, "interleaved timing rounds when variants are compared (noise = spread of rounds)", minimum=1, maximum=1000
    )
    ladder_min_gain: float = setting(
        0.10,
        "a ladder step down must be at least this much faster (relative p50), and faster in every interleaved "
        "round (bar one from 4 rounds on)",
        check=lambda v: None if 0 <= v < 1 else "must be in [0, 1)",
    )


QuantFormat = Literal["qoperator", "qdq", "dynamic", "auto"]
ActivationType = Literal["uint8", "int8"]


@dataclass(frozen=True)
class QuantizationSettings:
    format: QuantFormat = setting(
        "qdq",
        "INT8 model format: qoperator (QLinearConv; fastest on x86 with VNNI), qdq (Quantize/DequantizeLinear "
        "pairs; ORT's default, ARM and TensorRT), dynamic (MatMul weights only, activations quantized per call: "
        "transformers), auto (build the candidates, time them on this machine, keep the fastest)",
    )
    activations: ActivationType = setting(
        "int8",
        "activation type: uint8 or int8 (weights are int8); ignored by format auto, which tries "
        "qoperator+uint8 and qdq+int8",
    )
    per_channel: bool = setting(True, "one weight scale per output channel")
    reduce_range: Union[bool, Literal["auto"]] = setting(
        False,
        "7-bit weights, for x86 CPUs without VNNI where u8 x s8 products saturate; 'auto': from this machine's CPU "
        "flags (true on x86 without AVX-512 VNNI or AVX-VNNI, false elsewhere)",
    )
    min_agreement: float = setting(
        0.97,
        "an INT8 variant whose top-1 agrees with its FP32 source on less than this share of the held-out images is "
        "made again with the other reduce_range, and dropped if that does not reach it either",
        check=lambda v: None if 0 <= v <= 1 else "must be in [0, 1]",
    )


@dataclass(frozen=True)
class LimitsSettings:
    """What untrusted input may cost this device before it is refused: every bound is checked before the work it
    bounds (a size before inflating or parsing, a pixel count before decoding, a graph's counts before ONNX Runtime
    sees it), and loading a variant runs in a process of its own under ``memory_mb`` and ``load_seconds``."""

    variant_mb: int = setting(512, "the largest variant inflated in memory (MB)", minimum=1, maximum=2047)
    max_variants: int = setting(64, "variants in one portfolio, at most", minimum=1, maximum=1024)
    max_nodes: int = setting(20_000, "operators in one variant, subgraphs included", minimum=1, maximum=1_000_000)
    max_initializers: int = setting(20_000, "weights in one variant", minimum=1, maximum=1_000_000)
    memory_mb: int = setting(
        1536, "what loading and running one variant may add to its vetting process (MB)", minimum=64, maximum=2**20
    )
    load_seconds: float = setting(60.0, "one variant's session made and run once, at most", minimum=1, maximum=3600)
    run_seconds: float = setting(10.0, "one warm-up call, at most", minimum=0.1, maximum=600)
    image_megapixels: float = setting(40.0, "an image's pixels, checked before decoding", minimum=0.01, maximum=1000)
    file_mb: int = setting(16, "a bench result or load trace, checked before parsing (MB)", minimum=1, maximum=1024)


@dataclass(frozen=True)
class DeviceProfile:
    name: str = setting("", "the profile's name (default: the file's stem)")
    description: str = setting("", "the device, in words")
    machine: str = setting(
        "",
        "the device's CPU architecture as Python names it (aarch64, x86_64); empty: whatever machine runs it. A "
        "portfolio built elsewhere for it keeps its INT8 variants untimed, for the device's own bench to decide",
    )
    execution: ExecutionSettings = dataclasses.field(default_factory=ExecutionSettings)
    serving: ServingSettings = dataclasses.field(default_factory=ServingSettings)
    benchmark: BenchmarkSettings = dataclasses.field(default_factory=BenchmarkSettings)
    quantization: QuantizationSettings = dataclasses.field(default_factory=QuantizationSettings)
    limits: LimitsSettings = dataclasses.field(default_factory=LimitsSettings)
    source: str = dataclasses.field(default="", init=False)  # the file it came from


VNNI_FLAGS = ("avx512_vnni", "avx_vnni")  # /proc/cpuinfo's names for the u8 x s8 dot-product instructions


def cpu_flags(cpuinfo: str) -> set[str]:
    """The flags of the first processor in a ``/proc/cpuinfo`` text (x86: ``flags``; ARM: ``Features``)."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def needs_reduce_range(machine: str, flags: set[str]) -> bool:
    """Whether INT8 weights should use 7 bits on this CPU: on x86 without VNNI, ONNX Runtime's u8 x s8 kernels
    (vpmaddubsw) add pairs of products into int16, which saturates; with VNNI (or on ARM) they do not."""
    x86 = machine.lower() in ("x86_64", "amd64", "i386", "i686", "x86")
    return x86 and not any(f in flags for f in VNNI_FLAGS)


def this_machine_needs_reduce_range() -> bool:
    """``needs_reduce_range`` for the machine this runs on (``/proc/cpuinfo``; elsewhere: no flags known, so on
    x86 the safe setting, 7-bit weights)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            flags = cpu_flags(f.read(1 << 20))
    except OSError:
        flags = set()
    return needs_reduce_range(platform.machine(), flags)


_MACHINE_NAMES = {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64", "armv8": "aarch64"}


def cross_built(profile: DeviceProfile, here: str | None = None) -> bool:
    """The profile names a CPU architecture other than this machine's: what is timed here is not the device's."""
    if not profile.machine:
        return False
    here = (here or platform.machine()).lower()
    return _MACHINE_NAMES.get(profile.machine.lower(), profile.machine.lower()) != _MACHINE_NAMES.get(here, here)


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
    _check_threads(ex, source)
    _check_provider_options(ex.provider_options, source)
    execution = dataclasses.replace(
        ex,
        intra_op_threads=os.cpu_count() or 1 if ex.intra_op_threads == "auto" else ex.intra_op_threads,
        provider_options={k: {o: str(v) for o, v in opts.items()} for k, opts in ex.provider_options.items()},
    )
    serving = dataclasses.replace(
        sv, memory_budget_mb=_half_available_mb() if sv.memory_budget_mb == "auto" else sv.memory_budget_mb
    )
    q = p.quantization
    quantization = dataclasses.replace(
        q, reduce_range=this_machine_needs_reduce_range() if q.reduce_range == "auto" else q.reduce_range
    )
    profile = dataclasses.replace(
        p, name=p.name or Path(source).stem, execution=execution, serving=serving, quantization=quantization
    )
    object.__setattr__(profile, "source", source)
    return profile


def _check_threads(ex: ExecutionSettings, source: str) -> None:
    most = max_threads()
    counts: dict[str, object] = {
        "execution.intra_op_threads": ex.intra_op_threads,
        "execution.inter_op_threads": ex.inter_op_threads,
    }
    for name, o in ex.when.items():
        counts[f"execution.when.{name}.intra_op_threads"] = o.intra_op_threads
        counts[f"execution.when.{name}.inter_op_threads"] = o.inter_op_threads
    for where, n in counts.items():
        if isinstance(n, int) and n > most:
            raise ProfileError(
                f"{source}: {where} = {n} is more than {most} (4 per core of this machine's {os.cpu_count()})"
            )


def _check_provider_options(options: dict[str, dict[str, OptionValue]], source: str) -> None:
    for provider, opts in options.items():
        if provider not in PROVIDER_OPTIONS:
            raise ProfileError(
                f"{source}: execution.provider_options names {provider!r}, not a provider this kit knows"
            )
        allowed = PROVIDER_OPTIONS[provider]
        for key, value in opts.items():
            where = f"execution.provider_options.{provider}.{key}"
            if key not in allowed:
                known = ", ".join(allowed) or "none"
                raise ProfileError(f"{source}: {where} is not an option a profile may set (for {provider}: {known})")
            check, text = allowed[key], str(value).strip()
            ok = _count(max_threads())(text) if check == _THREADS else callable(check) and check(text)
            if not ok:
                raise ProfileError(f"{source}: {where} = {value!r} is not a valid value")


def load_profile_file(path: str | os.PathLike) -> DeviceProfile:
    return parse_profile(read_toml(path, error=ProfileError, what="device profile file"), str(path))
