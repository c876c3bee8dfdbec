"""Learned filter masks (papers/003, chapter 3): the widths of a trained model chosen by training.

One real-valued gate per channel of every prunable coupled group (one gate per residual-stream channel, shared by
every layer Torch-Pruning couples to it) multiplies the outputs of the group's batch norms (or of its layers where
no batch norm follows). Forward: ``binarize(sigmoid(gate), 0.5)`` (eq. 3.4); backward: straight through the
binarisation, then the sigmoid's derivative (eq. 3.5). The loss is the task loss plus a sparsity loss (eq. 3.2)
in which each gate is priced by what its channel costs: the model's cost as a function of the open gates, each
layer costing ``a + b * in * out`` (its MACs, or a latency model per layer), over the dense cost. Its weight adapts
every step, up while the priced model is above the target fraction of the dense cost and down below it. At the
end the closed gates become exact zeros (their batch norm's gamma and beta, or their filter and bias), which
``prune_zero_channels`` removes exactly.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from edgeshift.core.errors import EdgeshiftError

from .fuse import conv_bn_pairs
from .metrics import forward_with_hooks
from .sparse import Mask
from .structured.groups import _is_depthwise, coupled_groups

__all__ = ["GateConfig", "LayerPrice", "LearnedMasks"]


@dataclass(frozen=True)
class GateConfig:
    """How the gates are learned."""

    target: float = 0.5  # fraction of the dense model's priced cost to reach, in (0, 1]
    gate_init: float = 1.0  # initial gate logit (sigmoid 0.73: open); with `warm_start` the mean initial logit
    warm_start: bool = True  # initial logits ordered by the channels' batch-norm scale: weak channels close first
    gate_lr: float = 1.0  # the gates' own SGD learning rate (no momentum: a gate stops when its pull does)
    weight: float | None = None  # initial pull of the sparsity loss on the dearest gate (task loss units); None:
    # enough for a gate to cross its initial range during the ramp (``plan``), 0.01 when the steps are not known
    adapt: float = 0.01  # per step, the weight is multiplied (cost above target) or divided by 1 + adapt
    ramp: float = 0.5  # share of the steps over which the target falls from 1 to `target` (then it holds)
    align: int = 1  # open channels per group in multiples of this (ONNX Runtime's CPU kernels block by 8)

    def validate(self) -> None:
        if not 0 < self.target <= 1:
            raise EdgeshiftError(f"target must be a fraction of the dense model's cost in (0, 1], got {self.target}")
        bad_weight = self.weight is not None and self.weight <= 0
        if (
            self.gate_init <= 0
            or bad_weight
            or self.adapt < 0
            or self.gate_lr <= 0
            or not 0 <= self.ramp <= 1
            or self.align < 1
        ):
            raise EdgeshiftError("gate_init, weight and gate_lr must be > 0, adapt >= 0, ramp in [0, 1] and align >= 1")


@dataclass(frozen=True)
class LayerPrice:
    """What one layer costs at given widths: ``fixed + per_mac * MACs`` (ms, or MACs themselves with 0, 1)."""

    fixed: float = 0.0
    per_mac: float = 1.0


class _Binarize(torch.autograd.Function):
    """1 where the sigmoid of the gate is at least 0.5; the gradient passes straight through (eq. 3.5)."""

    @staticmethod
    def forward(ctx, probability: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return (probability >= 0.5).to(probability.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return grad


@dataclass
class _Gated:
    """Where one group's gates act: a module whose output channels ``idxs`` take the gates ``roots``."""

    name: str
    module: nn.Module
    idxs: torch.Tensor
    roots: torch.Tensor


