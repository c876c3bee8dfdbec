"""The trainer: SGD with momentum (or AdamW) and weight decay, cosine or step schedule with warm-up, standard CIFAR
augmentation, seeded and deterministic on CPU, masks enforced after every optimiser step, a JSONL log."""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import distributed
from .data import Dataset
from .distill import Teacher
from .sparse import Mask, apply_mask


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one training run."""

    epochs: int = 10  # passes over the training set (ignored when iterations is set)
    iterations: int | None = None  # optimiser steps in all, instead of epochs
    batch_size: int = 128  # samples per step
    lr: float = 0.1  # peak learning rate
    momentum: float = 0.9  # SGD momentum
    optimizer: str = "sgd"  # sgd (with momentum) | adamw (decoupled weight decay: what vision transformers train with)
    weight_decay: float = 5e-4  # L2 on every parameter
    schedule: str = "cosine"  # cosine | step
    milestones: tuple[float, ...] = (0.5, 0.75)  # step schedule: fractions of training where lr *= gamma
    gamma: float = 0.1  # step schedule factor
    warmup_steps: int = 0  # linear warm-up from 0 to lr
    augment: bool = True  # random crop (4 px padding) and horizontal flip
    seed: int = 0  # data order, augmentation

    def total_steps(self, n_train: int) -> int:
        per_epoch = max(1, math.ceil(n_train / self.batch_size))
        return int(self.iterations) if self.iterations else int(self.epochs) * per_epoch

    def lr_at(self, step: int, total: int) -> float:
        if self.warmup_steps and step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.schedule == "cosine":
            t = (step - self.warmup_steps) / max(1, total - self.warmup_steps)
            return 0.5 * self.lr * (1 + math.cos(math.pi * min(max(t, 0.0), 1.0)))
        factor = sum(step >= m * total for m in self.milestones)
        return self.lr * self.gamma**factor


@dataclass
class TrainResult:
    test_accuracy: float
    train_loss: float
    steps: int
    seconds: float
    rewind_state: dict | None = None  # the model state at ``rewind_step``, when asked
    history: list[dict] = field(default_factory=list)


def to_tensor(ds: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(ds.normalised()), torch.from_numpy(ds.labels)


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    n, _, h, w = x.shape
    padded = F.pad(x, (4, 4, 4, 4))
    dx = torch.randint(0, 9, (n,), generator=gen)
    dy = torch.randint(0, 9, (n,), generator=gen)
    rows = dy[:, None] + torch.arange(h)[None, :]  # [n, h]
    cols = dx[:, None] + torch.arange(w)[None, :]  # [n, w]
    out = padded[
        torch.arange(n)[:, None, None, None],
        torch.arange(x.shape[1])[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ]
    flip = torch.rand(n, generator=gen) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 500) -> float:
    was = model.training
    model.eval()
    correct = 0
    for i in range(0, len(y), batch):
        correct += int((model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum())
    model.train(was)
    return correct / max(len(y), 1)


class _Progress:
    """A bar on a terminal; one line per epoch otherwise (logs of background runs)."""

    def __init__(self, total: int, label: str, enabled: bool, offset: int = 0):
        self.total, self.label, self.offset = total, label, offset
        self.enabled, self.lines = enabled and sys.stderr.isatty(), enabled and not sys.stderr.isatty()
        self.t0 = time.perf_counter()

    def epoch(self, row: dict) -> None:
        if self.lines:
            sys.stderr.write(
                f"{self.label} epoch {row['epoch']}: step {row['step']}/{self.total + self.offset}, loss "
                f"{row['loss']:.3f}, test accuracy {100 * row['test_accuracy']:.2f}%, "
                f"{row['seconds']:.0f} s\n"
            )
            sys.stderr.flush()

    def update(self, step: int, loss: float) -> None:
        if self.enabled and (step % 10 == 0 or step == self.total):
            frac = step / max(self.total, 1)
            bar = "#" * int(30 * frac)
            eta = (time.perf_counter() - self.t0) / max(frac, 1e-9) * (1 - frac)
            sys.stderr.write(f"\r{self.label} [{bar:<30}] {step}/{self.total} loss {loss:.3f} eta {eta:4.0f}s")
            if step == self.total:
                sys.stderr.write("\n")
            sys.stderr.flush()


class Regulariser(Protocol):
    """A term trained alongside the task loss (learned masks): its loss, its own update after each optimiser step
    (its parameters are not the model's: it steps them itself), and what it logs per epoch."""

    def loss(self, labels: torch.Tensor | None = None) -> torch.Tensor:
        """The term for the batch just run forward (``labels``: that batch's, for terms that need them)."""
        ...

    def after_step(self) -> None: ...

    def log(self) -> dict: ...


OPTIMIZERS = ("sgd", "adamw")


def parameter_groups(model: nn.Module) -> list[dict]:
    """The model's own parameter groups where it names them (a ``parameter_groups()`` method: decision heads that
    learn faster than the backbone), else one group; a group's ``lr_scale`` multiplies the schedule's rate."""
    groups = getattr(model, "parameter_groups", None)
    return groups() if callable(groups) else [{"params": list(model.parameters())}]


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD with momentum, or AdamW ("Decoupled Weight Decay Regularization"), as ``cfg.optimizer`` says."""
    groups = parameter_groups(model)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}; known: {', '.join(OPTIMIZERS)}")


def train(
    model: nn.Module,
    train_ds: Dataset,
    test_ds: Dataset,
    cfg: TrainConfig,
    *,
    mask: Mask | None = None,
    start_step: int = 0,
    rewind_step: int | None = None,
    log_path: Path | None = None,
    progress: bool = True,
    label: str = "train",
    regulariser: Regulariser | None = None,
    teacher: Teacher | None = None,
) -> TrainResult:
    """Train ``model`` in place from ``start_step`` to the end of the schedule; returns the result.

    With ``mask`` the masked weights are zeroed before training and after every optimiser step. With
    ``rewind_step`` the model state at that step (before its update) is captured for IMP rewinding. With
    ``regulariser`` its loss is added to the task loss and its parameters trained too. With ``teacher`` the task
    loss is blended with distillation from it, on the same augmented batch.
    """
    xs, ys = to_tensor(train_ds)
    xt, yt = to_tensor(test_ds)
    total = cfg.total_steps(len(ys))
    per_epoch = max(1, math.ceil(len(ys) / cfg.batch_size))
    opt = make_optimizer(model, cfg)
    if mask is not None:
        apply_mask(model, mask)
    model.train()
    net = distributed.wrap(model)  # DDP under torchrun, the model itself otherwise
    rank, world = distributed.rank(), distributed.world_size()
    progress = progress and rank == 0
    rewind_state = None
    history: list[dict] = []
    bar = _Progress(total - start_step, label, progress, offset=start_step)
    t0 = time.perf_counter()
    step = start_step
    loss_sum, loss_n, correct = 0.0, 0, 0
    log = open(log_path, "a") if log_path and rank == 0 else None
    try:
        while step < total:
            epoch = step // per_epoch
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
            order = torch.randperm(len(ys), generator=gen)
            for b in range(step % per_epoch, per_epoch):
                if step >= total:
                    break
                if rewind_step is not None and step == rewind_step:
                    rewind_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                idx = order[b * cfg.batch_size : (b + 1) * cfg.batch_size]
                x = _augment(xs[idx], gen) if cfg.augment else xs[idx]  # every rank draws the same augmentation
                if world > 1:  # this rank's slice of the global batch
                    idx, x = idx[rank::world], x[rank::world]
                for g in opt.param_groups:
                    g["lr"] = cfg.lr_at(step, total) * g.get("lr_scale", 1.0)
                out = net(x)
                loss = F.cross_entropy(out, ys[idx])
                if teacher is not None:
                    loss = teacher.loss(x, out, loss)
                if regulariser is not None:
                    loss = loss + regulariser.loss(ys[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if regulariser is not None:
                    regulariser.after_step()
                if mask is not None:
                    apply_mask(model, mask)
                step += 1
                loss_value = loss.item()
                loss_sum += loss_value * len(idx)
                loss_n += len(idx)
                correct += int((out.argmax(1) == ys[idx]).sum())
                bar.update(step - start_step, loss_value)
            if step % per_epoch == 0 or step >= total:
                acc = evaluate(model, xt, yt)
                row = {
                    "epoch": epoch + 1,
                    "step": step,
                    "loss": loss_sum / max(loss_n, 1),
                    "train_accuracy": correct / max(loss_n, 1),
                    "test_accuracy": acc,
                    "lr": cfg.lr_at(step - 1, total),
                    "seconds": time.perf_counter() - t0,
                }
                if regulariser is not None:
                    row.update(regulariser.log())
                history.append(row)
                bar.epoch(row)
                if log:
                    log.write(json.dumps(row) + "\n")
                    log.flush()
                loss_sum, loss_n, correct = 0.0, 0, 0
    finally:
        if log:
            log.close()
    if rewind_step is not None and rewind_state is None and rewind_step >= total:
        rewind_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    final = history[-1] if history else {"test_accuracy": evaluate(model, xt, yt), "loss": float("nan")}
    return TrainResult(final["test_accuracy"], final["loss"], step, time.perf_counter() - t0, rewind_state, history)


def config_dict(cfg: TrainConfig) -> dict:
    d = asdict(cfg)
    d["milestones"] = list(d["milestones"])
    return d


def set_determinism(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    torch.use_deterministic_algorithms(True, warn_only=True)
