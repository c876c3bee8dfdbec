"""Exact structured pruning of sparse models ("DNNShifter: An efficient DNN pruning system for edge computing",
Phase 2, modules 1-4, made general and exact).

``prune_zero_channels`` fuses conv+BN, finds every channel whose removal cannot change the output, plans all
removals at once over Torch-Pruning's dependency groups (residual adds, depthwise convs, flatten into a linear
head), folds constant channels into their consumers' biases where that is exact, rebuilds the layers in one batch,
and proves the result by measuring the output deviation against the input model.

A channel (of one coupled group) is removable when, for every consumer layer reading it, either
  * the consumer's weights for it are all zero (on the consumer's surviving outputs): nobody reads it; or
  * the value arriving there is exactly 0 for every input (proved by ``channel_states``); or
  * the value is a known constant and the consumer is a linear layer or an unpadded conv, so the constant times
    the weights folds exactly into the consumer's bias.
Decisions feed back (removing a layer's outputs may leave its inputs unread), so planning runs to a fixpoint.
``mode="drop"`` is the published rule instead: drop every channel whose producing filters are all zero, bias and
all, whatever that does to the output.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from edgeshift.core.errors import EdgeshiftError, NotExactError

from ..fuse import fuse_conv_bn
from ..metrics import count_macs, count_params
from .align import pad_channels
from .groups import _build_groups, _is_layer, _structure
from .plan import _execute, _execute_verified, _explain, _fold_constants, _plan_drop, _plan_exact, _resize_splits
from .report import LayerChange, PruneReport
from .tokens import prune_token_layers, token_linears

MODES = ("exact", "drop")
DEFAULT_RTOL = 1e-4


def _layer_widths(model: nn.Module) -> dict[str, int]:
    return {name: m.weight.shape[0] for name, m in model.named_modules() if _is_layer(m)}


@torch.no_grad()
def output_deviation(
    reference: nn.Module, candidate: nn.Module, example_inputs: torch.Tensor, random_batches: int = 3, seed: int = 0
) -> tuple[float, float]:
    """(max |candidate - reference|, max |reference|) over the example and a few random batches."""
    gen = torch.Generator().manual_seed(seed)
    batches = [example_inputs] + [torch.randn(example_inputs.shape, generator=gen) for _ in range(random_batches)]
    max_diff = max_out = 0.0
    for x in batches:
        ref, out = reference(x), candidate(x)
        if ref.shape != out.shape:
            raise NotExactError(f"pruned model output shape {tuple(out.shape)} != reference {tuple(ref.shape)}")
        max_diff = max(max_diff, float((out.double() - ref.double()).abs().max()))
        max_out = max(max_out, float(ref.abs().max()))
    return max_diff, max_out


def _measured(
    reference: nn.Module, candidate: nn.Module, example_inputs: torch.Tensor, random_batches: int
) -> tuple[float, float] | None:
    """``output_deviation``, or None when the candidate no longer runs or changed the output's shape."""
    try:
        return output_deviation(reference, candidate, example_inputs, random_batches)
    except Exception:
        return None


@torch.no_grad()
def _reference_outputs(reference: nn.Module, example_inputs: torch.Tensor) -> torch.Tensor:
    return reference(example_inputs)


@torch.no_grad()
def _problem(
    reference: nn.Module,
    candidate: nn.Module,
    example_inputs: torch.Tensor,
    rtol: float,
    reference_out: torch.Tensor | None = None,
) -> str | None:
    """None when ``candidate`` computes ``reference``'s output on the example within ``rtol``; else what is wrong."""
    ref = _reference_outputs(reference, example_inputs) if reference_out is None else reference_out
    try:
        out = candidate(example_inputs)
    except Exception as exc:  # a rebuilt layer no longer fits its input: the mapping was wrong
        return f"broke the model ({type(exc).__name__})"
    if out.shape != ref.shape:
        return f"changed the output shape to {tuple(out.shape)}"
    diff = float((out.double() - ref.double()).abs().max())
    if diff > rtol * max(float(ref.abs().max()), 1e-12):
        return f"changed the output by {diff:.3g}"
    return None


@torch.no_grad()
def _runs_on(model: nn.Module, example_inputs: torch.Tensor) -> None:
    """A model that cannot run on the example (an input too small for its kernels) is the caller's mistake."""
    try:
        model(example_inputs[:1])
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EdgeshiftError(
            f"the model does not run on inputs shaped {tuple(example_inputs.shape)} ({first}); "
            "give an input size it takes"
        ) from None


def _report(
    reference: nn.Module,
    work: nn.Module,
    example_inputs: torch.Tensor,
    mode: str,
    seconds: tuple[float, float, float],
    deviation: tuple[float, float],
    widths_before: dict[str, int],
    folded: int,
    align: int,
    padded: int,
    notes: list[str],
) -> PruneReport:
    """The report of one prune: sizes before and after, ``seconds`` (fuse, plan, prune), the measured deviation."""
    widths_after = _layer_widths(work)
    return PruneReport(
        mode=mode,
        params_before=count_params(reference),
        params_after=count_params(work),
        macs_before=count_macs(reference, example_inputs),
        macs_after=count_macs(work, example_inputs),
        fuse_seconds=seconds[0],
        plan_seconds=seconds[1],
        prune_seconds=seconds[2],
        max_abs_diff=deviation[0],
        max_abs_output=deviation[1],
        channels_folded=folded,
        layers=[LayerChange(n, widths_before[n], widths_after.get(n, widths_before[n])) for n in widths_before],
        align=align,
        channels_padded=padded,
        notes=notes,
    )


