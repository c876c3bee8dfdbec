"""A portfolio's variants loaded for the first time where a hostile one can do no harm. Torch-free.

What ONNX Runtime does with a graph (allocate, fold constants, spin in a kernel) is not bounded by anything we
read from the file, so each variant is first made and run once in a process of its own under the device
profile's ``[limits]`` (``timing_process.vet_graphs``): a variant that would exhaust memory, hang, or crash ONNX
Runtime is refused there, in one line naming it, before this process makes its session. A variant passes once
per process and profile (its sha256 fixes its bytes), so a switch back to it costs nothing more.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np

from edgeshift.core.errors import PortfolioError

from .portfolio import Portfolio
from .timing_process import Graph, TimingError, vet_graphs

__all__ = ["vet_portfolio"]

_vetted: set[tuple[str, str]] = set()  # (variant sha256, profile digest)


def _profile_digest(profile) -> str:
    doc = dataclasses.asdict(profile)
    doc.pop("source", None)
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def vet_portfolio(portfolio: Portfolio, profile, names: list[str] | None = None) -> None:
    """Make and run once, in a process of its own under ``profile``'s limits, every variant in ``names`` (default:
    all) not yet vetted here under this profile; raise PortfolioError naming the first that fails. Variants go in
    groups of at most ``limits.variant_mb`` of ONNX bytes, so vetting holds no more of them in memory at once."""
    digest = _profile_digest(profile)
    todo = [n for n in (names or portfolio.names) if (portfolio.info(n).sha256, digest) not in _vetted]
    if not todo:
        return
    spec = portfolio.input_spec
    shape = [profile.serving.batch_size if d is None else d for d in spec.shape]
    feed = {spec.name: np.zeros(shape, np.float32)}
    cap = profile.limits.variant_mb * 2**20
    groups: list[list[str]] = [[]]
    size = 0
    for name in todo:
        if groups[-1] and size + portfolio.info(name).bytes > cap:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += portfolio.info(name).bytes
    for group in groups:
        graphs = {n: Graph(portfolio.inflate(n), feed, portfolio.info(n).sha256) for n in group}
        try:
            vet_graphs(graphs, profile, kind="variant")
        except TimingError as exc:
            raise PortfolioError(f"{portfolio.path}: {exc}") from None
        del graphs
        _vetted.update((portfolio.info(n).sha256, digest) for n in group)
