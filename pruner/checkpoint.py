"""Checkpoints as data: the architecture (zoo name + per-layer shapes) and tensors, never pickled objects.

A checkpoint is a dict saved by ``torch.save`` and read with ``torch.load(weights_only=True)``:
``{"format": "edgeshift-checkpoint", "version": 1, "arch": {...}, "state_dict": {...}, "masks": {...}, "meta": {...}}``.
``arch["layers"]`` records every Conv2d / Linear / BatchNorm2d (and BNs fused away, layers or blocks removed) so a
pruned model is rebuilt at its own widths and depth.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from edgeshift.core.atomic import atomic_path
from edgeshift.core.errors import EdgeshiftError, InputFileError, require_file

from .fuse import NormActRemainder, reparameterize
from .models import sources
from .models.record import ModelRecord, record_of, set_record

FORMAT = "edgeshift-checkpoint"
VERSION = 1


# Attributes that hold a module's widths: recorded for any module pruning resized (a timm Conv2dSame, a
# BatchNormAct2d, a GroupNorm, an attention that lost heads, ...), whose class is then rebuilt by its source and
# given these widths.
WIDTH_ATTRS = (
    "in_channels",
    "out_channels",
    "groups",
    "num_features",
    "in_features",
    "out_features",
    "num_channels",
    "num_groups",
    "normalized_shape",
    "num_heads",  # attention heads removed (timm's Attention and the zoo's ViT read these in forward)
    "attn_dim",
)


def _resized_spec(m: nn.Module, ref: nn.Module) -> dict | None:
    """A module of its source's class whose tensors changed shape (or appeared, as a bias folded in)."""
    own = {
        **{k: v for k, v in m._parameters.items() if v is not None},
        **{k: v for k, v in m._buffers.items() if v is not None},
    }
    theirs = {
        **{k: v for k, v in ref._parameters.items() if v is not None},
        **{k: v for k, v in ref._buffers.items() if v is not None},
    }
    split_widths = dict(vars(m).get("edgeshift_split_widths", {}))  # chunk widths its code splits at (plan.py)
    if (
        own.keys() == theirs.keys()
        and all(own[k].shape == theirs[k].shape for k in own)
        and all(getattr(m, a) == getattr(ref, a) for a in WIDTH_ATTRS if a in vars(m))
        and all(getattr(ref, a, None) == v for a, v in split_widths.items())
    ):
        return None
    attrs = {
        a: (list(v) if isinstance(v, tuple) else v) for a in WIDTH_ATTRS if a in vars(m) for v in [getattr(m, a)]
    }  # plain attributes only (a property derives from its children)
    if split_widths:
        attrs.update(split_widths, edgeshift_split_widths=split_widths)
    tensors = {k: {"shape": list(v.shape), "parameter": k in m._parameters} for k, v in own.items()}
    return {"type": "Resized", "attrs": attrs, "tensors": tensors}


def _resize(module: nn.Module, spec: dict) -> nn.Module:
    for attr, value in spec["attrs"].items():
        setattr(module, attr, tuple(value) if attr == "normalized_shape" else value)
    for name, t in spec["tensors"].items():
        empty = torch.empty(t["shape"])
        if t["parameter"]:
            module._parameters[name] = nn.Parameter(empty)
        else:
            module._buffers[name] = empty
    return module


def _layer_spec(m: nn.Module) -> dict | None:
    if type(m) is nn.Conv2d:
        return {
            "type": "Conv2d",
            "in": m.in_channels,
            "out": m.out_channels,
            "kernel": list(m.kernel_size),
            "stride": list(m.stride),
            "padding": list(m.padding) if not isinstance(m.padding, str) else m.padding,
            "dilation": list(m.dilation),
            "groups": m.groups,
            "bias": m.bias is not None,
        }
    if type(m) is nn.Linear:
        return {"type": "Linear", "in": m.in_features, "out": m.out_features, "bias": m.bias is not None}
    if type(m) is nn.BatchNorm2d:
        return {"type": "BatchNorm2d", "features": m.num_features, "eps": m.eps, "momentum": m.momentum}
    return None


def _build_layer(spec: dict) -> nn.Module:
    kind = spec["type"]
    if kind == "Conv2d":
        padding = spec["padding"] if isinstance(spec["padding"], str) else tuple(spec["padding"])
        return nn.Conv2d(
            spec["in"],
            spec["out"],
            tuple(spec["kernel"]),
            tuple(spec["stride"]),
            padding,
            tuple(spec["dilation"]),
            spec["groups"],
            spec["bias"],
        )
    if kind == "Linear":
        return nn.Linear(spec["in"], spec["out"], spec["bias"])
    if kind == "BatchNorm2d":
        return nn.BatchNorm2d(spec["features"], eps=spec["eps"], momentum=spec["momentum"])
    if kind == "Identity":
        return nn.Identity()
    raise EdgeshiftError(f"checkpoint names an unsupported layer type {kind!r}")


