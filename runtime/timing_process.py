"""Interleaved timing in a process of its own, on one ONNX Runtime thread pool. Torch-free.

Why: each ONNX Runtime session has its own intra-op thread pool, and while one session is timed the others' worker
threads go to sleep. A pool that slept runs at about one thread's speed for its first tens of milliseconds, so when
several sessions take turns (``time_interleaved``) each turn starts slow and small graphs time up to a third slower
than alone, and copies of one graph up to 1.3x apart (``benchmarks/thread_pools.py``, BENCHMARKS.md). One pool for
the whole process keeps its workers busy across turns and times every session at its lone speed. ORT sizes that
pool once per process, before the first session, and then refuses any session with a pool of its own, so the
timing runs in a fresh Python process started for it: the caller keeps its own sessions and thread counts.

The child gets the profile, the timing settings and every graph with its input over a pipe (JSON and raw bytes;
nothing is pickled) and answers with one JSON line. Where no Python process can be started (an emulator without
binfmt, a frozen interpreter), the graphs are timed here on per-session pools, with one warning, and the results
say so (``LatencyStats.thread_pool``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import subprocess
import sys
import tempfile
import warnings
from dataclasses import dataclass
from typing import IO, Callable, Mapping, Sequence

import numpy as np

from edgeshift.core.errors import EdgeshiftError

from .measure import LatencyStats, time_interleaved

__all__ = ["Graph", "TimingSettings", "TimingError", "time_graphs", "SHARED", "PER_SESSION"]

SHARED = "shared"  # one pool for every session, in a process of its own
PER_SESSION = "per-session"  # each session its own pool, in the caller's process (the fallback)
_CANNOT_EXECUTE = (126, 127)  # the shell's codes for "found but not executable" and "not found"
# The child imports edgeshift from where this process did: this process's sys.path, in order, as its PYTHONPATH.
_CHILD = "import sys; from edgeshift.runtime.timing_process import _main; sys.exit(_main())"
_warned: set[tuple[str, ...]] = set()  # interpreter commands already said to fail


class TimingError(EdgeshiftError):
    """The timing process failed on the graphs it was given (not: could not be started)."""


@dataclass(frozen=True)
class Graph:
    """One ONNX model to time and the input it is timed on."""

    model: bytes  # the serialized ONNX model
    feed: Mapping[str, np.ndarray]  # input name -> array
    variant_sha256: str | None = None  # names the variant's engine folder where the profile caches engines


@dataclass(frozen=True)
class TimingSettings:
    """How long and how the graphs are timed (``time_interleaved``'s arguments)."""

    warmup: int = 10  # untimed calls per graph before timing
    iterations: int = 100  # timed calls per graph
    rounds: int = 5  # interleaved rounds; the order rotates each round
    max_seconds: float | None = None  # each graph's timed total, at most
    batch: int = 1  # items per call, for the throughput

    @classmethod
    def of_profile(cls, profile, batch: int) -> TimingSettings:
        """The profile's ``[benchmark]`` warm-up, iterations, rounds and time cap."""
        b = profile.benchmark
        return cls(b.warmup, b.iterations, b.rounds, b.max_seconds, batch)


def time_graphs(
    graphs: Mapping[str, Graph],
    profile,
    settings: TimingSettings,
    *,
    python: Sequence[str] | None = None,
) -> dict[str, LatencyStats]:
    """Time every graph against the others in one interleaved run under ``profile``, in a fresh process whose
    sessions share one thread pool sized by the profile. ``python``: the interpreter command (default: this one).

    Raises ``TimingError`` (one line) when the timing process fails on the graphs; times here, on per-session pools,
    where no process can be started."""
    if not graphs:
        return {}
    command = [*(python or [sys.executable]), "-c", _CHILD]
    header = {
        "profile": _profile_document(profile),
        "settings": dataclasses.asdict(settings),
        "graphs": [
            {
                "name": name,
                "model_bytes": len(g.model),
                "variant_sha256": g.variant_sha256,
                "feed": [
                    {"name": k, "dtype": str(np.asarray(v).dtype), "shape": list(np.shape(v))}
                    for k, v in g.feed.items()
                ],
            }
            for name, g in graphs.items()
        ],
    }
    with tempfile.TemporaryFile() as err:
        try:
            proc = subprocess.Popen(
                command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, env=_child_env()
            )
        except OSError as e:
            return _time_here(graphs, profile, settings, command, f"{command[0]}: {e.strerror or e}")
        try:
            answer = _exchange(proc, header, graphs)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if proc.returncode in _CANNOT_EXECUTE and answer is None:
            return _time_here(graphs, profile, settings, command, f"{command[0]} exited with {proc.returncode}")
        if answer is None or "error" in answer:
            err.seek(0)
            lines = err.read().decode(errors="replace").strip().splitlines()
            why = answer["error"] if answer else (lines[-1] if lines else f"exit status {proc.returncode}")
            raise TimingError(f"timing process failed: {why}")
    return {name: LatencyStats.from_dict(doc) for name, doc in answer["stats"].items()}


def _child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}


