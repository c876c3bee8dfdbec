"""Interleaved timing in a process of its own, on one ONNX Runtime thread pool. Torch-free.

Why: each ONNX Runtime session has its own intra-op thread pool, and while one session is timed the others' worker
threads go to sleep. A pool that slept runs at about one thread's speed for its first tens of milliseconds, so when
several sessions take turns (``time_interleaved``) each turn starts slow and small graphs time up to a third slower
than alone, and copies of one graph up to 1.3x apart (``benchmarks/thread_pools.py``, BENCHMARKS.md). One pool for
the whole process keeps its workers busy across turns and times every session at its lone speed. ORT sizes that
pool once per process, before the first session, and then refuses any session with a pool of its own, so the
timing runs in a fresh Python process started for it: the caller keeps its own sessions and thread counts.

The child gets the profile, the timing settings and every graph with its input over a pipe (JSON and raw bytes;
nothing is pickled), says when each graph's session is made and has run once, and answers with one JSON line.
Where no Python process can be started (an emulator without binfmt, a frozen interpreter), the graphs are timed
here on per-session pools, with one warning, and the results say so (``LatencyStats.thread_pool``).

The same process is where an untrusted graph is first loaded (``vet_graphs``: made and run once, not timed): it
runs under the profile's ``[limits]``, an address-space cap of ``memory_mb`` above what it holds once ONNX Runtime
is imported, and each graph ``load_seconds`` to be made and run once, after which it is killed. A graph that
exhausts memory, hangs session creation or its first call, or crashes ONNX Runtime is then one line naming it,
and the caller's process was never at risk.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from typing import IO, Callable, Mapping, Sequence

import numpy as np

from edgeshift.core.errors import EdgeshiftError

from .measure import LatencyStats, time_interleaved

__all__ = ["Graph", "TimingSettings", "TimingError", "time_graphs", "vet_graphs", "SHARED", "PER_SESSION"]

SHARED = "shared"  # one pool for every session, in a process of its own
PER_SESSION = "per-session"  # each session its own pool, in the caller's process (the fallback)
_CANNOT_EXECUTE = (126, 127)  # the shell's codes for "found but not executable" and "not found"
# The child imports edgeshift from where this process did: this process's sys.path, in order, as its PYTHONPATH.
_CHILD = "import sys; from edgeshift.runtime.timing_process import _main; sys.exit(_main())"
_warned: set[tuple[str, ...]] = set()  # interpreter commands already said to fail
_START_SECONDS = 60.0  # the child's own start (Python, numpy, ONNX Runtime imported), on a slow device


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
    kind: str = "graph",
) -> dict[str, LatencyStats]:
    """Time every graph against the others in one interleaved run under ``profile``, in a fresh process whose
    sessions share one thread pool sized by the profile and which runs under the profile's ``[limits]``.
    ``python``: the interpreter command (default: this one); ``kind``: what a graph is called in messages.

    Raises ``TimingError`` (one line, naming the graph) when the timing process fails on a graph, or a graph
    breaks a limit; times here, on per-session pools, where no process can be started."""
    if not graphs:
        return {}
    command = [*(python or [sys.executable]), "-c", _CHILD]
    header = {
        "profile": _profile_document(profile),
        "settings": dataclasses.asdict(settings),
        "kind": kind,
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
            return _time_here(graphs, profile, settings, command, f"{command[0]}: {e.strerror or e}", kind)
        try:
            answer, waiting_for = _exchange(proc, header, graphs, profile.limits, settings)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        if proc.returncode in _CANNOT_EXECUTE and answer is None and waiting_for == next(iter(graphs)):
            return _time_here(graphs, profile, settings, command, f"{command[0]} exited with {proc.returncode}", kind)
        if answer is None or "error" in answer or "stats" not in answer:
            err.seek(0)
            lines = err.read().decode(errors="replace").strip().splitlines()
            raise TimingError(_why(answer, proc.returncode, lines, waiting_for, profile.limits, kind))
    return {name: LatencyStats.from_dict(doc) for name, doc in answer["stats"].items()}


def vet_graphs(
    graphs: Mapping[str, Graph], profile, *, python: Sequence[str] | None = None, kind: str = "graph"
) -> None:
    """Make each graph's session and run it once on its feed, in a process of its own under the profile's
    ``[limits]`` (see the module's doc), timing nothing; raise ``TimingError`` naming the first graph that fails
    or breaks a limit. Where no process can be started, each is made and run once here, its call under a deadline."""
    time_graphs(graphs, profile, TimingSettings(warmup=0, iterations=0, rounds=1), python=python, kind=kind)


def _timing_deadline(settings: TimingSettings, graphs: int, limits) -> float:
    """Seconds the timing phase may take: each graph's warm-up and timed calls stop at ``max_seconds`` each (a
    call at most ``run_seconds`` past it); without ``max_seconds``, every call may take ``run_seconds``."""
    if settings.iterations == 0:
        return _START_SECONDS
    if settings.max_seconds is not None:
        per_graph = 2 * settings.max_seconds + (settings.rounds + 2) * limits.run_seconds
    else:
        per_graph = (settings.warmup + settings.iterations) * limits.run_seconds
    return graphs * per_graph + _START_SECONDS


def _why(answer: dict | None, code: int, stderr: list[str], waiting_for: str | None, limits, kind: str) -> str:
    """The one line a failed timing process comes to."""
    if answer is not None and "error" in answer:
        return str(answer["error"])
    if answer is not None and answer.get("timeout") == "start":
        return f"timing process did not start within {_START_SECONDS:g} s"
    if answer is not None and answer.get("timeout") == "timing":
        return "timing process failed: the timed calls ran past their deadline"
    if answer is not None and answer.get("timeout"):
        return (
            f"{kind} {waiting_for!r} was not made and run once within {limits.load_seconds:g} s "
            "(the profile's limits.load_seconds)"
        )
    where = f" while loading {kind} {waiting_for!r}" if waiting_for else ""
    if code < 0:
        name = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
        return f"timing process died of {name}{where}"
    return f"timing process failed{where}: {stderr[-1] if stderr else f'exit status {code}'}"


def _child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}


def _exchange(
    proc: subprocess.Popen, header: dict, graphs: Mapping[str, Graph], limits, settings: TimingSettings
) -> tuple[dict | None, str | None]:
    """Send the request (from a thread: the child reads it while it works), follow the child's progress under the
    deadlines, and read its one-line answer. Returns (answer or None, the graph it was loading when it ended or
    was stopped; None once all were loaded). An answer ``{"timeout": stage}`` means the child was stopped at that
    stage (``start``, ``load``, ``timing``)."""
    assert proc.stdin is not None and proc.stdout is not None
    stdin, stdout = proc.stdin, proc.stdout

    def send() -> None:
        try:
            stdin.write(json.dumps(header).encode() + b"\n")
            for g in graphs.values():
                stdin.write(g.model)
                for v in g.feed.values():
                    stdin.write(np.ascontiguousarray(v).tobytes())
            stdin.close()
        except (BrokenPipeError, OSError):  # it ended early: its exit status and stderr say why
            pass

    lines: queue.Queue[bytes | None] = queue.Queue()

    def receive() -> None:
        for line in iter(stdout.readline, b""):
            lines.put(line)
        lines.put(None)

    for target in (send, receive):
        threading.Thread(target=target, daemon=True).start()
    pending = list(graphs)
    deadline = time.monotonic() + _START_SECONDS  # until it says it is ready: then each graph has load_seconds
    ready, last = False, None
    while True:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            proc.kill()
            stage = "start" if not ready else "load" if pending else "timing"
            return {"timeout": stage}, pending[0] if pending and ready else None
        if line is None:
            proc.wait()
            return last, pending[0] if pending else None
        try:
            doc = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(doc, dict) and doc.get("ready") and not ready:
            ready, deadline = True, time.monotonic() + limits.load_seconds
        elif isinstance(doc, dict) and "loaded" in doc and pending:
            pending.pop(0)
            budget = limits.load_seconds if pending else _timing_deadline(settings, len(graphs), limits)
            deadline = time.monotonic() + budget
        else:
            last = doc if isinstance(doc, dict) else None


def _profile_document(profile) -> dict:
    doc = dataclasses.asdict(profile)
    doc.pop("source", None)
    return doc


def _time_here(
    graphs: Mapping[str, Graph], profile, settings: TimingSettings, command: list[str], why: str, kind: str
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
    from .session import create_session, one_line, run_bounded

    sessions = {}
    for name, g in graphs.items():
        try:
            sessions[name] = create_session(g.model, profile, g.variant_sha256)
        except Exception as e:  # noqa: BLE001 - ORT's own error classes
            raise TimingError(f"{kind} {name!r}: ONNX Runtime cannot load it: {one_line(e)}") from None
        run_bounded(sessions[name], dict(g.feed), profile.limits.run_seconds, f"{kind} {name!r}", error=TimingError)
    if settings.iterations == 0:
        return {}
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

    from .session import create_session, one_line, session_plan

    header = json.loads(stdin.readline())
    profile = parse_profile(header["profile"], header["profile"].get("name") or "profile")
    settings = TimingSettings(**header["settings"])
    kind = str(header.get("kind", "graph"))
    _cap_address_space(profile.limits.memory_mb)
    threads = session_plan(profile)
    ort.set_global_thread_pool_sizes(threads.intra_op_threads, threads.inter_op_threads)  # before any session
    _say({"ready": True})
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
        except MemoryError:
            raise TimingError(_out_of_memory(kind, name, profile.limits.memory_mb)) from None
        except Exception as e:  # noqa: BLE001 - ORT's own error classes
            if "alloc" in str(e).lower():  # std::bad_alloc, "Failed to allocate memory": the cap was reached
                raise TimingError(_out_of_memory(kind, name, profile.limits.memory_mb)) from None
            raise TimingError(f"{kind} {name!r}: ONNX Runtime cannot load or run it: {one_line(e)}") from e
        del model
        _say({"loaded": name})
    if settings.iterations == 0:
        return {"stats": {}}
    stats = _time_sessions(sessions, feeds, settings, SHARED)
    return {"stats": {name: s.to_dict() for name, s in stats.items()}}


def _say(doc: dict) -> None:
    """One progress line to the caller, which holds each step to its deadline."""
    sys.stdout.write(json.dumps(doc) + "\n")
    sys.stdout.flush()


def _out_of_memory(kind: str, name: str, memory_mb: int) -> str:
    return f"{kind} {name!r} needs more than the {memory_mb} MB the profile allows to load and run (limits.memory_mb)"


def _cap_address_space(memory_mb: int) -> None:
    """Let this process's address space grow by at most ``memory_mb`` from here (ONNX Runtime imported, no session
    yet): an allocation past it fails, and the graph that asked is named, instead of the device running out."""
    try:
        import resource

        with open("/proc/self/statm") as f:
            held = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        cap = held + memory_mb * 2**20
        hard = resource.getrlimit(resource.RLIMIT_AS)[1]
        resource.setrlimit(resource.RLIMIT_AS, (cap if hard == resource.RLIM_INFINITY else min(cap, hard), hard))
    except (ImportError, OSError, ValueError):  # not Linux: the deadline still holds
        pass


def _main() -> int:
    try:
        answer = _serve(sys.stdin.buffer)
    except (TimingError, EdgeshiftError) as e:
        answer = {"error": str(e)}
    except MemoryError:
        answer = {"error": "timing process ran out of memory (the profile's limits.memory_mb)"}
    except (ValueError, KeyError, json.JSONDecodeError) as e:
        answer = {"error": f"malformed timing request: {e}"}
    sys.stdout.write(json.dumps(answer) + "\n")
    sys.stdout.flush()
    return 1 if "error" in answer else 0


if __name__ == "__main__":
    sys.exit(_main())
