"""The model zoo's front door: ``create_model(name, num_classes=..., **kw)`` builds a registered architecture and
records how, as data (the checkpoint format relies on it)."""

from __future__ import annotations

import torch

from edgeshift.core.errors import EdgeshiftError

from . import mobilenetv2, resnet, vgg, vit  # noqa: F401  (they register their architectures)
from .record import ModelRecord, record_of, set_record
from .registry import MODELS, ZooEntry


def names() -> list[str]:
    return MODELS.names()


def entry(name: str) -> ZooEntry:
    """What the zoo knows of ``name``; an unknown name raises UnknownNameError listing the known ones."""
    e = MODELS.entry(name)
    return ZooEntry(e.value, int(e.info["num_classes"]), int(e.info["input_size"]), e.help)


def get(name: str, num_classes: int | None = None, input_size: int | None = None, **kw):
    """Build zoo model ``name``; fails naming the known architectures on an unknown name.

    ``input_size`` is recorded with the model (for export and profiling), not used by the layers.
    """
    e = entry(name)
    num_classes = e.num_classes if num_classes is None else int(num_classes)
    try:
        model = e.builder(num_classes=num_classes, **kw)
    except TypeError as exc:
        raise EdgeshiftError(f"bad options for architecture {name!r}: {exc}") from None
    set_record(model, ModelRecord(name, num_classes, int(input_size or e.input_size), dict(kw)))
    return model


create_model = get


def input_shape(model, batch: int = 1) -> tuple[int, int, int, int]:
    """The (N, C, H, W) input shape recorded for a zoo model."""
    record = record_of(model)
    size = record.input_size
    channels = record.kwargs.get("in_channels", record.kwargs.get("in_chans"))
    if channels is None:  # a model from another source: its first conv says
        first = next((m for m in model.modules() if isinstance(m, torch.nn.Conv2d)), None)
        channels = first.in_channels if first is not None else 3
    return (batch, int(channels), size, size)


def reinitialise(model, seed: int = 0) -> None:
    """Give ``model`` fresh weights drawn the way its zoo architecture initialises them, at its current widths.

    Every layer is reset (PyTorch defaults, BN statistics cleared), then the architecture's own
    ``init_weights`` runs; seeded, and the global RNG state is left as it was.
    """

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in model.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()  # BatchNorm's also clears its running statistics
        init = getattr(model, "init_weights", None)
        if callable(init):
            init()