def _prune_transformer(
    reference: nn.Module,
    work: nn.Module,
    example_inputs: torch.Tensor,
    mode: str,
    rtol: float,
    random_batches: int,
    align: int,
    t0: float,
    t1: float,
) -> tuple[nn.Module, PruneReport]:
    """A model with token-wise linears: dead MLP units and heads go (``prune_token_layers``), channels stay."""
    widths_before = _layer_widths(work)
    reference_out = _reference_outputs(reference, example_inputs)
    result = prune_token_layers(
        work, example_inputs, lambda: _problem(reference, work, example_inputs, rtol, reference_out)
    )
    notes = list(result.notes)
    if mode == "drop":
        notes.append("a transformer is pruned exactly whatever the mode: there is no published drop rule for it")
    if align > 1:
        notes.append(f"--align {align} pads conv channels; a transformer's widths are left as they are")
    t2 = time.perf_counter()
    deviation = output_deviation(reference, work, example_inputs, random_batches)
    seconds = (t1 - t0, t2 - t1, 0.0)
    report = _report(
        reference, work, example_inputs, mode, seconds, deviation, widths_before, result.folded_units, align, 0, notes
    )
    if report.rel_diff > rtol:  # each change was checked on the example; the random batches may still disagree
        raise NotExactError(
            f"pruning the transformer changed the output by {deviation[0]:.3g} ({report.rel_diff:.3g} relative, "
            f"limit {rtol:g})"
        )
    work.eval()
    return work, report


def prune_zero_channels(
    model: nn.Module,
    example_inputs: torch.Tensor,
    *,
    mode: str = "exact",
    rtol: float = DEFAULT_RTOL,
    random_batches: int = 3,
    align: int = 1,
) -> tuple[nn.Module, PruneReport]:
    """Structurally remove every channel of ``model`` that cannot change its output; returns (pruned, report).

    The input model is left untouched. The pruned model has conv+BN fused. In ``mode="exact"`` (default) the
    output deviation on ``example_inputs`` and ``random_batches`` random batches is measured and a
    ``NotExactError`` raised if it exceeds ``rtol`` times the largest output; ``mode="drop"`` reproduces the
    published behaviour (all-zero filters dropped with their bias) and only reports the deviation. ``align`` > 1
    then rounds every width up to a multiple of it with zero channels (``pad_channels``), still exactly.
    """
    if mode not in MODES:
        raise EdgeshiftError(f"unknown prune mode {mode!r}; known: {', '.join(MODES)}")
    if align < 1:
        raise EdgeshiftError(f"align must be >= 1 (1 = keep the widths pruning leaves), got {align}")
    if not isinstance(example_inputs, torch.Tensor):
        raise EdgeshiftError("example_inputs must be one tensor batch shaped like the model's input")
    reference = model
    was_training = reference.training
    reference.eval()
    try:
        _runs_on(reference, example_inputs)
        t0 = time.perf_counter()
        # a deep copy: the input model is never modified
        work = fuse_conv_bn(reference, example_inputs=example_inputs[:1])
        t1 = time.perf_counter()
        if token_linears(work, example_inputs):
            return _prune_transformer(reference, work, example_inputs, mode, rtol, random_batches, align, t0, t1)
        groups = _build_groups(work, example_inputs)
        gm = _structure(work, example_inputs).gm
        (_plan_exact if mode == "exact" else _plan_drop)(groups)
        notes = _explain(groups)
        t2 = time.perf_counter()
        widths_before = _layer_widths(work)
        folded = _fold_constants(groups) if mode == "exact" else 0
        _execute(groups)
        _resize_splits(work, gm)
        t_check = time.perf_counter()
        deviation = _measured(reference, work, example_inputs, random_batches)  # None: the rebuild broke the model
        checking = time.perf_counter() - t_check
        if mode == "exact" and (deviation is None or deviation[0] > rtol * max(deviation[1], 1e-12)):
            # some group was mapped wrongly (an op the planner does not understand): rebuild group by group from
            # a fresh fused copy, keeping whole every group that breaks the output, and say which
            work = fuse_conv_bn(reference, example_inputs=example_inputs[:1])
            groups = _build_groups(work, example_inputs)
            gm = _structure(work, example_inputs).gm
            _plan_exact(groups)
            reference_out = _reference_outputs(reference, example_inputs)
            folded, kept = _execute_verified(
                groups,
                lambda: _problem(reference, work, example_inputs, rtol, reference_out),
                lambda: _resize_splits(work, gm),
            )
            notes += kept
            deviation = None
        padded = pad_channels(work, example_inputs, align)
        t3 = time.perf_counter() - checking
        # measured once when nothing changed since the check (no fallback, no padding)
        measured = (
            deviation
            if deviation is not None and padded == 0
            else output_deviation(reference, work, example_inputs, random_batches)
        )
        seconds = (t1 - t0, t2 - t1, t3 - t2)
        report = _report(
            reference, work, example_inputs, mode, seconds, measured, widths_before, folded, align, padded, notes
        )
    finally:
        reference.train(was_training)
    if mode == "exact" and report.rel_diff > rtol:
        raise NotExactError(
            f"pruning changed the output by {report.max_abs_diff:.3g} ({report.rel_diff:.3g} relative, "
            f"limit {rtol:g}); the model has an operation the planner does not understand"
        )
    work.eval()
    return work, report
