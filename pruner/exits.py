"""Self-distilled early exits for vision transformers ("Neural Networks Model Compression: The Static, the Dynamic
and the Shallow" (Elkerdawy), ch. 7): C classifiers after every D/C blocks, trained in one run, each a model of
its own depth afterwards.

Each auxiliary classifier c < C is the model's own head path (its final norm, pooling and linear head) with a norm
and a head of its own, reading the tokens after block d_c; it learns from the labels and from the final
classifier (eq. 7.2): ``(1 - a) CE(q_c, p_final) + a CE(q_c, y)``, ``a`` falling linearly from 1 to 0 over the
training, ``p_final`` the final classifier's softmax (detached: the final classifier learns from the labels only,
eq. 7.4). With a teacher, the query-efficient term of sec. 7.2.3 adds ``CE(z_final, p_teacher)`` on the inputs
the final classifier gets wrong, and only those are shown to the teacher. Because an exit is the head path with
other weights, exit c *is* the model cut after block d_c with that exit as its norm and head
(``depth_variant``): a plain, shallower model of the same architecture, exported like any variant.

The model must be laid out as timm's ``VisionTransformer`` (and the zoo's ``vit_cifar``): ``blocks`` (a sequence),
``norm``, ``head`` and ``forward_head``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from edgeshift.core.errors import EdgeshiftError


class NotATransformerError(EdgeshiftError):
    """The model is not laid out as a vision transformer whose head path can be cut after a block."""


def check_layout(model: nn.Module, exits: int) -> int:
    """The model's depth, when it has the layout exits need and at least ``exits`` blocks; else one clear error."""
    blocks = getattr(model, "blocks", None)
    missing = [
        what
        for what, ok in (
            ("blocks (a sequence of transformer blocks)", isinstance(blocks, (nn.Sequential, nn.ModuleList))),
            ("norm (the final norm)", isinstance(getattr(model, "norm", None), nn.Module)),
            ("head (a linear classifier)", isinstance(getattr(model, "head", None), nn.Linear)),
            ("forward_head (pooling and head)", callable(getattr(model, "forward_head", None))),
        )
        if not ok
    ]
    if missing:
        raise NotATransformerError(
            f"exits need a vision transformer laid out as timm's VisionTransformer; {type(model).__name__} has no "
            f"{', '.join(missing)}"
        )
    assert isinstance(blocks, (nn.Sequential, nn.ModuleList))
    if not 2 <= exits <= len(blocks):
        raise NotATransformerError(f"exits must be in [2, {len(blocks)}] (the model's blocks); got {exits}")
    return len(blocks)


def exit_depths(depth: int, exits: int) -> list[int]:
    """After how many blocks each classifier reads: every depth/exits blocks (sec. 7.2.2), the last at ``depth``."""
    return [round(depth * (c + 1) / exits) for c in range(exits)]


def task_weight(step: int, total: int) -> float:
    """The weight ``a`` of the labels in eq. 7.2 at ``step`` of ``total``: from 1 down to 0, linearly."""
    return max(0.0, 1.0 - step / max(total - 1, 1))


@contextmanager
def _head_swapped(model: nn.Module, head: nn.Module) -> Iterator[None]:
    own = model.head
    model.head = head
    try:
        yield
    finally:
        model.head = own


class ExitNetwork(nn.Module):
    """A vision transformer with ``exits - 1`` auxiliary classifiers; ``forward`` returns the final classifier's
    logits (what the trainer's task loss reads) and keeps every exit's for ``loss`` (the trainer's regulariser
    protocol: ``loss(labels)``, ``after_step``, ``log``)."""

    def __init__(self, model: nn.Module, exits: int, total_steps: int = 1, teacher: nn.Module | None = None) -> None:
        super().__init__()
        depth = check_layout(model, exits)
        self.model = model
        self.depths = exit_depths(depth, exits)
        # each auxiliary classifier starts as a copy of the final one (its trained weights, when there are any)
        norm, head = cast(nn.Module, model.norm), cast(nn.Module, model.head)
        self.norms = nn.ModuleList(copy.deepcopy(norm) for _ in self.depths[:-1])
        self.heads = nn.ModuleList(copy.deepcopy(head) for _ in self.depths[:-1])
        self.total_steps = total_steps
        self.step = 0
        self.teacher = [teacher.eval()] if teacher is not None else []  # a list: not a submodule, never trained
        self._logits: list[torch.Tensor] = []
        self._final: torch.Tensor | None = None
        self._inputs: torch.Tensor | None = None
        self._log: dict[str, float] = {}

    def exit_logits(self, tokens: torch.Tensor, c: int) -> torch.Tensor:
        """Classifier ``c``'s logits from the tokens after block ``depths[c]``: the head path with its weights."""
        with _head_swapped(self.model, self.heads[c]):
            return self.model.forward_head(self.norms[c](tokens))  # type: ignore[operator]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blocks = cast(nn.Sequential, self.model.blocks)
        captured: dict[int, torch.Tensor] = {}
        hooks = [
            blocks[d - 1].register_forward_hook(lambda m, i, o, c=c: captured.__setitem__(c, o))
            for c, d in enumerate(self.depths[:-1])
        ]
        try:
            final = self.model(x)
        finally:
            for h in hooks:
                h.remove()
        self._logits = [self.exit_logits(captured[c], c) for c in range(len(self.depths) - 1)]
        self._final, self._inputs = final, x
        return final

    def all_logits(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every classifier's logits on ``x``, the final last."""
        final = self(x)
        return [*self._logits, final]

    # the training loop's regulariser protocol
    def loss(self, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Eq. 7.2 summed over the auxiliary classifiers, plus the query-efficient term with a teacher (eq. 7.3)."""
        if labels is None or self._final is None:
            raise EdgeshiftError("exits need the batch's labels: train them with edgeshift's trainer")
        a = task_weight(self.step, self.total_steps)
        soft = F.softmax(self._final.detach(), dim=1)
        total = torch.zeros(())
        for logits in self._logits:
            total = total + (1 - a) * F.cross_entropy(logits, soft) + a * F.cross_entropy(logits, labels)
        self._log = {"exit_task_weight": a}
        if self.teacher and self._inputs is not None:
            wrong = self._final.detach().argmax(1) != labels
            self._log["teacher_queries"] = float(wrong.float().mean())
            if wrong.any():
                with torch.no_grad():
                    target = F.softmax(self.teacher[0](self._inputs[wrong]), dim=1)
                total = total + F.cross_entropy(self._final[wrong], target)
        return total

    def after_step(self) -> None:
        self.step += 1
        self._logits, self._final, self._inputs = [], None, None

    def log(self) -> dict:
        return dict(self._log)


@torch.no_grad()
def depth_variant(network: ExitNetwork, c: int) -> nn.Module:
    """Classifier ``c`` as a model: a copy of the transformer whose blocks after ``depths[c]`` are ``nn.Identity``
    and whose norm and head are the exit's (the final classifier: the model itself)."""
    model = copy.deepcopy(network.model)
    if c == len(network.depths) - 1:
        return model
    blocks = cast(nn.Sequential, model.blocks)  # or a ModuleList: both take item assignment
    for i in range(network.depths[c], len(blocks)):
        blocks[i] = nn.Identity()
    model.norm = copy.deepcopy(network.norms[c])
    model.head = copy.deepcopy(network.heads[c])
    return model
