"""Build-side portfolio commands (need the ``build`` extra): each parses its options and calls one library
function."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from edgeshift.core.commands import handle_errors
from edgeshift.core.errors import EdgeshiftError, require_file
from edgeshift.core.lazy import lazy_module
from edgeshift.device_profiles import load_profile
from edgeshift.pruner.cli import ARCH_KWARGS_HELP, INPUT_SIZE_HELP, SOURCE_HELP, WEIGHTS_HELP, model_spec
from edgeshift.runtime.inspect_cmd import print_portfolio

# The library behind these commands imports torch and onnx (seconds): it loads when a build command runs, so that
# `edgeshift --help` and the device commands never pay for it, and a device without torch still lists its commands.
export_cmd = lazy_module("edgeshift.exporter.export_cmd")
report_lib = lazy_module("edgeshift.exporter.report")
pipeline_lib = lazy_module("edgeshift.exporter.pipeline")


def export(
    sources: Optional[List[Path]] = typer.Argument(
        None, help="Checkpoint files and/or run directories (level_<k>/...); or --arch with --weights."
    ),
    out: Path = typer.Option(..., "-o", "--out", help="The portfolio file to write (.zip)."),
    data: Optional[str] = typer.Option(
        None,
        help="Test data for accuracy: 'generated', an ImageFolder root or "
        "a CIFAR-10 python folder. Without it accuracy is not measured.",
    ),
    test_samples: int = typer.Option(1000, help="Test samples used for accuracy (a stratified subset)."),
    prune: bool = typer.Option(True, help="Prune each source exactly on the way (sparse checkpoints shrink)."),
    align: int = typer.Option(
        1,
        min=1,
        help="Round pruned widths up to multiples of this with zero channels "
        "(exact); 8 helps ONNX Runtime with several intra-op threads.",
    ),
    profile: str = typer.Option(
        "host",
        help="Device profile (name or TOML file) the variants are timed under; "
        "its [quantization] table chooses the INT8 format.",
    ),
    threads: Optional[int] = typer.Option(None, min=0, help="Override the profile's intra-op threads."),
    iterations: Optional[int] = typer.Option(None, min=1, help="Override the profile's timed calls per variant."),
    int8: bool = typer.Option(
        False,
        "--int8",
        help="Add an INT8 variant of each (kept only when measured faster "
        "than its FP32 source); needs --data for calibration.",
    ),
    calibration_samples: int = typer.Option(64, min=1, help="INT8: training images used for calibration."),
    calibration_method: str = typer.Option("minmax", help="INT8: minmax | entropy | percentile."),
    memory: bool = typer.Option(True, help="Measure each session's peak memory in a fresh process."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing portfolio."),
    arch: Optional[str] = typer.Option(None, help=SOURCE_HELP + " Exported as the variant 'dense'."),
    arch_kwargs: Optional[str] = typer.Option(None, help=ARCH_KWARGS_HELP),
    weights: Optional[Path] = typer.Option(None, help=WEIGHTS_HELP),
    input_size: Optional[int] = typer.Option(None, min=1, help=INPUT_SIZE_HELP),
    num_classes: Optional[int] = typer.Option(None, min=1, help="Class count of the model source."),
    cascade: bool = typer.Option(
        False,
        "--cascade",
        help="Calibrate a confidence cascade over the ladder (fastest step first, an input going on while unsure; "
        "`edgeshift run --cascade`); needs --data.",
    ),
    cascade_loss: float = typer.Option(
        0.5, help="Cascade: points of top-1 it may lose against the reference on its calibration images."
    ),
    cascade_samples: int = typer.Option(
        2000, min=1, help="Cascade: test-split images it is calibrated on, other than the --test-samples measured."
    ),
) -> None:
    """Export variants to ONNX, profile them, drop dominated ones and pack one DEFLATE portfolio."""
    spec = model_spec(arch, arch_kwargs, weights, input_size, num_classes)
    device_profile = load_profile(profile)  # resolved once: timing at export and the table printed after
    path = export_cmd.export_portfolio(
        list(sources or []),
        out,
        spec=spec,
        data=data,
        test_samples=test_samples,
        prune=prune,
        profile=device_profile,
        threads=threads,
        latency_iterations=iterations,
        int8=int8,
        calibration_samples=calibration_samples,
        calibration_method=calibration_method,
        measure_memory=memory,
        force=force,
        align=align,
        cascade=cascade,
        cascade_loss=cascade_loss,
        cascade_samples=cascade_samples,
    )
    print_portfolio(path, device_profile, load=False)
    typer.echo(f"wrote {path}")


def report(
    portfolio: Path = typer.Argument(..., help="A portfolio file."),
    out_dir: Path = typer.Option(Path("."), "-o", "--out-dir", help="Folder for the .md and .png."),
) -> None:
    """Write a Pareto chart (PNG) and a Markdown table of a portfolio."""
    md, png = report_lib.write_report(portfolio, out_dir)
    typer.echo(f"wrote {md} and {png}")


def pipeline(
    config: Path = typer.Argument(..., help="A pipeline TOML file (see configs/demo.toml)."),
    arch: Optional[str] = typer.Option(None, help="Override [model] arch."),
    data: Optional[str] = typer.Option(None, help="Override [data] path."),
    out: Optional[str] = typer.Option(None, "--out", help="Override [output] dir."),
) -> None:
    """Train, prune, export, benchmark, simulate and report in one resumable run driven by a config file."""
    pipeline_lib.run_pipeline(pipeline_lib.load_config(config, arch=arch, data=data, out=out))


def method(
    name: str = typer.Argument(..., help="A pruning method: `edgeshift methods` lists them with their settings."),
    out: Path = typer.Option(..., "-o", "--out", help="Folder for its checkpoints (a killed run resumes here)."),
    data: str = typer.Option(..., help="'generated', an ImageFolder root or a CIFAR-10 python folder."),
    set_: Optional[List[str]] = typer.Option(
        None, "--set", help="One of the method's settings, KEY=VALUE in TOML (remove=[2,3], criterion=taylor)."
    ),
    dense: Optional[Path] = typer.Option(
        None, help="A trained dense checkpoint the method starts from (default: trained here, per --epochs)."
    ),
    arch: Optional[str] = typer.Option(None, help=SOURCE_HELP + " Default: --dense's, else resnet20."),
    input_size: int = typer.Option(0, min=0, help=INPUT_SIZE_HELP),
    epochs: int = typer.Option(3, min=1, help="Training epochs (the dense model's; per level or variant)."),
    batch_size: int = typer.Option(64, min=1),
    lr: float = typer.Option(0.05, help="Peak learning rate."),
    train_samples: int = typer.Option(0, min=0, help="Stratified training subset (0: all)."),
    test_samples: int = typer.Option(0, min=0, help="Stratified test subset (0: all)."),
    seed: int = typer.Option(0),
    profile: str = typer.Option("host", help="Device profile (name or TOML file) for every latency figure."),
) -> None:
    """Run one pruning method on its own (the pipeline's first step): its checkpoints, for `edgeshift export`."""
    document = {
        "model": {**({"arch": arch} if arch else {}), **({"input_size": input_size} if input_size else {})},
        "data": {"path": data, "train_samples": train_samples, "test_samples": test_samples},
        "methods": [pipeline_lib.method_document(name, list(set_ or []))],
        "train": {"epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed},
        "deploy": {"profile": profile},
        "variants": {"dense": str(dense)} if dense else {},
        "output": {"dir": str(out)},
    }
    made = pipeline_lib.run_method(document)
    typer.echo(f"{len(made)} sources in {out / 'variants'}: " + ", ".join(p.name for p in made))
    typer.echo(f"next: edgeshift export {' '.join(str(p) for p in made)} -o portfolio.zip --data {data}")


def nest(
    dense: Path = typer.Argument(..., help="The trained checkpoint to nest (its channels are reordered, not changed)."),
    out: Path = typer.Option(..., "-o", "--out", help="Folder for the levels' checkpoints (a killed run resumes)."),
    data: str = typer.Option(..., help="'generated', an ImageFolder root or a CIFAR-10 python folder."),
    widths: str = typer.Option("0.75,0.5,0.25", help="The narrower levels: fractions of every channel group."),
    latency_targets: str = typer.Option(
        "", help="Instead of --widths: each level's p50 as a fraction of the full width's under --profile."
    ),
    finetune_epochs: float = typer.Option(1.0, min=0, help="Epochs of fine-tuning per level."),
    lr: float = typer.Option(0.01, help="Peak learning rate of each level's fine-tune (cosine)."),
    training: str = typer.Option(
        "rebuild", help="rebuild or joint (nested: sec. 4.2, or Slimmable), independent (the baseline: nothing shared)."
    ),
    ranking: str = typer.Option(
        "l1", help="What orders the channels: l1 (weight norms) or learned (gates learned on the frozen model)."
    ),
    joint_weights: str = typer.Option(
        "", help="joint: per narrower width, widest first, the weight of its loss (default: 1 each)."
    ),
    batch_size: int = typer.Option(128, min=1),
    train_samples: int = typer.Option(0, min=0, help="Stratified training subset (0: all)."),
    test_samples: int = typer.Option(0, min=0, help="Stratified test subset (0: all)."),
    seed: int = typer.Option(0),
    profile: str = typer.Option("host", help="Device profile (name or TOML file) latency targets are timed under."),
) -> None:
    """Nested widths: one network whose narrower widths are slices of the wider ones (the pipeline method nest);
    `edgeshift export` of its checkpoints stores the widest weights once."""
    require_file(dense, "checkpoint to nest (DENSE)")
    document = {
        "data": {"path": data, "train_samples": train_samples, "test_samples": test_samples},
        "methods": [
            {
                "name": "nest",
                "widths": pipeline_lib.fraction_list(widths, "--widths"),
                "latency_targets": pipeline_lib.fraction_list(latency_targets, "--latency-targets"),
                "finetune_epochs": finetune_epochs,
                "lr": lr,
                "training": training,
                "joint_weights": pipeline_lib.fraction_list(joint_weights, "--joint-weights"),
                "ranking": ranking,
            }
        ],
        "train": {"batch_size": batch_size, "seed": seed},
        "deploy": {"profile": profile},
        "variants": {"dense": str(dense)},
        "output": {"dir": str(out)},
    }
    made = pipeline_lib.run_method(document, "edgeshift nest")
    typer.echo(f"{len(made)} widths in {out / 'variants'}: " + ", ".join(p.name for p in made))
    typer.echo(f"next: edgeshift export {' '.join(str(p) for p in made)} -o portfolio.zip --data {data}")


def gate(
    dense: Path = typer.Argument(..., help="The trained checkpoint to gate (its weights train on under the masks)."),
    out: Path = typer.Option(..., "-o", "--out", help="Folder for the gated checkpoint (a killed run resumes)."),
    data: str = typer.Option(..., help="'generated', an ImageFolder root or a CIFAR-10 python folder."),
    ratio: float = typer.Option(
        0.0,
        help="Mass ratio r in (0, 1]: per input, each block keeps the fewest filters holding r of its response "
        "(0: chosen from --flops-reduction).",
    ),
    flops_reduction: float = typer.Option(0.5, help="With --ratio 0: the share of MACs to save (one-shot estimate)."),
    mode: str = typer.Option("decoupled", help="decoupled (heads and backbone apart) or joint (straight-through)."),
    head_input: str = typer.Option(
        "standardised", help="What a head reads of its pooled input: standardised, or softmax (the thesis's)."
    ),
    head_lr_scale: float = typer.Option(10.0, min=0, help="The heads' learning rate over the backbone's."),
    epochs: float = typer.Option(1.0, min=0, help="Epochs of training heads and backbone together."),
    lr: float = typer.Option(0.01, help="Peak learning rate of that training (cosine)."),
    signatures: int = typer.Option(
        0,
        help="K in 2..16: also the heads' masks made into K static signatures and a router choosing one per input, "
        "exported as one graph that saves time on ONNX Runtime (0: the gated network alone).",
    ),
    vote: float = typer.Option(0.5, help="A signature keeps a filter its group's heads keep this often."),
    route_samples: int = typer.Option(10000, min=2, help="Training images the signatures are clustered on."),
    route_epochs: float = typer.Option(1.0, min=0, help="Epochs of fine-tuning under the routed signatures."),
    route_lr: float = typer.Option(0.01, min=0, help="Peak learning rate of that fine-tuning (cosine)."),
    distill: float = typer.Option(0.9, help="Share of that fine-tuning's loss distilled from the dense model."),
    batch_size: int = typer.Option(128, min=1),
    train_samples: int = typer.Option(0, min=0, help="Stratified training subset (0: all)."),
    test_samples: int = typer.Option(0, min=0, help="Stratified test subset (0: all)."),
    seed: int = typer.Option(0),
) -> None:
    """Channel gating per input (the pipeline method gate): a decision head per conv-BN-ReLU block, trained to keep
    the filters carrying r of the block's activation mass; reports top-1 and the MACs per input. With --signatures
    K the masks become K networks of fixed widths and a router (the form that is faster on ONNX Runtime)."""
    require_file(dense, "checkpoint to gate (DENSE)")
    document = {
        "data": {"path": data, "train_samples": train_samples, "test_samples": test_samples},
        "methods": [
            {
                "name": "gate",
                "ratio": ratio,
                "flops_reduction": flops_reduction,
                "mode": mode,
                "head_input": head_input,
                "head_lr_scale": head_lr_scale,
                "epochs": epochs,
                "lr": lr,
                "signatures": signatures,
                "vote": vote,
                "route_samples": route_samples,
                "route_epochs": route_epochs,
                "route_lr": route_lr,
                "distill": distill,
            }
        ],
        "train": {"batch_size": batch_size, "seed": seed},
        "variants": {"dense": str(dense)},
        "output": {"dir": str(out)},
    }
    made = pipeline_lib.run_method(document, "edgeshift gate")
    typer.echo(f"{len(made)} sources in {out / 'variants'}: " + ", ".join(p.name for p in made))
    typer.echo(f"next: edgeshift export {' '.join(str(p) for p in made)} -o portfolio.zip --data {data}")


def exits(
    dense: Optional[Path] = typer.Argument(
        None, help="A trained ViT checkpoint to start from; or --arch, to train its initialisation with the exits."
    ),
    arch: Optional[str] = typer.Option(None, help="Model source to train from scratch: vit_cifar, timm/NAME, ..."),
    arch_kwargs: Optional[str] = typer.Option(None, help="Its keyword arguments, as JSON: '{\"depth\": 8}'."),
    input_size: int = typer.Option(0, min=0, help="Square input side (0: the source's)."),
    out: Path = typer.Option(..., "-o", "--out", help="Folder for the depth variants (a killed run resumes)."),
    data: str = typer.Option(..., help="'generated', an ImageFolder root or a CIFAR-10 python folder."),
    exits: int = typer.Option(4, min=2, help="Classifiers C, one after every depth/C blocks (the last the model's)."),
    epochs: int = typer.Option(10, min=1),
    lr: float = typer.Option(1e-3, help="Peak learning rate (cosine after --warmup)."),
    optimizer: str = typer.Option("adamw", help="adamw (what ViTs train with) or sgd."),
    weight_decay: float = typer.Option(0.05),
    warmup: int = typer.Option(0, min=0, help="Linear warm-up steps."),
    teacher: Optional[Path] = typer.Option(
        None, help="A trained checkpoint queried on the inputs the final classifier gets wrong (sec. 7.2.3)."
    ),
    batch_size: int = typer.Option(128, min=1),
    train_samples: int = typer.Option(0, min=0, help="Stratified training subset (0: all)."),
    test_samples: int = typer.Option(0, min=0, help="Stratified test subset (0: all)."),
    seed: int = typer.Option(0),
) -> None:
    """Self-distilled exits (the pipeline method exits): one training of a vision transformer with C classifiers,
    written as C depth variants (the blocks up to each exit, the exit as the head) for `edgeshift export`."""
    if (dense is None) == (arch is None):
        raise EdgeshiftError("give a trained checkpoint (DENSE) or --arch to train from scratch, not both or neither")
    spec = model_spec(arch, arch_kwargs, None, input_size or None, None)  # bad JSON: one line, before any work
    document: dict = {
        "data": {"path": data, "train_samples": train_samples, "test_samples": test_samples},
        "methods": [
            {
                "name": "exits",
                "exits": exits,
                "start": "scratch" if dense is None else "dense",
                "teacher": str(teacher) if teacher else "",
            }
        ],
        "train": {
            "epochs": epochs,
            "batch_size": batch_size,
            "lr": lr,
            "optimizer": optimizer,
            "weight_decay": weight_decay,
            "warmup": warmup,
            "seed": seed,
        },
        "output": {"dir": str(out)},
    }
    if dense is not None:
        require_file(dense, "checkpoint to start from (DENSE)")
        document["variants"] = {"dense": str(dense)}
    else:
        document["model"] = {"arch": arch, "kwargs": dict(spec.kwargs) if spec else {}, "input_size": input_size}
    made = pipeline_lib.run_method(document, "edgeshift exits")
    typer.echo(f"{len(made)} sources in {out / 'variants'}: " + ", ".join(p.name for p in made))
    typer.echo(f"next: edgeshift export {' '.join(str(p) for p in made)} -o portfolio.zip --data {data}")


def register(app: typer.Typer) -> None:
    app.command("method")(handle_errors(method))
    app.command("nest")(handle_errors(nest))
    app.command("gate")(handle_errors(gate))
    app.command("exits")(handle_errors(exits))
    app.command("export")(handle_errors(export))
    app.command("report")(handle_errors(report))
    app.command("pipeline")(handle_errors(pipeline))
