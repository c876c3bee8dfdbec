"""What a model built by edgeshift carries about its source: how to rebuild it and what it takes.

Every model source (the zoo, timm, torchvision, a factory of one's own) records one ``ModelRecord`` on the model it
builds; a checkpoint stores it as data (its ``arch`` table) and rebuilds the model from it, never from a pickle.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from edgeshift.core.errors import EdgeshiftError, InputFileError

ATTRIBUTE = "edgeshift_record"


@dataclass(frozen=True)
class Normalisation:
    """Per-channel mean and standard deviation of the inputs the model was trained on."""

    mean: tuple[float, ...]
    std: tuple[float, ...]


@dataclass(frozen=True)
class ModelRecord:
    """A model's source and the facts the build side needs about it."""

    name: str  # the model source: a zoo name, timm/NAME, torchvision/NAME or package.module:function
    num_classes: int | None  # outputs of its classifier (None: a source that does not say)
    input_size: int  # square input side
    kwargs: Mapping[str, Any] = field(default_factory=dict)  # keyword arguments of the source
    normalisation: Normalisation | None = None  # recorded by the source's config or by training
    reparameterized: bool = False  # its multi-branch blocks were folded into single convs

    @property
    def classes(self) -> int:
        """The class count, which data for the model must have; refused where the source does not say it."""
        if self.num_classes is None:
            raise EdgeshiftError(
                f"model source {self.name} does not say its class count (no final Linear); pass it (--num-classes)"
            )
        return self.num_classes

    def with_normalisation(self, mean: Sequence[float], std: Sequence[float]) -> ModelRecord:
        return dataclasses.replace(self, normalisation=Normalisation(tuple(map(float, mean)), tuple(map(float, std))))

    def to_dict(self) -> dict[str, Any]:
        """The checkpoint's ``arch`` table (the keys checkpoints have always had)."""
        doc: dict[str, Any] = {
            "name": self.name,
            "num_classes": self.num_classes,
            "input_size": self.input_size,
            "kwargs": dict(self.kwargs),
        }
        if self.normalisation is not None:
            doc["normalisation"] = {"mean": list(self.normalisation.mean), "std": list(self.normalisation.std)}
        if self.reparameterized:
            doc["reparameterized"] = True
        return doc

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any], where: str = "checkpoint") -> ModelRecord:
        """Read a checkpoint's ``arch`` table (its ``layers`` are the checkpoint's business), strictly."""
        known = {"name", "num_classes", "input_size", "kwargs", "normalisation", "reparameterized", "layers"}
        unknown = sorted(set(doc) - known)
        if unknown:
            raise InputFileError(
                f"{where}: unknown key {unknown[0]!r} in its arch table; known: {', '.join(sorted(known))}"
            )
        try:
            norm = doc.get("normalisation")
            return cls(
                name=str(doc["name"]),
                num_classes=None if doc.get("num_classes") is None else int(doc["num_classes"]),
                input_size=int(doc["input_size"]),
                kwargs=dict(doc.get("kwargs") or {}),
                normalisation=None
                if not norm
                else Normalisation(tuple(map(float, norm["mean"])), tuple(map(float, norm["std"]))),
                reparameterized=bool(doc.get("reparameterized", False)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InputFileError(f"{where}: its arch table is malformed ({type(exc).__name__}: {exc})") from None


def record_of(model: nn.Module) -> ModelRecord:
    """The record of a model built by a model source; refused for a model built otherwise."""
    record = getattr(model, ATTRIBUTE, None)
    if not isinstance(record, ModelRecord):
        raise EdgeshiftError(
            "model was not built from a model source (edgeshift.pruner.models.sources.create: a zoo name, timm/NAME, "
            "torchvision/NAME or package.module:function); cannot record it"
        )
    return record


def has_record(model: nn.Module) -> bool:
    return isinstance(getattr(model, ATTRIBUTE, None), ModelRecord)


def set_record(model: nn.Module, record: ModelRecord) -> None:
    object.__setattr__(model, ATTRIBUTE, record)  # a plain attribute, not a submodule, parameter or buffer
