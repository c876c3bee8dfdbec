"""Where a model comes from, as one string every build command and the pipeline accept:

* a zoo name: ``resnet20`` (``edgeshift.pruner.models``);
* ``timm/NAME``: ``timm.create_model(NAME, num_classes=...)``, where timm imports;
* ``torchvision/NAME``: ``torchvision.models.get_model(NAME, num_classes=...)``, where torchvision imports;
* a factory of the user's own, ``package.module:function``, called with the keyword arguments given (and
  ``num_classes`` when the function takes it).

The string, the keyword arguments, the class count and the input size are recorded on the model
(``record.ModelRecord``), so a checkpoint stores the recipe as data and rebuilds the model from it.
"""

from __future__ import annotations

import importlib
import inspect
import json
import re
import sys
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from edgeshift.core.errors import EdgeshiftError, InputFileError, require_file

from . import zoo
from .record import ModelRecord, record_of, set_record

KINDS = ("zoo", "timm", "torchvision", "factory")
_FACTORY = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*$")


class ModelSourceError(EdgeshiftError):
    """A model source cannot be resolved or built."""


@dataclass(frozen=True)
class ModelSource:
    """A parsed source string: its kind and what it names within that kind."""

    kind: str  # one of KINDS
    name: str  # zoo name, timm/torchvision model name, or "package.module:function"

    def __str__(self) -> str:
        return self.name if self.kind in ("zoo", "factory") else f"{self.kind}/{self.name}"


def parse(text: str) -> ModelSource:
    """The source named by ``text``; a malformed one raises ModelSourceError saying the accepted forms."""
    text = str(text).strip()
    forms = "a zoo name (resnet20, ...), timm/NAME, torchvision/NAME or package.module:function"
    if "/" in text:
        prefix, _, name = text.partition("/")
        if prefix not in ("timm", "torchvision") or not name or "/" in name:
            raise ModelSourceError(f"unknown model source {text!r}; expected {forms}")
        return ModelSource(prefix, name)
    if ":" in text:
        if not _FACTORY.match(text):
            raise ModelSourceError(f"model factory {text!r} is not of the form package.module:function")
        return ModelSource("factory", text)

    if text not in zoo.names():
        raise ModelSourceError(
            f"unknown architecture {text!r}; known: {', '.join(zoo.names())}; or a model "
            "source timm/NAME, torchvision/NAME or package.module:function"
        )
    return ModelSource("zoo", text)


def _import(module: str, what: str):
    try:
        return importlib.import_module(module)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelSourceError(f"{what}: cannot import {module!r} ({type(exc).__name__}: {first[:160]})") from None


def _factory(name: str) -> Callable[..., Any]:
    module, _, func = name.partition(":")
    if "" not in sys.path and "." not in sys.path:
        sys.path.insert(0, "")  # a factory next to the user's config or in their working folder imports
    fn = getattr(_import(module, f"model factory {name}"), func, None)
    if not callable(fn):
        raise ModelSourceError(f"model factory {name}: module {module!r} has no function {func!r}")
    return fn