def _exchange(proc: subprocess.Popen, header: dict, graphs: Mapping[str, Graph]) -> dict | None:
    """Send the request, read the one-line answer (None: the process ended without one)."""
    assert proc.stdin is not None and proc.stdout is not None
    try:
        proc.stdin.write(json.dumps(header).encode() + b"\n")
        for g in graphs.values():
            proc.stdin.write(g.model)
            for v in g.feed.values():
                proc.stdin.write(np.ascontiguousarray(v).tobytes())
        proc.stdin.close()
    except BrokenPipeError:  # it ended early: its exit status and stderr say why
        pass
    out = proc.stdout.read()
    proc.wait()
    last = out.strip().splitlines()[-1:] if out.strip() else []
    try:
        return json.loads(last[0]) if last else None
    except json.JSONDecodeError:
        return None


def _profile_document(profile) -> dict:
    doc = dataclasses.asdict(profile)
    doc.pop("source", None)
    return doc


def _time_here(
    graphs: Mapping[str, Graph], profile, settings: TimingSettings, command: list[str], why: str
) -> dict[str, LatencyStats]:
    """The fallback: every graph timed in this process, each session on its own pool; said once per interpreter."""
    if tuple(command) not in _warned:
        _warned.add(tuple(command))
        warnings.warn(
            f"could not start a timing process ({why}); timing in this process on per-session thread pools, where "
            "copies of a small graph can time up to 1.3x apart",
            RuntimeWarning,
            stacklevel=3,
        )
    from .session import create_session

    sessions = {name: create_session(g.model, profile, g.variant_sha256) for name, g in graphs.items()}
    return _time_sessions(sessions, {name: g.feed for name, g in graphs.items()}, settings, PER_SESSION)


def _time_sessions(
    sessions: dict, feeds: Mapping[str, Mapping[str, np.ndarray]], settings: TimingSettings, pool: str
) -> dict[str, LatencyStats]:
    calls: dict[str, Callable[[], object]] = {
        name: functools.partial(s.run, None, dict(feeds[name])) for name, s in sessions.items()
    }
    stats = time_interleaved(
        calls,
        warmup=settings.warmup,
        iterations=settings.iterations,
        rounds=settings.rounds,
        max_seconds=settings.max_seconds,
        batch=settings.batch,
    )
    return {name: dataclasses.replace(s, thread_pool=pool) for name, s in stats.items()}


def _read_exactly(stream: IO[bytes], n: int) -> bytes:
    data = stream.read(n)
    if len(data) != n:
        raise TimingError(f"the request ended early: {len(data)} of {n} bytes")
    return data


def _serve(stdin: IO[bytes]) -> dict:
    """The child's side: read the request, build the sessions on one pool, time them; the answer as a document."""
    import onnxruntime as ort
    from edgeshift.device_profiles.profile import parse_profile

    from .session import create_session, session_plan

    header = json.loads(stdin.readline())
    profile = parse_profile(header["profile"], header["profile"].get("name") or "profile")
    settings = TimingSettings(**header["settings"])
    threads = session_plan(profile)
    ort.set_global_thread_pool_sizes(threads.intra_op_threads, threads.inter_op_threads)  # before any session
    sessions, feeds = {}, {}
    for spec in header["graphs"]:  # each model's bytes go once its session is made: sessions and feeds stay
        name, model = spec["name"], _read_exactly(stdin, spec["model_bytes"])
        feed = {}
        for f in spec["feed"]:
            dtype = np.dtype(f["dtype"])
            size = int(np.prod(f["shape"], dtype=np.int64)) * dtype.itemsize
            feed[f["name"]] = np.frombuffer(_read_exactly(stdin, size), dtype).reshape(f["shape"])
        feeds[name] = feed
        try:  # made and run once on its feed, so a graph or feed ORT refuses is named here, in one line
            sessions[name] = create_session(model, profile, spec["variant_sha256"], shared_pool=True)
            sessions[name].run(None, feed)
        except Exception as e:  # noqa: BLE001 - ORT's own error classes
            raise TimingError(f"graph {name!r}: {' '.join(str(e).split()) or type(e).__name__}") from e
    stats = _time_sessions(sessions, feeds, settings, SHARED)
    return {"stats": {name: s.to_dict() for name, s in stats.items()}}


def _main() -> int:
    try:
        answer = _serve(sys.stdin.buffer)
    except (TimingError, EdgeshiftError) as e:
        answer = {"error": str(e)}
    except (ValueError, KeyError, json.JSONDecodeError) as e:
        answer = {"error": f"malformed timing request: {e}"}
    sys.stdout.write(json.dumps(answer) + "\n")
    sys.stdout.flush()
    return 1 if "error" in answer else 0


if __name__ == "__main__":
    sys.exit(_main())