@dataclass
class _CostedLayer:
    """One conv/linear layer's cost as a function of the gates on its inputs and outputs."""

    name: str
    macs_per_pair: float  # MACs per (input channel, output channel) pair, or per channel when depthwise
    depthwise: bool
    out_width: int
    in_width: int
    out_gates: list[tuple[int, torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (group, idxs, roots)
    in_gates: list[tuple[int, torch.Tensor, torch.Tensor]] = field(default_factory=list)
    price: LayerPrice = LayerPrice()


def _spatial_sizes(model: nn.Module, example_inputs: torch.Tensor) -> dict[nn.Module, int]:
    """Output positions per sample of every conv (1 for a linear layer), from one forward."""
    sizes: dict[nn.Module, int] = {}

    def record(m: nn.Module, inputs, output) -> None:
        sizes[m] = int(np.prod(output.shape[2:])) or 1

    forward_with_hooks(
        model, example_inputs, [(m, record) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    )
    return sizes


class LearnedMasks(nn.Module):
    """The gates of a model, attached to it by forward hooks (the model's own structure is not changed).

    Used by ``train`` as its ``regulariser``: ``loss()`` is the weighted sparsity loss added to the task loss;
    ``after_step()`` moves the gates (their own Adam: a logit moves about ``gate_lr`` a step whatever the scale of
    its gradient, so the sign of task pull against price decides) and adapts the weight; ``harden()`` turns closed
    gates into exact zeros in the model and removes the hooks. Every group keeps at least one channel open."""

    def __init__(
        self,
        model: nn.Module,
        example_inputs: torch.Tensor,
        cfg: GateConfig,
        prices: dict[str, LayerPrice] | None = None,
        overhead: float = 0.0,
    ) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        specs = [s for s in coupled_groups(model, example_inputs) if not s.blocked and s.size > 1]
        if not specs:
            raise EdgeshiftError(
                "the model has no prunable channel group: nothing for gates to choose (every "
                "group reaches the output, or passes an op kept whole)"
            )
        self.group_roots = [s.root for s in specs]
        self.group_specs = specs  # which channels each gate vector covers (its entries by the group's roots)
        mods = dict(model.named_modules())
        bn_after = dict(conv_bn_pairs(model))
        self._gated: list[list[_Gated]] = []  # where each group's zeros go when hardened: BNs or producers
        self._readers: list[list[_Gated]] = []  # where its gates act in training: the inputs of its consumers
        for spec in specs:
            gated, readers, seen = [], [], set()
            for it in spec.items:
                m = mods[it.name]
                if it.role == "consumer":
                    readers.append(_Gated(it.name, m, torch.as_tensor(it.idxs), torch.as_tensor(it.roots)))
                    continue
                if isinstance(m, nn.modules.batchnorm._BatchNorm) or it.role == "producer" and it.name not in bn_after:
                    name = it.name
                elif it.role == "producer":
                    name = bn_after[it.name]
                else:
                    continue
                if name in seen:
                    continue
                seen.add(name)
                gated.append(_Gated(name, mods[name], torch.as_tensor(it.idxs), torch.as_tensor(it.roots)))
            self._gated.append(gated)
            self._readers.append(readers)
        self.logits = nn.ParameterList(
            nn.Parameter(self._initial_logits(s.size, g)) for s, g in zip(specs, self._gated)
        )
        sizes = _spatial_sizes(model, example_inputs)
        self._layers: list[_CostedLayer] = []
        for name, m in mods.items():
            if not isinstance(m, (nn.Conv2d, nn.Linear)) or m not in sizes:
                continue
            kernel = int(np.prod(m.kernel_size)) if isinstance(m, nn.Conv2d) else 1
            groups = getattr(m, "groups", 1)
            out_w = m.weight.shape[0]
            in_w = m.in_channels if isinstance(m, nn.Conv2d) else m.in_features
            self._layers.append(
                _CostedLayer(
                    name, sizes[m] * kernel / (1 if _is_depthwise(m) else groups), _is_depthwise(m), out_w, in_w
                )
            )
        by_name = {c.name: c for c in self._layers}
        for gi, spec in enumerate(specs):
            for it in spec.items:
                layer = by_name.get(it.name)
                if layer is None or it.role == "follow" and not layer.depthwise:
                    continue
                side = layer.out_gates if it.role in ("producer", "follow") else layer.in_gates
                side.append((gi, torch.as_tensor(it.idxs), torch.as_tensor(it.roots)))
        self._sizes = [s.size for s in specs]
        self.set_prices(prices or {}, overhead)
        self.optimizer = torch.optim.SGD(self.logits.parameters(), lr=cfg.gate_lr)
        self._hooks: list = []
        self.total_steps, self.step = 0, 0
        self.attach()

    def set_prices(self, prices: dict[str, LayerPrice], overhead: float = 0.0) -> None:
        """Price every layer (MACs where ``prices`` has no entry) and derive from it the dense and floor costs,
        the initial weight and each gate's step scale; before training."""
        for layer in self._layers:
            layer.price = prices.get(layer.name, LayerPrice())
        self.overhead = float(overhead)
        with torch.no_grad():
            self.dense_cost = float(self._cost([torch.ones(n) for n in self._sizes]))
            self.floor_cost = float(self._cost([(torch.arange(n) < self.cfg.align).float() for n in self._sizes]))
        # the weight is in units of the dearest gate: its pull on the loss starts at ``cfg.weight``
        ones = [torch.ones(n, requires_grad=True) for n in self._sizes]
        (self._cost(ones) / self.dense_cost).backward()
        grads = [o.grad for o in ones if o.grad is not None]
        assert len(grads) == len(ones)  # every gate has a price
        dearest = max(float(g.max()) for g in grads)
        self._dearest = dearest
        self.weight = (self.cfg.weight or 0.01) / dearest
        # each gate's step is scaled by dearest / its price (a diagonal preconditioner: the balance points do not
        # move): every gate drifts shut at one speed, and a closed gate reopens when its task gradient per unit of
        # price beats the weight, so channels close in order of importance per cost, not of cost alone
        self._step_scale = [dearest / g.clamp(min=dearest / 100) for g in grads]

    def plan(self, total_steps: int) -> None:
        """Tell the gates how many steps they train: the target ramps over ``ramp`` of them and, without a given
        weight, the pull starts where a gate of mean warm-start logit reaches 0 by the ramp's end (sigmoid' ~ 0.2)."""
        self.total_steps, self.step = int(total_steps), 0
        if self.cfg.weight is None:
            drift = 1.5 * self.cfg.gate_init / max(1.0, self.cfg.ramp * total_steps)
            self.weight = drift / (0.2 * self.cfg.gate_lr) / self._dearest

    def current_target(self) -> float:
        """The target now: from 1 down to ``cfg.target`` over the first ``ramp`` of ``total_steps`` (when known),
        so channels close gradually and the model adapts as they go."""
        ramp = self.cfg.ramp * self.total_steps
        if ramp <= 0:
            return self.cfg.target
        return 1 - (1 - self.cfg.target) * min(1.0, self.step / ramp)

    def _initial_logits(self, size: int, gated: list[_Gated]) -> torch.Tensor:
        """``gate_init`` for every channel, or (warm start) from 0.5x to 1.5x of it in the order of the channels'
        summed batch-norm |gamma|: under an even pull the weakest channels reach 0 first."""
        if not self.cfg.warm_start:
            return torch.full((size,), float(self.cfg.gate_init))
        scale = torch.zeros(size)
        for g in gated:
            if isinstance(g.module, nn.modules.batchnorm._BatchNorm) and g.module.weight is not None:
                scale.index_add_(0, g.roots, g.module.weight.detach().abs()[g.idxs].float())
        rank = scale.argsort().argsort().float() / max(size - 1, 1)
        return float(self.cfg.gate_init) * (0.5 + rank)

    # -- the gates ------------------------------------------------------------------------------------------
    def binary(self) -> list[torch.Tensor]:
        """Each group's gates, 0 or 1 (differentiable straight through); see ``binary_of``."""
        return [self.binary_of(gi) for gi in range(len(self.logits))]

    def attach(self) -> None:
        """Multiply the inputs of every layer reading a gated channel by its gate (idempotent). Gating what the
        consumers read, after the activation, keeps a gradient on a closed gate: a ReLU after a zeroed output
        would pass none, and the channel could never reopen. Every reader of a prunable group is such a layer,
        so the model computes what it would with the closed channels removed."""
        self.detach_hooks()
        for gi, readers in enumerate(self._readers):
            for g in readers:
                self._hooks.append(g.module.register_forward_pre_hook(self._hook(gi, g)))

    def _hook(self, gi: int, g: _Gated):
        def hook(module, inputs):
            x = inputs[0]
            scale = torch.ones(x.shape[1], dtype=x.dtype, device=x.device)
            scale = scale.index_put((g.idxs,), self.binary_of(gi)[g.roots].to(x.dtype))
            return (x * scale.reshape((1, -1) + (1,) * (x.dim() - 2)), *inputs[1:])

        return hook

    def binary_of(self, gi: int) -> torch.Tensor:
        """Group ``gi``'s gates: 1 where the sigmoid is at least 0.5, then the strongest closed gates opened until
        the open count is a multiple of ``align`` (at least one multiple, at most the whole group)."""
        logit = self.logits[gi]
        b = _Binarize.apply(torch.sigmoid(logit))
        n, k = len(logit), int(b.detach().sum())
        want = min(n, max(1, -(-k // self.cfg.align)) * self.cfg.align)
        if want > k:
            top = torch.zeros(n, dtype=b.dtype)
            top[logit.detach().topk(want).indices] = 1
            b = b + (top - b.detach()).clamp(min=0)
        return b

    def detach_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    # -- the price --------------------------------------------------------------------------------------------
    def _kept(self, width: int, gates: list, binaries: list[torch.Tensor]) -> torch.Tensor:
        if not gates:
            return torch.tensor(float(width))
        mask = torch.ones(width)
        for gi, idxs, roots in gates:
            mask = mask.index_put((idxs,), binaries[gi][roots])
        return mask.sum()

    def _cost(self, binaries: list[torch.Tensor]) -> torch.Tensor:
        total = torch.tensor(self.overhead)
        for layer in self._layers:
            out = self._kept(layer.out_width, layer.out_gates, binaries)
            macs = layer.macs_per_pair * (
                out if layer.depthwise else out * self._kept(layer.in_width, layer.in_gates, binaries)
            )
            total = total + layer.price.fixed + layer.price.per_mac * macs
        return total

    def cost_ratio(self) -> float:
        """The gated model's priced cost over the dense model's."""
        with torch.no_grad():
            return float(self._cost(self.binary())) / self.dense_cost

    @property
    def floor_ratio(self) -> float:
        """The least priced cost gates can reach (one channel per group open), over the dense cost."""
        return self.floor_cost / self.dense_cost

    # -- the regulariser interface used by ``train`` ----------------------------------------------------------
    def loss(self, labels: torch.Tensor | None = None) -> torch.Tensor:
        """The sparsity loss (eq. 3.2, priced): weight x cost of the open channels / dense cost while that is above
        the target; below it only the task loss moves the gates: the closed ones it needs reopen, the rest stay."""
        ratio = self._cost(self.binary()) / self.dense_cost
        return self.weight * ratio if float(ratio.detach()) > self.current_target() else ratio * 0.0

    def after_step(self) -> None:
        """Move the gates, clear their gradients, and adapt the loss weight toward the target."""
        with torch.no_grad():
            for logit, scale in zip(self.logits, self._step_scale):
                if logit.grad is not None:
                    logit.grad.mul_(scale)
        self.optimizer.step()
        with torch.no_grad():
            for logit in self.logits:  # a closed gate stays a few steps from reopening, an open one from closing
                logit.clamp_(-self.cfg.gate_init, 2 * self.cfg.gate_init)
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        if self.cost_ratio() > self.current_target():
            self.weight *= 1 + self.cfg.adapt
        else:
            self.weight /= 1 + self.cfg.adapt

    def log(self) -> dict:
        return {
            "cost_ratio": self.cost_ratio(),
            "sparsity_weight": self.weight,
            "open": float(sum(int(b.sum()) for b in self.binary())) / sum(len(b) for b in self.logits),
        }

    # -- the end --------------------------------------------------------------------------------------------
    def shares(self) -> dict[str, float]:
        """Per group (named by its root layers): the share of its channels left open."""
        with torch.no_grad():
            return {root: float(b.mean()) for root, b in zip(self.group_roots, self.binary())}

    @torch.no_grad()
    def meet_target(self) -> int:
        """Close the open gates nearest to closing until the priced cost is at most the target (or only one channel
        per group is left), then reopen closed ones, nearest to opening first, where the target allows; returns
        how many were closed net. Training ends near the target, on either side."""
        closed = 0
        while self.cost_ratio() > self.cfg.target:
            best = None
            for gi, logit in enumerate(self.logits):
                open_ = (logit >= 0).nonzero().flatten()  # open by their own sigmoid, not by the alignment
                if len(open_) > 1:
                    i = int(open_[logit[open_].argmin()])
                    if best is None or logit[i] < self.logits[best[0]][best[1]]:
                        best = (gi, i)
            if best is None:
                break
            self.logits[best[0]][best[1]] = -self.cfg.gate_init
            closed += 1
        # then the other way: the closed gates nearest to opening reopen while the cost stays within the target,
        # so a run that overshot (many gates crossing in one step) still spends the budget it was given
        candidates = sorted(
            (
                (float(logit[i]), gi, int(i))
                for gi, logit in enumerate(self.logits)
                for i in (logit < 0).nonzero().flatten()
            ),
            reverse=True,
        )
        for value, gi, i in candidates:
            self.logits[gi][i] = 0.0
            if self.cost_ratio() > self.cfg.target:
                self.logits[gi][i] = value
            else:
                closed -= 1
        return closed

    @torch.no_grad()
    def harden(self) -> Mask:
        """Write the closed gates into the model as exact zeros (gamma and beta of the batch norm, or filter and
        bias) and remove the hooks. The model then computes, in eval mode, exactly what the gated model computed.
        Returns the mask that keeps those zeros through fine-tuning (``train(mask=...)``)."""
        mask: Mask = {}
        binaries = [b.detach() for b in self.binary()]
        for gi, gated in enumerate(self._gated):
            shut = binaries[gi] == 0
            for g in gated:
                idx = g.idxs[shut[g.roots]]
                for pname in ("weight", "bias"):
                    t = getattr(g.module, pname, None)
                    if t is not None:
                        t[idx] = 0
                        keep = mask.setdefault(f"{g.name}.{pname}", torch.ones_like(t))
                        keep[idx] = 0
        self.detach_hooks()
        return mask

    def closed(self) -> int:
        """How many gates are closed."""
        return sum(int((b == 0).sum()) for b in self.binary())

    def config(self) -> dict:
        return asdict(self.cfg)
