"""What a prune did: per-layer widths, sizes, times and the measured output deviation."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class LayerChange:
    name: str
    channels_before: int
    channels_after: int


@dataclass
class PruneReport:
    """What a prune did, measured: sizes, per-layer channels, timings and the output deviation it caused."""

    mode: str
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    fuse_seconds: float
    plan_seconds: float
    prune_seconds: float
    max_abs_diff: float  # over example inputs and random batches, pruned vs input model
    max_abs_output: float
    channels_folded: int
    layers: list[LayerChange] = field(default_factory=list)
    align: int = 1  # widths rounded up to multiples of this with zero channels (1: not aligned)
    channels_padded: int = 0  # zero channels added for the alignment
    notes: list[str] = field(default_factory=list)  # groups kept whole although they hold zero channels, and why

    @property
    def rel_diff(self) -> float:
        return self.max_abs_diff / max(self.max_abs_output, 1e-12)

    @property
    def channels_removed(self) -> int:
        """Net: channels removed minus zero channels added back for alignment."""
        return sum(layer.channels_before - layer.channels_after for layer in self.layers)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(rel_diff=self.rel_diff, channels_removed=self.channels_removed)
        return d

    def table(self) -> str:
        """A plain-text table: per-layer channels, then the totals."""
        rows = [f"{'layer':<36} {'before':>7} {'after':>7}"]
        rows += [
            f"{c.name:<36} {c.channels_before:>7} {c.channels_after:>7}"
            for c in self.layers
            if c.channels_after != c.channels_before
        ]
        rows.append("")
        rows.append(
            f"params       {self.params_before:>12,} -> {self.params_after:>12,}  "
            f"({self.params_before / max(self.params_after, 1):.2f}x smaller)"
        )
        rows.append(
            f"MACs         {self.macs_before:>12,} -> {self.macs_after:>12,}  "
            f"({self.macs_before / max(self.macs_after, 1):.2f}x fewer)"
        )
        rows.append(
            f"channels     {self.channels_removed} removed, {self.channels_folded} folded into biases"
            + (
                f", {self.channels_padded} zero channels added (widths multiples of {self.align})"
                if self.align > 1
                else ""
            )
        )
        rows.append(
            f"time         fuse {self.fuse_seconds * 1e3:.1f} ms, plan {self.plan_seconds * 1e3:.1f} ms, "
            f"prune {self.prune_seconds * 1e3:.1f} ms"
        )
        rows.append(f"max |diff|   {self.max_abs_diff:.3g} (relative {self.rel_diff:.3g}, mode={self.mode})")
        rows += [f"note         {note}" for note in self.notes]
        return "\n".join(rows)
