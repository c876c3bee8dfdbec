"""Layer criteria: how much each candidate layer or block matters (higher = keep), one small class each.

From "Neural Networks Model Compression: The Static, the Dynamic and the Shallow" (Elkerdawy). ``imprint`` (ch. 4):
a proxy classifier after every candidate, imprinted from class-mean embeddings of training batches, scored on
held-out batches; a candidate's importance is the proxy accuracy it adds over the
previous candidate. ``weight-norm`` (eq. 5.1), ``taylor`` (eq. 5.2) and ``bn-scale`` (eq. 5.3) are the mean over the
candidate's filters of a filter criterion; ``ensemble`` (eq. 5.4) sums each candidate's rank under the others.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from edgeshift.core.errors import EdgeshiftError
from edgeshift.core.registry import Registry

from .candidates import Candidate


@dataclass
class CriterionData:
    """Labelled batches for the data-driven criteria, already normalised (float NCHW)."""

    train_x: torch.Tensor  # imprinting (imprint) and gradients (taylor)
    train_y: torch.Tensor
    heldout_x: torch.Tensor  # proxy accuracy (imprint); disjoint from train_x
    heldout_y: torch.Tensor
    num_classes: int
    batch_size: int = 128
    taylor_batches: int = 4  # batches of train_x whose gradients taylor averages


class LayerCriterion:
    """Scores candidates; higher means more important (removed last)."""

    name: str = ""
    needs_data: bool = False
    help: str = ""

    def score(self, model: nn.Module, candidates: list[Candidate], data: CriterionData | None) -> dict[str, float]:
        raise NotImplementedError


CRITERIA: Registry[type[LayerCriterion]] = Registry("layer criterion")


def register_criterion(cls: type[LayerCriterion]) -> type[LayerCriterion]:
    """Class decorator: put a criterion in ``CRITERIA`` under its ``name``, with its ``help``."""
    return CRITERIA.add(cls.name, cls, cls.help)


def get(name: str) -> LayerCriterion:
    """A fresh instance of the criterion called ``name``; unknown names list the known ones."""
    return CRITERIA.get(name)()


def names() -> list[str]:
    return CRITERIA.names()


def _layers(model: nn.Module, name: str) -> list[nn.Conv2d | nn.Linear]:
    """The candidate's layers with filters: convs, and linears (a transformer block's; a linear's filter is a row)."""
    return [m for m in model.get_submodule(name).modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def _mean_over_filters(per_filter: list[torch.Tensor]) -> float:
    return float(torch.cat([t.flatten() for t in per_filter]).double().mean())


@register_criterion
class WeightNorm(LayerCriterion):
    name, needs_data = "weight-norm", False
    help = "mean L2 norm of the candidate's filters (eq. 5.1)"

    @torch.no_grad()
    def score(self, model, candidates, data):
        return {
            c.name: _mean_over_filters([m.weight.flatten(1).norm(dim=1) for m in _layers(model, c.name)])
            for c in candidates
        }


@register_criterion
class BnScale(LayerCriterion):
    name, needs_data = "bn-scale", False
    help = "mean squared BatchNorm scale of the candidate's channels (eq. 5.3)"

    @torch.no_grad()
    def score(self, model, candidates, data):
        out = {}
        for c in candidates:
            bns = [m for m in model.get_submodule(c.name).modules() if isinstance(m, nn.BatchNorm2d)]
            if not bns and not any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
                raise EdgeshiftError(
                    "bn-scale needs BatchNorm layers and the model has none (a transformer normalises with "
                    "LayerNorm); use weight-norm, taylor or imprint"
                )
            if not bns:
                raise EdgeshiftError(
                    f"bn-scale needs BatchNorm layers, and {c.name} has none (was the model fused, "
                    "e.g. by `edgeshift prune`?); use the unfused checkpoint or another criterion"
                )
            out[c.name] = _mean_over_filters([m.weight.pow(2) for m in bns])
        return out


@register_criterion
class Taylor(LayerCriterion):
    name, needs_data = "taylor", True
    help = "mean over filters of ||grad * weight||_2 over a few training batches (eq. 5.2)"

    def score(self, model, candidates, data):
        layers_of = {c.name: _layers(model, c.name) for c in candidates}
        sums = {c.name: None for c in candidates}
        was_training = model.training
        model.eval()  # BN in inference mode: the statistics the deployed model uses, untouched
        batches = 0
        try:
            for i in range(0, len(data.train_y), data.batch_size):
                if batches == data.taylor_batches:
                    break
                model.zero_grad(set_to_none=True)
                loss = F.cross_entropy(
                    model(data.train_x[i : i + data.batch_size]), data.train_y[i : i + data.batch_size]
                )
                loss.backward()
                for name, layers in layers_of.items():
                    per = torch.cat([(m.weight.grad * m.weight).detach().flatten(1).norm(dim=1) for m in layers])
                    sums[name] = per if sums[name] is None else sums[name] + per
                batches += 1
        finally:
            model.zero_grad(set_to_none=True)
            model.train(was_training)
        return {name: float(total.double().mean() / max(batches, 1)) for name, total in sums.items()}


def _final_feature_length(model: nn.Module) -> int:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise EdgeshiftError("imprint needs a model that ends in a linear classifier")
    return linears[-1].in_features


def _embed(features: torch.Tensor, length: int) -> torch.Tensor:
    """Eq. 4.1: pool to d x d with d = round(sqrt(N / channels)), flatten, L2-normalise. Tokens (N, tokens, dim),
    a transformer block's output: their mean, L2-normalised."""
    if features.dim() == 3:
        return F.normalize(features.mean(1), dim=1)
    d = max(1, round(math.sqrt(length / features.shape[1])))
    return F.normalize(F.adaptive_avg_pool2d(features, d).flatten(1), dim=1)


@register_criterion
class Imprint(LayerCriterion):
    name, needs_data = "imprint", True
    help = "proxy accuracy gained over the previous candidate, by a class-mean classifier imprinted per candidate"

    @torch.no_grad()
    def proxy_accuracies(self, model: nn.Module, candidates: list[Candidate], data: CriterionData) -> list[float]:
        """Proxy top-1 at the input of the first candidate, then at each candidate's output (len + 1 values)."""
        length = _final_feature_length(model)
        captured: list[torch.Tensor | None] = [None] * (len(candidates) + 1)
        hooks = [
            model.get_submodule(candidates[0].name).register_forward_pre_hook(
                lambda m, inp: captured.__setitem__(0, inp[0])
            )
        ]
        for i, c in enumerate(candidates, start=1):
            hooks.append(
                model.get_submodule(c.name).register_forward_hook(lambda m, inp, out, i=i: captured.__setitem__(i, out))
            )
        was_training = model.training
        model.eval()
        try:
            sums: list[torch.Tensor | None] = [None] * len(captured)
            counts = torch.zeros(data.num_classes, dtype=torch.float64)
            for b in range(0, len(data.train_y), data.batch_size):
                y = data.train_y[b : b + data.batch_size]
                model(data.train_x[b : b + data.batch_size])
                onehot = F.one_hot(y, data.num_classes).double()
                counts += onehot.sum(0)
                for i, feats in enumerate(captured):
                    assert feats is not None  # every hook ran in the forward pass
                    part = onehot.T @ _embed(feats, length).double()  # [classes, dim] class sums, eq. 4.2
                    so_far = sums[i]
                    sums[i] = part if so_far is None else so_far + part
            weights = [F.normalize(s / counts.clamp(min=1)[:, None], dim=1) for s in sums if s is not None]
            correct = [0] * len(captured)
            for b in range(0, len(data.heldout_y), data.batch_size):
                y = data.heldout_y[b : b + data.batch_size]
                model(data.heldout_x[b : b + data.batch_size])
                for i, feats in enumerate(captured):
                    assert feats is not None
                    pred = (_embed(feats, length).double() @ weights[i].T).argmax(1)  # eq. 4.3
                    correct[i] += int((pred == y).sum())
        finally:
            model.train(was_training)
            for h in hooks:
                h.remove()
        return [c / max(len(data.heldout_y), 1) for c in correct]

    def score(self, model, candidates, data):
        acc = self.proxy_accuracies(model, candidates, data)
        return {c.name: acc[i + 1] - acc[i] for i, c in enumerate(candidates)}


def ranks(scores: dict[str, float]) -> dict[str, int]:
    """0 for the least important candidate; ties keep forward order."""
    order = sorted(scores, key=lambda name: scores[name])
    return {name: i for i, name in enumerate(order)}


@register_criterion
class Ensemble(LayerCriterion):
    name, needs_data = "ensemble", True
    help = "sum of each candidate's rank under imprint, weight-norm, taylor and bn-scale (eq. 5.4)"
    members = ("imprint", "weight-norm", "taylor", "bn-scale")

    def score(self, model, candidates, data):
        total = {c.name: 0 for c in candidates}
        for member in self.members:
            for name, r in ranks(get(member).score(model, candidates, data)).items():
                total[name] += r
        return {name: float(v) for name, v in total.items()}
