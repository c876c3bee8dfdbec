"""The model zoo registry: ``get(name, num_classes=..., **kw)`` builds a zoo model and records how, as data."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from runtime.errors import UnknownNameError


@dataclass(frozen=True)
class ZooEntry:
    """One buildable architecture."""

    builder: Callable  # builds the nn.Module from (num_classes, **kw)
    num_classes: int  # default class count
    input_size: int  # default square input side
    help: str


def _entries() -> dict[str, ZooEntry]:
    from . import mobilenetv2, resnet, vgg

    return {
        "vgg11": ZooEntry(vgg.vgg11, 10, 32, "CIFAR VGG-11, one linear layer"),
        "vgg16": ZooEntry(vgg.vgg16, 10, 32, "CIFAR VGG-16, one linear layer (OpenLTH)"),
        "vgg19": ZooEntry(vgg.vgg19, 10, 32, "CIFAR VGG-19, one linear layer"),
        "resnet20": ZooEntry(resnet.resnet20, 10, 32, "CIFAR ResNet-20 (16/32/64 channels)"),
        "resnet56": ZooEntry(resnet.resnet56, 10, 32, "CIFAR ResNet-56"),
        "resnet18": ZooEntry(resnet.resnet18, 1000, 224, "ImageNet ResNet-18; stem='imagenet'|'cifar'"),
        "resnet50": ZooEntry(resnet.resnet50, 1000, 224, "ImageNet ResNet-50; stem='imagenet'|'cifar'"),
        "mobilenetv2": ZooEntry(mobilenetv2.mobilenetv2, 1000, 224, "MobileNetV2; width_mult, small_input"),
    }


def names() -> list[str]:
    return sorted(_entries())


def entry(name: str) -> ZooEntry:
    entries = _entries()
    if name not in entries:
        raise UnknownNameError("architecture", name, entries)
    return entries[name]


def get(name: str, num_classes: int | None = None, input_size: int | None = None, **kw):
    """Build zoo model ``name``; fails naming the known architectures on an unknown name.

    ``input_size`` is recorded with the model (for export and profiling), not used by the layers.
    """
    e = entry(name)
    num_classes = e.num_classes if num_classes is None else int(num_classes)
    try:
        model = e.builder(num_classes=num_classes, **kw)
    except TypeError as exc:
        from runtime.errors import EdgeshiftError

        raise EdgeshiftError(f"bad options for architecture {name!r}: {exc}") from None
    model.edgeshift_arch = {
        "name": name,
        "num_classes": num_classes,
        "input_size": int(input_size or e.input_size),
        "kwargs": dict(kw),
    }
    return model


create_model = get


def input_shape(model, batch: int = 1) -> tuple[int, int, int, int]:
    """The (N, C, H, W) input shape recorded for a zoo model."""
    arch = getattr(model, "edgeshift_arch", None)
    if arch is None:
        raise ValueError("model was not built by the zoo; pass example inputs explicitly")
    size = arch["input_size"]
    return (batch, int(arch["kwargs"].get("in_channels", 3)), size, size)


def reinitialise(model, seed: int = 0) -> None:
    """Give ``model`` fresh weights drawn the way its zoo architecture initialises them, at its current widths.

    Every layer is reset (PyTorch defaults, BN statistics cleared), then the architecture's own
    ``init_weights`` runs; seeded, and the global RNG state is left as it was.
    """
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in model.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()  # BatchNorm's also clears its running statistics
        init = getattr(model, "init_weights", None)
        if callable(init):
            init()
