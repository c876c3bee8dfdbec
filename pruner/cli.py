"""Build-side commands (need the ``build`` extra): each parses its options and calls one library function."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from edgeshift.core.atomic import check_output_path, write_text_atomic
from edgeshift.core.commands import handle_errors
from edgeshift.core.errors import EdgeshiftError, require_file
from edgeshift.core.lazy import lazy_module

# The library behind these commands imports torch (seconds): it loads when a build command runs, so that
# `edgeshift --help` and the device commands never pay for it, and a device without torch still lists its commands.
sources = lazy_module("edgeshift.pruner.models.sources")
prune_cmd = lazy_module("edgeshift.pruner.prune_cmd")
pai = lazy_module("edgeshift.pruner.pai")
layerprune = lazy_module("edgeshift.pruner.layers.layerprune")
slim = lazy_module("edgeshift.pruner.slim")
distillation = lazy_module("edgeshift.pruner.distill")
train = lazy_module("edgeshift.pruner.train")
imp_run = lazy_module("edgeshift.pruner.imp")
distributed = lazy_module("edgeshift.pruner.distributed")
train_checkpoint = lazy_module("edgeshift.pruner.train_checkpoint")
methods = lazy_module("edgeshift.pruner.methods.registry")
ort_profile = lazy_module("edgeshift.exporter.profile")
layer_prices = lazy_module("edgeshift.exporter.layer_prices")


def _check_outputs(force: bool, *paths: Optional[Path]) -> None:
    """Refuse, before any work, to overwrite outputs without --force or to write into a missing folder."""
    for path in paths:
        if path is not None:
            check_output_path(path, force)


SOURCE_HELP = (
    "Model source: a zoo name (resnet20, ...), timm/NAME, torchvision/NAME or a factory of your own, "
    "package.module:function."
)


def _arch_option(required: bool = False):
    return typer.Option(... if required else None, "--arch", help=SOURCE_HELP)


def model_spec(
    arch: Optional[str],
    arch_kwargs: Optional[str],
    weights: Optional[Path],
    input_size: Optional[int],
    num_classes: Optional[int],
):
    """The model source the options name (None without --arch); the other options only go with --arch."""
    if arch is None:
        given = [
            flag
            for flag, value in (("--arch-kwargs", arch_kwargs), ("--weights", weights), ("--input-size", input_size))
            if value
        ]
        if given:
            raise EdgeshiftError(
                f"{', '.join(given)} go{'es' if len(given) == 1 else ''} with --arch SOURCE; a "
                "checkpoint already records its model"
            )
        return None
    sources.parse(arch)  # an unknown source fails here, before any work
    if weights is not None:
        require_file(weights, "weights file")
    return sources.ModelSpec(
        arch,
        tuple(sorted(sources.parse_kwargs(arch_kwargs).items())),
        str(weights) if weights else None,
        input_size,
        num_classes,
    )


ARCH_KWARGS_HELP = """Keyword arguments of the model source, as a JSON object: '{"width": 8}'."""
WEIGHTS_HELP = "A trained state dict for the model source (loaded with weights_only=True)."
INPUT_SIZE_HELP = "Square input side. Default: the source's (zoo, torchvision 224, timm's config)."
DISTILL_HELP = (
    "Share of the training loss matching the input model's softened outputs (knowledge distillation, "
    "temperature 4), in [0, 1); 0: labels only."
)


class PruneMode(str, Enum):
    exact = "exact"
    drop = "drop"


def prune(
    checkpoint: Optional[Path] = typer.Argument(None, help="An edgeshift checkpoint of a (sparse) model; or --arch."),
    out: Path = typer.Option(..., "-o", "--out", help="Where to write the pruned checkpoint."),
    arch: Optional[str] = _arch_option(),
    arch_kwargs: Optional[str] = typer.Option(None, help=ARCH_KWARGS_HELP),
    weights: Optional[Path] = typer.Option(None, help=WEIGHTS_HELP),
    input_size: Optional[int] = typer.Option(None, min=1, help=INPUT_SIZE_HELP),
    num_classes: Optional[int] = typer.Option(None, min=1, help="Class count of the model source."),
    mode: PruneMode = typer.Option(PruneMode.exact, help="exact: never change outputs; drop: the published rule."),
    align: int = typer.Option(
        1,
        min=1,
        help="Round widths up to multiples of this with zero channels (exact); "
        "8 helps ONNX Runtime with several intra-op threads.",
    ),
    batch: int = typer.Option(2, help="Batch size of the random example inputs used to verify the prune."),
    seed: int = typer.Option(0, help="Seed of the example inputs."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the report as JSON here."),
    force: bool = typer.Option(False, "--force", help="Overwrite existing output files."),
) -> None:
    """Remove every channel of a sparse model that cannot change its output; print the report."""
    spec = model_spec(arch, arch_kwargs, weights, input_size, num_classes)
    _check_outputs(force, out, json_out)
    report = prune_cmd.prune_checkpoint(
        checkpoint, out, mode=mode.value, batch=batch, seed=seed, align=align, spec=spec
    )
    typer.echo(report.table())
    if json_out is not None:
        write_text_atomic(json_out, json.dumps(report.to_dict(), indent=2))
    typer.echo(f"wrote {out}")


class SparsityAverage(str, Enum):
    layer_mean = "layer-mean"
    global_ = "global"


def pai_cmd(
    arch: str = typer.Option(..., help=SOURCE_HELP),
    arch_kwargs: Optional[str] = typer.Option(None, help=ARCH_KWARGS_HELP),
    sparsity: float = typer.Option(..., help="Fraction P of the conv and linear weights removed, in (0, 1)."),
    out: Path = typer.Option(..., "-o", "--out", help="Checkpoint to write: the initialised model and its masks."),
    scorer: str = typer.Option("magnitude", help="Unstructured scorer: magnitude, synflow or random."),
    all_layers: bool = typer.Option(False, "--all-layers", help="Shrink every layer (plain structured PaI)."),
    inverted: bool = typer.Option(False, "--inverted", help="Shrink the sensitive layers instead of the resilient."),
    unstructured: bool = typer.Option(False, "--unstructured", help="Shrink nothing (unstructured PaI)."),
    average: SparsityAverage = typer.Option(
        SparsityAverage.layer_mean, help="S_avg: mean of the layer sparsities, or the global zero fraction."
    ),
    num_classes: Optional[int] = typer.Option(None, help="Default: the architecture's."),
    input_size: Optional[int] = typer.Option(None, help="Square input side. Default: the architecture's."),
    seed: int = typer.Option(0, help="Initialisation, scorer and re-initialisation seed."),
    latency: bool = typer.Option(
        True,
        "--latency/--no-latency",
        "--profile/--no-profile",  # the earlier spelling, still read
        help="Time the dense and the pruned model through ONNX Runtime.",
    ),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the report as JSON here."),
    force: bool = typer.Option(False, "--force", help="Overwrite existing output files."),
) -> None:
    """Prune a freshly initialised model at initialisation, structurally where layers can take it (Reconvene)."""
    chosen = [
        name
        for name, on in (("--all-layers", all_layers), ("--inverted", inverted), ("--unstructured", unstructured))
        if on
    ]
    if len(chosen) > 1:
        raise EdgeshiftError(f"{' and '.join(chosen)} exclude each other: pass at most one")
    mode = {"--all-layers": "all-layers", "--inverted": "inverted", "--unstructured": "unstructured"}.get(
        chosen[0] if chosen else "", "reconvene"
    )
    _check_outputs(force, out, json_out)
    cfg = pai.PaiConfig(
        arch=arch,
        sparsity=sparsity,
        scorer=scorer,
        mode=mode,
        average=average.value,
        num_classes=num_classes,
        input_size=input_size,
        seed=seed,
        measure_latency=latency,
        arch_kwargs=tuple(sorted(sources.parse_kwargs(arch_kwargs).items())),
    )
    report = pai.save_pai(cfg, out, json_out, ort_profile.cpu_measurer(cfg.latency_threads, cfg.latency_iterations))
    typer.echo(report.table())
    typer.echo(f"wrote {out}" + (f" and {json_out}" if json_out else ""))


def layerprune_cmd(
    checkpoint: Optional[Path] = typer.Argument(
        None, help="A trained edgeshift checkpoint (unfused, e.g. from `train`); or --arch with --weights."
    ),
    criterion: str = typer.Option(..., help="imprint, weight-norm, taylor, bn-scale or ensemble."),
    out: Path = typer.Option(..., "-o", "--out", help="Checkpoint to write: the layer-pruned (fine-tuned) model."),
    data: str = typer.Option(
        ...,
        help="The data the model was trained on: 'generated', an ImageFolder root or a "
        "CIFAR-10 python folder (criteria, accuracy, fine-tuning).",
    ),
    remove: Optional[int] = typer.Option(None, help="Remove this many lowest-ranked candidates."),
    latency_budget: Optional[float] = typer.Option(
        None, help="Or remove until the p95 latency (ms) under --profile is at most this."
    ),
    profile: str = typer.Option("host", help="Device profile (name or TOML file) for every latency figure."),
    epochs: int = typer.Option(5, min=0, help="Fine-tuning epochs (0: none)."),
    iterations: Optional[int] = typer.Option(None, help="Fine-tuning optimiser steps instead of epochs."),
    lr: float = typer.Option(0.01, help="Fine-tuning peak learning rate (cosine schedule)."),
    batch_size: int = typer.Option(128, min=1),
    weight_decay: float = typer.Option(5e-4),
    train_samples: Optional[int] = typer.Option(None, help="Fine-tune on a stratified subset of this size."),
    test_samples: Optional[int] = typer.Option(None, help="Measure accuracy on a stratified subset of this size."),
    imprint_samples: int = typer.Option(2000, help="Training images the data-driven criteria see."),
    distill: float = typer.Option(0.0, help=DISTILL_HELP),
    seed: int = typer.Option(0),
    arch: Optional[str] = _arch_option(),
    arch_kwargs: Optional[str] = typer.Option(None, help=ARCH_KWARGS_HELP),
    weights: Optional[Path] = typer.Option(None, help=WEIGHTS_HELP),
    input_size: Optional[int] = typer.Option(None, min=1, help=INPUT_SIZE_HELP),
    num_classes: Optional[int] = typer.Option(None, min=1, help="Class count of the model source."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the report as JSON here."),
    force: bool = typer.Option(False, "--force", help="Overwrite existing output files."),
) -> None:
    """Rank layers and residual blocks, remove the least useful in one shot, fine-tune; print the report."""
    spec = model_spec(arch, arch_kwargs, weights, input_size, num_classes)
    _check_outputs(force, out, json_out)
    cfg = layerprune.LayerPruneConfig(
        criterion=criterion,
        remove=remove,
        latency_budget_ms=latency_budget,
        profile=profile,
        imprint_samples=imprint_samples,
        seed=seed,
    )
    distill_cfg = distillation.DistillConfig(weight=distill)
    distill_cfg.validate()
    finetune = None
    if epochs or iterations:
        finetune = _train_config(epochs, iterations, batch_size, lr, 0.9, weight_decay, Schedule.cosine, 0, seed, True)
    report = layerprune.layerprune_checkpoint(
        checkpoint,
        out,
        cfg,
        data=data,
        finetune=finetune,
        train_samples=train_samples,
        test_samples=test_samples,
        json_out=json_out,
        measure=ort_profile.OrtMeasurer(cfg.profile),
        distill=distill_cfg,
        say=typer.echo,
        spec=spec,
    )
    typer.echo(report.table())
    typer.echo(f"wrote {out}" + (f" and {json_out}" if json_out else ""))


class Pricing(str, Enum):
    latency = "latency"
    macs = "macs"


def slim_cmd(
    checkpoint: Optional[Path] = typer.Argument(
        None, help="A trained edgeshift checkpoint (unfused, e.g. from `train`); or --arch with --weights."
    ),
    target: float = typer.Option(
        ...,
        help="The slim model's cost as a fraction of the dense model's, in (0, 1]: "
        "0.5 = half the dense p50 under --profile.",
    ),
    out: Path = typer.Option(..., "-o", "--out", help="Checkpoint to write: the slim (pruned, fine-tuned) model."),
    data: str = typer.Option(
        ..., help="The data the model was trained on: 'generated', an ImageFolder root or a CIFAR-10 python folder."
    ),
    pricing: Pricing = typer.Option(
        Pricing.latency,
        help="What a channel costs: latency (every layer timed under --profile over a width sweep) or macs.",
    ),
    profile: str = typer.Option("host", help="Device profile (name or TOML file) for prices and latencies."),
    gate_epochs: float = typer.Option(1.0, help="Epochs the gates learn with the model."),
    epochs: float = typer.Option(1.0, min=0, help="Fine-tuning epochs after, closed channels held at zero."),
    lr: float = typer.Option(0.01, help="Peak learning rate of the weights (cosine), both phases."),
    batch_size: int = typer.Option(128, min=1),
    align: int = typer.Option(8, min=1, help="Every group keeps a multiple of this many channels (1: any width)."),
    pad_to: int = typer.Option(
        16,
        min=1,
        help="Also time the widths rounded up to multiples of this (zero "
        "channels, exact) and keep them if faster under --profile.",
    ),
    distill: float = typer.Option(0.0, help=DISTILL_HELP),
    train_samples: Optional[int] = typer.Option(None, help="Train on a stratified subset of this size."),
    test_samples: Optional[int] = typer.Option(None, help="Measure accuracy on a stratified subset of this size."),
    seed: int = typer.Option(0),
    arch: Optional[str] = _arch_option(),
    arch_kwargs: Optional[str] = typer.Option(None, help=ARCH_KWARGS_HELP),
    weights: Optional[Path] = typer.Option(None, help=WEIGHTS_HELP),
    input_size: Optional[int] = typer.Option(None, min=1, help=INPUT_SIZE_HELP),
    num_classes: Optional[int] = typer.Option(None, min=1, help="Class count of the model source."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the report as JSON here."),
    force: bool = typer.Option(False, "--force", help="Overwrite existing output files."),
) -> None:
    """Learn each layer's width on a trained model (learned filter masks priced by device latency) to a target
    fraction of its cost, fine-tune, prune exactly; print the report."""
    cfg = slim.SlimConfig(
        target=target,
        pricing=pricing.value,
        gate_epochs=gate_epochs,
        finetune_epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        align=align,
        pad_to=pad_to,
        distill=distill,
        seed=seed,
    )
    cfg.validate()
    spec = model_spec(arch, arch_kwargs, weights, input_size, num_classes)
    _check_outputs(force, out, json_out)
    measure = ort_profile.OrtMeasurer(profile)
    pricer = layer_prices.LatencyPricer(measure.profile) if pricing is Pricing.latency else layer_prices.MacsPricer()
    report = slim.slim_checkpoint(
        checkpoint,
        out,
        cfg,
        data=data,
        pricer=pricer,
        measure=measure,
        train_samples=train_samples,
        test_samples=test_samples,
        json_out=json_out,
        spec=spec,
        say=typer.echo,
    )
    typer.echo(report.table())
    typer.echo(f"wrote {out}" + (f" and {json_out}" if json_out else ""))


class Method(str, Enum):
    imp = "imp"
    magnitude = "magnitude"
    random = "random"
    synflow = "synflow"


class Schedule(str, Enum):
    cosine = "cosine"
    step = "step"


class Optimizer(str, Enum):
    sgd = "sgd"
    adamw = "adamw"


def _train_config(
    epochs, iterations, batch_size, lr, momentum, weight_decay, schedule, warmup, seed, augment, optimizer=Optimizer.sgd
):
    return train.TrainConfig(
        optimizer=optimizer.value,
        epochs=epochs,
        iterations=iterations,
        batch_size=batch_size,
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        schedule=schedule.value,
        warmup_steps=warmup,
        seed=seed,
        augment=augment,
    )


def imp(
    arch: str = typer.Option(..., help=SOURCE_HELP),
    arch_kwargs: Optional[str] = typer.Option(None, help=ARCH_KWARGS_HELP),
    weights: Optional[Path] = typer.Option(None, help=WEIGHTS_HELP + " Level 0 trains from them."),
    input_size: Optional[int] = typer.Option(None, min=1, help=INPUT_SIZE_HELP),
    data: str = typer.Option(
        ..., help="'generated', an ImageFolder root (<root>/train|test/<class>/*.jpg) or a CIFAR-10 python folder."
    ),
    levels: int = typer.Option(5, min=0, help="Levels after the dense one: level k keeps (1-f)^k of the weights."),
    out: Path = typer.Option(..., "--out", help="Run directory (resumed if it exists with the same options)."),
    method: Method = typer.Option(Method.imp, help="imp, or a one-shot baseline: magnitude, random, synflow."),
    prune_fraction: float = typer.Option(
        0.5, help="Fraction of the remaining weights pruned per level (0.2: the classic rate)."
    ),
    rewind_step: int = typer.Option(0, min=0, help="Optimiser step the surviving weights rewind to."),
    epochs: int = typer.Option(10, min=1, help="Epochs per level."),
    iterations: Optional[int] = typer.Option(None, help="Optimiser steps per level instead of epochs."),
    batch_size: int = typer.Option(128, min=1),
    lr: float = typer.Option(0.1),
    momentum: float = typer.Option(0.9),
    weight_decay: float = typer.Option(5e-4),
    schedule: Schedule = typer.Option(Schedule.cosine),
    warmup: int = typer.Option(0, min=0, help="Linear warm-up steps."),
    augment: bool = typer.Option(True, help="Random crop with padding and horizontal flip."),
    num_classes: Optional[int] = typer.Option(None, help="Default: the data's class count."),
    train_samples: Optional[int] = typer.Option(None, help="Train on a stratified subset of this size."),
    test_samples: Optional[int] = typer.Option(None, help="Evaluate on a stratified subset of this size."),
    seed: int = typer.Option(0),
) -> None:
    """Iterative magnitude pruning with rewinding (or a one-shot baseline): one checkpoint per level."""
    if not 0 < prune_fraction < 1:
        raise typer.BadParameter("must be in (0, 1)", param_hint="--prune-fraction")
    spec = model_spec(arch, arch_kwargs, weights, input_size, num_classes)
    cfg = imp_run.RunConfig(
        arch=arch,
        data=data,
        method=method.value,
        prune_fraction=prune_fraction,
        rewind_step=rewind_step,
        train_samples=train_samples,
        test_samples=test_samples,
        seed=seed,
        arch_kwargs=spec.kwargs,
        weights=spec.weights,
        input_size=input_size,
    )
    train_cfg = _train_config(
        epochs, iterations, batch_size, lr, momentum, weight_decay, schedule, warmup, seed, augment
    )
    rows = imp_run.run_sparse(out, cfg, train_cfg, levels, num_classes=num_classes)
    for r in rows:
        typer.echo(
            f"level {r['level']}: sparsity {100 * r['sparsity']:.2f}% ({r['compression']:.1f}x), "
            f"test accuracy {100 * r['test_accuracy']:.2f}%, {r['seconds']:.0f} s"
        )
    typer.echo(f"run directory: {out}")


def train_cmd(
    arch: Optional[str] = typer.Option(None, help=SOURCE_HELP + " Or pass --init."),
    arch_kwargs: Optional[str] = typer.Option(None, help=ARCH_KWARGS_HELP),
    weights: Optional[Path] = typer.Option(None, help=WEIGHTS_HELP + " Training starts from them."),
    input_size: Optional[int] = typer.Option(None, min=1, help=INPUT_SIZE_HELP),
    init: Optional[Path] = typer.Option(
        None, help="Start from this checkpoint instead, enforcing its masks (e.g. the output of `edgeshift pai`)."
    ),
    data: str = typer.Option(..., help="'generated', an ImageFolder root or a CIFAR-10 python folder."),
    out: Path = typer.Option(..., "-o", "--out", help="Checkpoint to write."),
    epochs: int = typer.Option(10, min=1),
    iterations: Optional[int] = typer.Option(None),
    batch_size: int = typer.Option(128, min=1),
    lr: float = typer.Option(0.1),
    momentum: float = typer.Option(0.9),
    weight_decay: float = typer.Option(5e-4),
    optimizer: Optimizer = typer.Option(
        Optimizer.sgd, help="sgd (with --momentum), or adamw: what vision transformers train with (lr ~1e-3)."
    ),
    schedule: Schedule = typer.Option(Schedule.cosine),
    warmup: int = typer.Option(0, min=0),
    augment: bool = typer.Option(True),
    num_classes: Optional[int] = typer.Option(None),
    train_samples: Optional[int] = typer.Option(None),
    test_samples: Optional[int] = typer.Option(None),
    seed: int = typer.Option(0),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing checkpoint."),
) -> None:
    """Train a zoo model (fresh, or a checkpoint with its masks enforced) and save it (data-parallel under
    torchrun)."""
    spec = model_spec(arch, arch_kwargs, weights, input_size, num_classes)
    check_output_path(out, force)
    res, world = train_checkpoint.train_checkpoint(
        out,
        _train_config(
            epochs, iterations, batch_size, lr, momentum, weight_decay, schedule, warmup, seed, augment, optimizer
        ),
        data=data,
        arch=arch,
        init=init,
        num_classes=num_classes,
        train_samples=train_samples,
        test_samples=test_samples,
        seed=seed,
        arch_kwargs=dict(spec.kwargs) if spec else None,
        weights=spec.weights if spec else None,
        input_size=input_size,
    )
    if distributed.is_main():
        typer.echo(
            f"test accuracy {100 * res.test_accuracy:.2f}% after {res.steps} steps ({res.seconds:.0f} s, "
            f"{world} process{'es' if world > 1 else ''}); wrote {out}"
        )


def methods_cmd() -> None:
    """List the installed pruning methods (the entry points of group edgeshift.methods) with their settings, as a
    pipeline's methods table takes them."""
    for line in methods.method_lines():
        typer.echo(line)


def register(app: typer.Typer) -> None:
    app.command("methods")(handle_errors(methods_cmd))
    app.command("prune")(handle_errors(prune))
    app.command("train")(handle_errors(train_cmd))
    app.command("imp")(handle_errors(imp))
    app.command("pai")(handle_errors(pai_cmd))
    app.command("layerprune")(handle_errors(layerprune_cmd))
    app.command("slim")(handle_errors(slim_cmd))
