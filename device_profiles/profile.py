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

An unknown key or a value of the wrong type is an error naming the file and the key. Torch-free.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 devices
    import tomli as tomllib

from runtime.errors import ProfileError

OPT_LEVELS = ("disable", "basic", "extended", "all")
EXEC_MODES = ("sequential", "parallel")


@dataclass(frozen=True)
class ExecutionSettings:
    providers: tuple[str, ...] = ("CPUExecutionProvider",)  # in order of preference
    intra_op_threads: int = 1  # threads inside one operator (0 lets ORT choose)
    inter_op_threads: int = 1  # threads across operators (parallel mode only)
    graph_optimization: str = "all"  # ORT graph optimisation level
    execution_mode: str = "sequential"
    session_config: dict = field(default_factory=dict)  # ORT session config entries (str -> str)
    provider_options: dict = field(default_factory=dict)  # provider name -> {option: value}


@dataclass(frozen=True)
class ServingSettings:
    batch_size: int = 1  # requests per inference call
    latency_target_ms: float = 100.0  # the p95 the latency-slo policy aims for
    memory_budget_mb: int = 1024  # what the runtime may use for sessions
    preload_neighbours: bool = False  # keep the neighbours' sessions warm for sub-ms switches
    switch_cpu_share: float = 0.25  # while serving, a switch up inflates this share of the time, resting between


@dataclass(frozen=True)
class BenchmarkSettings:
    warmup: int = 10  # untimed calls before timing
    iterations: int = 100  # timed calls at most
    max_seconds: float = 20.0  # per variant, at most


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    description: str
    execution: ExecutionSettings
    serving: ServingSettings
    benchmark: BenchmarkSettings
    source: str = ""  # the file it came from


_SCHEMA: dict[str, dict[str, Any]] = {
    "": {"name": str, "description": str, "execution": dict, "serving": dict, "benchmark": dict},
    "execution": {"providers": list, "intra_op_threads": (int, "auto"), "inter_op_threads": int,
                  "graph_optimization": OPT_LEVELS, "execution_mode": EXEC_MODES, "session_config": dict,
                  "provider_options": dict},
    "serving": {"batch_size": int, "latency_target_ms": (int, float), "memory_budget_mb": (int, "auto"),
                "preload_neighbours": bool, "switch_cpu_share": (int, float)},
    "benchmark": {"warmup": int, "iterations": int, "max_seconds": (int, float)},
}


def _check(table: dict, section: str, source: str) -> None:
    schema = _SCHEMA[section]
    for key, value in table.items():
        where = f"{section}.{key}" if section else key
        if key not in schema:
            raise ProfileError(f"{source}: unknown key {where!r}; known in [{section or 'top level'}]: "
                               f"{', '.join(sorted(schema))}")
        rule = schema[key]
        if isinstance(rule, tuple) and all(isinstance(r, str) for r in rule):
            if value not in rule:
                raise ProfileError(f"{source}: {where} = {value!r}; expected one of {', '.join(rule)}")
            continue
        kinds = tuple(r for r in (rule if isinstance(rule, tuple) else (rule,)) if isinstance(r, type))
        words = tuple(r for r in (rule if isinstance(rule, tuple) else ()) if isinstance(r, str))
        ok = (isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)) or value in words
        if not ok:
            want = " or ".join([k.__name__ for k in kinds] + [repr(w) for w in words])
            raise ProfileError(f"{source}: {where} must be {want}, got {type(value).__name__} {value!r}")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
            raise ProfileError(f"{source}: {where} must be >= 0, got {value}")


def _resolve_auto(value, auto):
    return auto() if value == "auto" else value


def parse_profile(data: dict, source: str) -> DeviceProfile:
    """Validate a parsed TOML document and build the profile."""
    _check(data, "", source)
    for section in ("execution", "serving", "benchmark"):
        _check(data.get(section, {}), section, source)
    ex = dict(data.get("execution", {}))
    providers = ex.get("providers", ["CPUExecutionProvider"])
    if not providers or not all(isinstance(p, str) for p in providers):
        raise ProfileError(f"{source}: execution.providers must be a non-empty list of provider names")
    if any(not isinstance(v, str) for v in ex.get("session_config", {}).values()):
        raise ProfileError(f"{source}: execution.session_config values must be strings")
    for prov, opts in ex.get("provider_options", {}).items():
        if not isinstance(opts, dict):
            raise ProfileError(f"{source}: execution.provider_options.{prov} must be a table")
    sv = dict(data.get("serving", {}))
    bm = dict(data.get("benchmark", {}))
    if bm.get("iterations", 1) < 1:
        raise ProfileError(f"{source}: benchmark.iterations must be >= 1")
    if sv.get("batch_size", 1) < 1:
        raise ProfileError(f"{source}: serving.batch_size must be >= 1")
    if not 0 < sv.get("switch_cpu_share", 0.25) <= 1:
        raise ProfileError(f"{source}: serving.switch_cpu_share must be in (0, 1] (1 = switch at full speed), got "
                           f"{sv['switch_cpu_share']}")
    execution = ExecutionSettings(
        providers=tuple(providers),
        intra_op_threads=int(_resolve_auto(ex.get("intra_op_threads", 1), lambda: os.cpu_count() or 1)),
        inter_op_threads=int(ex.get("inter_op_threads", 1)),
        graph_optimization=ex.get("graph_optimization", "all"),
        execution_mode=ex.get("execution_mode", "sequential"),
        session_config=dict(ex.get("session_config", {})),
        provider_options={k: {o: str(v) for o, v in opts.items()} for k, opts in ex.get("provider_options", {}).items()},
    )
    serving = ServingSettings(
        batch_size=int(sv.get("batch_size", 1)),
        latency_target_ms=float(sv.get("latency_target_ms", 100.0)),
        memory_budget_mb=int(_resolve_auto(sv.get("memory_budget_mb", 1024), _half_available_mb)),
        preload_neighbours=bool(sv.get("preload_neighbours", False)),
        switch_cpu_share=float(sv.get("switch_cpu_share", 0.25)),
    )
    benchmark = BenchmarkSettings(int(bm.get("warmup", 10)), int(bm.get("iterations", 100)),
                                  float(bm.get("max_seconds", 20.0)))
    return DeviceProfile(data.get("name", Path(source).stem), data.get("description", ""), execution, serving,
                         benchmark, source)


def _half_available_mb() -> int:
    import psutil

    return int(psutil.virtual_memory().available / 2 / 2 ** 20)


def load_profile_file(path: str | os.PathLike) -> DeviceProfile:
    path = Path(path)
    if not path.is_file():
        raise ProfileError(f"device profile file not found: {path}")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ProfileError(f"{path}: not valid TOML ({exc})") from None
    return parse_profile(data, str(path))