def architecture_of(model: nn.Module) -> dict:
    """The data needed to rebuild ``model``: its zoo recipe plus the shape of every layer."""

    record = record_of(model)
    reference = dict(_reference_model(record).named_modules())
    layers = {}
    for name, m in model.named_modules():
        spec = _layer_spec(m)
        ref = reference.get(name)
        if spec is not None:
            layers[name] = spec
        elif isinstance(m, nn.Identity) and ref is not None and not isinstance(ref, nn.Identity):
            layers[name] = {"type": "Identity"}  # a BN fused away, or a layer or block removed
        elif isinstance(m, NormActRemainder) and ref is not None and not isinstance(ref, NormActRemainder):
            layers[name] = {"type": "NormActRemainder"}  # a norm+activation's norm fused away
        elif ref is not None and type(ref) is type(m):
            resized = _resized_spec(m, ref)
            if resized is not None:
                layers[name] = resized
        elif any(True for _ in m.parameters(recurse=False)) or any(True for _ in m.buffers(recurse=False)):
            raise EdgeshiftError(
                f"cannot record module {name!r} ({type(m).__name__}): it is not in model "
                f"{record.name!r} as built from its source"
            )
    return {**record.to_dict(), "layers": layers}


def _reference_model(record: ModelRecord) -> nn.Module:
    model = sources.create(
        record.name, num_classes=record.num_classes, input_size=record.input_size, kwargs=dict(record.kwargs)
    )
    if record.reparameterized:  # its multi-branch blocks were folded into single convs
        model.eval()
        reparameterize(model)
    return model


def build_from_architecture(arch: dict) -> nn.Module:
    """Rebuild the (possibly pruned and fused) module structure recorded by ``architecture_of``."""

    record = ModelRecord.from_dict(arch)
    model = _reference_model(record)
    known = dict(model.named_modules())
    for name, spec in arch.get("layers", {}).items():
        if name not in known:
            raise EdgeshiftError(f"checkpoint names layer {name!r}, which architecture {record.name!r} does not have")
        if spec["type"] == "Resized":
            _resize(known[name], spec)
        elif spec["type"] == "NormActRemainder":
            ref = known[name]
            model.set_submodule(name, NormActRemainder(getattr(ref, "drop", None) or nn.Identity(), ref.act))
        else:
            model.set_submodule(name, _build_layer(spec))
    set_record(model, record)  # keeps e.g. the normalisation
    return model


def save_checkpoint(
    model: nn.Module, path: str | os.PathLike, *, masks: dict | None = None, meta: dict | None = None
) -> Path:
    """Write ``model`` (and optional masks / metadata) atomically to ``path``."""
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "arch": architecture_of(model),
        "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "masks": {k: v.detach().to(torch.bool).clone() for k, v in (masks or {}).items()},
        "meta": dict(meta or {}),
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def read_checkpoint(path: str | os.PathLike) -> dict:
    """Load the raw checkpoint dict with ``weights_only=True``; errors name the file and the problem."""
    require_file(path, "checkpoint")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InputFileError(f"{path} is not a readable edgeshift checkpoint ({first[:160]})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise InputFileError(
            f"{path} is not an edgeshift checkpoint (expected a dict with format={FORMAT!r}); "
            "create one with pruner.save_checkpoint or `edgeshift train`"
        )
    if payload.get("version") != VERSION:
        raise InputFileError(f"{path} has checkpoint version {payload.get('version')}; this edgeshift reads {VERSION}")
    return payload


def load_checkpoint(path: str | os.PathLike) -> tuple[nn.Module, dict]:
    """Rebuild the model stored at ``path``; returns (model in eval mode, the raw checkpoint dict)."""
    payload = read_checkpoint(path)
    model = build_from_architecture(payload["arch"])
    try:
        model.load_state_dict(payload["state_dict"], strict=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())
        raise InputFileError(
            f"{path}: tensors do not match architecture {payload['arch']['name']!r}: {detail[:240]}"
        ) from None
    model.eval()
    return model, payload


def load_model(checkpoint: str | os.PathLike | None = None, spec=None) -> tuple[nn.Module, dict]:
    """A build command's model: an edgeshift checkpoint, or a model source with its weights
    (``sources.ModelSpec``); exactly one. Returns (model in eval mode, the checkpoint dict or its stand-in)."""
    if (checkpoint is None) == (spec is None):
        raise EdgeshiftError(
            "pass either a checkpoint or --arch SOURCE (with --weights FILE for trained weights), "
            "not both and not neither"
        )
    if checkpoint is not None:
        return load_checkpoint(checkpoint)
    model = spec.build()
    return model, {
        "format": FORMAT,
        "version": VERSION,
        "arch": record_of(model).to_dict(),
        "masks": {},
        "meta": {"source": spec.source, **({"weights": str(spec.weights)} if spec.weights else {})},
    }