def _accepts(fn: Callable, key: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return key in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


@dataclass(frozen=True)
class Defaults:
    """What a source's own configuration says about its input, where it says anything."""

    input_size: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
TORCHVISION_DEFAULTS = Defaults(224, IMAGENET_MEAN, IMAGENET_STD)


def config_defaults(model: nn.Module) -> Defaults:
    """Input size and normalisation from a model's own config (timm's ``pretrained_cfg``), where it has one."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if not isinstance(cfg, dict):
        return Defaults()
    size = cfg.get("input_size")
    side = int(size[-1]) if isinstance(size, (tuple, list)) and size else None
    mean, std = cfg.get("mean"), cfg.get("std")
    return Defaults(side, tuple(map(float, mean)) if mean else None, tuple(map(float, std)) if std else None)


def build(source: ModelSource, num_classes: int | None, kwargs: dict) -> nn.Module:
    """An nn.Module from ``source`` (fresh weights); errors are one line naming the source."""
    kw = dict(kwargs)
    if source.kind == "timm":
        timm = _import("timm", f"model source {source}")
        if num_classes is not None:
            kw["num_classes"] = num_classes
        try:
            return timm.create_model(source.name, pretrained=False, **kw)
        except RuntimeError as exc:  # timm's unknown-model error
            raise ModelSourceError(f"model source {source}: {str(exc).splitlines()[0][:200]}") from None
    if source.kind == "torchvision":
        models = _import("torchvision.models", f"model source {source}")
        if source.name not in models.list_models():
            raise ModelSourceError(f"torchvision has no model {source.name!r}; see torchvision.models.list_models()")
        if num_classes is not None:
            kw["num_classes"] = num_classes
        return models.get_model(source.name, weights=None, **kw)
    fn = _factory(source.name)
    if num_classes is not None and _accepts(fn, "num_classes"):
        kw.setdefault("num_classes", num_classes)
    model = fn(**kw)
    if not isinstance(model, nn.Module):
        raise ModelSourceError(f"model factory {source.name} returned {type(model).__name__}, not a torch nn.Module")
    return model


def create(
    text: str, num_classes: int | None = None, input_size: int | None = None, kwargs: dict | None = None
) -> nn.Module:
    """Build the model ``text`` names, recording how (``record.ModelRecord``): the front door for every source."""
    source = parse(text)
    kwargs = dict(kwargs or {})
    if source.kind == "zoo":
        return zoo.get(source.name, num_classes=num_classes, input_size=input_size, **kwargs)
    try:
        model = build(source, num_classes, kwargs)
    except EdgeshiftError:
        raise
    except TypeError as exc:
        raise ModelSourceError(f"bad options for model source {source}: {exc}") from None
    except Exception as exc:  # the user's factory, or a library, failed building
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelSourceError(f"model source {source} failed to build: {type(exc).__name__}: {first[:200]}") from None
    # torchvision's classification models are defined at 224 with ImageNet's normalisation
    defaults = TORCHVISION_DEFAULTS if source.kind == "torchvision" else config_defaults(model)
    size = input_size or defaults.input_size
    if size is None:
        raise ModelSourceError(
            f"model source {source} does not say its input size; pass it (--input-size, or "
            "input_size in the pipeline's [model])"
        )
    classes = num_classes if num_classes is not None else _output_features(model)
    record = ModelRecord(str(source), classes, int(size), kwargs)
    if defaults.mean and defaults.std:
        record = record.with_normalisation(defaults.mean, defaults.std)
    set_record(model, record)
    return model


def _output_features(model: nn.Module) -> int | None:
    last = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return int(last[-1].out_features) if last else None


def parse_kwargs(text: str | None) -> dict:
    """A model source's keyword arguments from the command line: a JSON object, e.g. '{"width": 8}'."""

    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ModelSourceError(
            f"--arch-kwargs is not JSON ({exc.msg} at character {exc.pos}); pass an object "
            """such as '{"width": 8}'"""
        ) from None
    if not isinstance(value, dict):
        raise ModelSourceError("""--arch-kwargs must be a JSON object such as '{"width": 8}'""")
    return value


@dataclass(frozen=True)
class ModelSpec:
    """A model named by its source, with what builds it: the ``--arch``, ``--arch-kwargs``, ``--weights``,
    ``--input-size`` and ``--num-classes`` options of every build command (or the pipeline's [model])."""

    source: str
    kwargs: tuple[tuple[str, Any], ...] = ()
    weights: str | None = None  # a trained state dict (torch.load with weights_only=True)
    input_size: int | None = None
    num_classes: int | None = None

    def build(self) -> nn.Module:
        """The model in eval mode, with the weights loaded when given."""
        model = create(self.source, self.num_classes, self.input_size, dict(self.kwargs))
        if self.weights:
            load_weights(model, self.weights, self.source)
        return model.eval()


def load_weights(model: nn.Module, path: str, source: str = "") -> None:
    """Load a trained state dict (``torch.load(weights_only=True)``) into ``model``; a file that does not fit is
    one line naming the first few missing, unexpected and mis-shaped keys with their counts."""

    require_file(path, "weights file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InputFileError(
            f"{path} is not a readable state dict ({first[:160]}); save one with torch.save(model.state_dict(), path)"
        ) from None
    for key in ("state_dict", "model", "model_state_dict"):  # common wrappers, edgeshift checkpoints included
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputFileError(
            f"{path} does not hold a state dict (a dict of tensors); save one with torch.save(model.state_dict(), path)"
        )
    if state and all(k.startswith("module.") for k in state):  # saved from DataParallel / DDP
        state = {k[len("module.") :]: v for k, v in state.items()}
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shaped = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or shaped:
        parts = [
            f"{len(lst)} {what} ({', '.join(lst[:3])}{', ...' if len(lst) > 3 else ''})"
            for what, lst in (("missing", missing), ("unexpected", unexpected), ("of another shape", shaped))
            if lst
        ]
        raise InputFileError(
            f"{path} does not fit model {source or type(model).__name__}: {'; '.join(parts)}; "
            "pass the state dict of this model with the same options"
        )
    model.load_state_dict(state, strict=True)


def input_size_of(text: str, input_size: int | None = None, kwargs: dict | None = None) -> int:
    """The square input side ``text`` builds for: the given one, the zoo's, or the model's own config."""
    if input_size:
        return int(input_size)
    source = parse(text)
    if source.kind == "zoo":
        return zoo.entry(source.name).input_size
    return record_of(create(text, kwargs=kwargs)).input_size
