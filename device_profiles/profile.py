"""Device profiles: how to run ONNX Runtime on one kind of device, loaded from TOML with strict validation.

A profile file::

    name = "rpi4"
    description = "..."

    [execution]
    providers = ["XnnpackExecutionProvider", "CPUExecutionProvider"]  # in order of preference
    intra_op_threads = 1          # int, or "auto" (the machine's cores)
    inter_op_threads = 1
    graph_optimization = "all"    # disable | basic | extended | all
    execution_mode = "sequential" # sequential | parallel
    session_config = { "session.intra_op.allow_spinning" = "0" }

    [execution.provider_options.XnnpackExecutionProvider]
    intra_op_num_threads = 4      # options passed to that provider, values as strings or numbers

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
from typing import Literal, Union

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
        "a ladder step down must be at least this much faster (relative p50) and beyond the round spread",
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


def _half_available_mb() -> int:
    import psutil

    return int(psutil.virtual_memory().available / 2 / 2**20)


def parse_profile(document: dict, source: str) -> DeviceProfile:
    """Validate a parsed TOML document and build the profile, with "auto" values resolved on this machine."""
    p = load(DeviceProfile, document, source=source, error=ProfileError)
    ex, sv = p.execution, p.serving
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
