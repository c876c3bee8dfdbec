"""Channel gating per input ("Neural Networks Model Compression" (Elkerdawy), ch. 6, FTWT): decision heads trained
beside the dense model's blocks to skip, per input, the filters outside a share r of each block's activation mass;
r either given or chosen from a MACs reduction by the one-shot estimate of sec. 6.3.3. With ``signatures`` K the
heads' masks are then made static for ONNX Runtime: K signatures of widths and a router choosing one per input
(``edgeshift.pruner.routing``), the backbone fine-tuned under them.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, cast

import torch
from torch import nn

from edgeshift.core.config import setting

from ..checkpoint import load_checkpoint, save_checkpoint
from ..data import Dataset, model_splits
from ..distill import DistillConfig, Teacher
from ..gating import (
    HEAD_INPUTS,
    HEAD_LR_SCALE,
    MODES,
    GatedNetwork,
    estimated_reduction,
    find_blocks,
    gated_network,
    ratio_for,
)
from ..metrics import count_macs
from ..models.record import record_of
from ..models.zoo import input_shape
from ..routing import (
    MAX_SIGNATURES,
    RoutedTraining,
    Router,
    fit_router,
    head_masks,
    routed_network,
    router_prefix,
    signatures_of,
)
from ..train import evaluate, to_tensor, train
from .base import MethodContext

ESTIMATE_BATCH = 256


def _ratio(value: float) -> str | None:
    return None if value == 0 or 0 < value <= 1 else "must be in (0, 1], or 0 to choose it from flops_reduction"


@dataclass(frozen=True)
class GateSettings:
    ratio: float = setting(
        0.0,
        "the mass ratio r of Algorithm 1: each block keeps, per input, the fewest filters holding this share of its "
        "max responses (0: the largest r whose one-shot estimate saves flops_reduction)",
        check=_ratio,
    )
    flops_reduction: float = setting(
        0.5,
        "with ratio 0: the share of the dense MACs the masks should save, by the estimate on the frozen model",
        check=lambda v: None if 0 < v < 1 else "must be in (0, 1)",
    )
    mode: str = setting(
        "decoupled",
        "decoupled: no gradient between the heads and the backbone (the heads learn their targets, the backbone its "
        "task under their masks); joint: the task loss reaches the heads through their sigmoids (straight-through)",
        check=lambda v: None if v in MODES else f"must be one of {', '.join(MODES)}",
    )
    head_input: str = setting(
        "standardised",
        "what a head's 1x1 convolution reads of its pooled input: standardised (per channel, by running statistics; "
        "its predictions follow the input) or softmax (the thesis's head)",
        check=lambda v: None if v in HEAD_INPUTS else f"must be one of {', '.join(HEAD_INPUTS)}",
    )
    head_lr_scale: float = setting(
        HEAD_LR_SCALE, "the heads' learning rate over the backbone's (the thesis: 0.1 against 1e-2)", minimum=0
    )
    epochs: float = setting(1.0, "epochs of training the heads and the backbone together", minimum=0)
    lr: float = setting(0.01, "peak learning rate of that training (cosine); the thesis trains CIFAR at 1e-2")
    estimate_samples: int = setting(512, "training images the one-shot estimate runs on", minimum=1)
    signatures: int = setting(
        0,
        "0: the gated network exported whole (its masks multiply: no time saved on ONNX Runtime); K in 2..16: the "
        "heads' masks clustered into K signatures, each a network of its own widths, and a router choosing one per "
        "input, exported as one graph",
        check=lambda v: None if v == 0 or 2 <= v <= MAX_SIGNATURES else f"must be 0 or 2..{MAX_SIGNATURES}",
    )
    vote: float = setting(
        0.5,
        "with signatures: a signature keeps a block's filter when the heads keep it for at least this share of the "
        "inputs of its group",
        check=lambda v: None if 0 < v <= 1 else "must be in (0, 1]",
    )
    route_samples: int = setting(10000, "with signatures: training images clustered and routed on", minimum=2)
    route_epochs: float = setting(
        1.0, "with signatures: epochs of fine-tuning the backbone under the routed signatures", minimum=0
    )
    route_lr: float = setting(0.01, "peak learning rate of that fine-tuning (cosine)", minimum=0)
    distill: float = setting(
        0.9,
        "with signatures: the share of the fine-tuning loss matching the dense model's softened outputs",
        check=lambda v: None if 0 <= v < 1 else "must be in [0, 1)",
    )


class ChannelGating:
    """The dense model and, beside it, the same model with a decision head per conv-BN-ReLU block."""

    name: ClassVar[str] = "gate"
    help: ClassVar[str] = "channel gating per input: heads skip the filters an input does not need (FTWT)"
    Settings: ClassVar[type[GateSettings]] = GateSettings

    def make_variants(self, settings: GateSettings, context: MethodContext) -> list[Path]:
        probe = context.model.build()  # refused before minutes of training when nothing can be gated
        example = torch.randn(input_shape(probe, 2), generator=torch.Generator().manual_seed(0))
        find_blocks(probe, example)
        dense = context.dense()
        model, _ = load_checkpoint(dense)
        d = context.data
        train_ds, test_ds = model_splits(
            d.path, record_of(model), train_samples=d.train_samples, test_samples=d.test_samples, seed=context.seed
        )
        gated = GatedNetwork(
            model, example, settings.ratio or 1.0, settings.mode, settings.head_input, settings.head_lr_scale
        )
        ratio = settings.ratio
        if not ratio:
            images = to_tensor(train_ds)[0][: settings.estimate_samples]
            context.say(f"gate: estimating the MACs each mass ratio saves on {len(images)} training images")
            ratio, estimates = ratio_for(
                lambda r: estimated_reduction(gated, images, [r], ESTIMATE_BATCH)[r], settings.flops_reduction
            )
            context.say(f"gate: ratio {ratio:g} saves {estimates[ratio]:.1%} of the MACs by the estimate")
        path = context.folder / f"gate-r{ratio:g}-{settings.mode}.pt"
        if not path.exists():
            for gate in gated.gate_list():
                gate.ratio = ratio
            context.say(
                f"gate: {len(gated.blocks)} blocks gated at ratio {ratio:g} ({settings.mode}), training "
                f"{settings.epochs:g} epochs"
            )
            steps = max(1, math.ceil(settings.epochs * len(train_ds) / context.train.batch_size))
            cfg = dataclasses.replace(context.train, iterations=steps, lr=settings.lr, warmup_steps=0)
            if settings.epochs > 0:
                train(gated, train_ds, test_ds, cfg, label="gate", regulariser=gated)
            gated.eval()
            x, y = to_tensor(test_ds)
            accuracy = evaluate(gated, x, y)
            macs = torch.cat(
                [gated.macs_per_input(x[i : i + ESTIMATE_BATCH]) for i in range(0, len(x), ESTIMATE_BATCH)]
            )
            mean, low, high = float(macs.mean()), float(macs.quantile(0.05)), float(macs.quantile(0.95))
            summary = {
                "ratio": ratio,
                "mode": settings.mode,
                "head_input": settings.head_input,
                "blocks": [b.conv for b in gated.blocks],
                "heads": gated.state_of_heads(),
                "dense_macs": gated.dense_macs,
                "macs_mean": mean,
                "macs_p5": low,
                "macs_p95": high,
                "test_accuracy": accuracy,
            }
            context.say(
                f"gate: top-1 {accuracy:.2%} on {len(y)} test images; MACs per input {mean / 1e6:.2f} M mean "
                f"({1 - mean / gated.dense_macs:.1%} fewer than dense, heads included; 5-95%: {low / 1e6:.2f}-"
                f"{high / 1e6:.2f} M)"
            )
            save_checkpoint(model, path, meta={"gate": summary, "test_accuracy": accuracy, "pruned_from": str(dense)})
        if not settings.signatures:
            return [dense, path]
        routed = context.folder / f"{path.stem}-routed{settings.signatures}.pt"
        if not routed.exists():
            route_signatures(path, routed, dense, settings, context, (train_ds, test_ds), example)
        return [dense, path, routed]


def route_signatures(
    gated_path: Path,
    out: Path,
    dense: Path,
    settings: GateSettings,
    context: MethodContext,
    data: tuple[Dataset, Dataset],
    example: torch.Tensor,
) -> None:
    """The gated checkpoint at ``gated_path`` made static: its heads' masks on training images clustered into
    signatures, a router fitted to the groups, the backbone fine-tuned under the routed masks (distilled from
    ``dense``); written to ``out`` with the routing the exporter builds the one-graph variant from."""
    train_ds, test_ds = data
    model, checkpoint = load_checkpoint(gated_path)
    gate = checkpoint["meta"]["gate"]
    gated = gated_network(model, gate, example, str(gated_path))
    k = settings.signatures
    images = to_tensor(train_ds)[0][: settings.route_samples]
    masks = head_masks(gated, images)
    found = signatures_of(masks, [b.out_channels for b in gated.blocks], k, settings.vote, seed=context.seed)
    first = gated.blocks[0]
    router = Router(router_prefix(model, example, first.conv), nn.Linear(first.out_channels, k))
    agreement = fit_router(router, images, found.groups)
    widths = ", ".join("/".join(str(len(rows)) for rows in per) for per in found.keep)
    context.say(
        f"gate: {k} signatures from the masks of {len(images)} training images (filters per block: {widths}); the "
        f"router agrees with their groups on {agreement:.1%} of them"
    )
    trainer = RoutedTraining(gated, router, found.keep)
    if settings.route_epochs > 0:
        context.say(f"gate: fine-tuning under the routed signatures, {settings.route_epochs:g} epochs")
        steps = max(1, math.ceil(settings.route_epochs * len(train_ds) / context.train.batch_size))
        cfg = dataclasses.replace(context.train, iterations=steps, lr=settings.route_lr, warmup_steps=0)
        teacher = None
        if settings.distill > 0:
            teacher = Teacher(load_checkpoint(dense)[0].eval(), DistillConfig(weight=settings.distill))
        train(trainer, train_ds, test_ds, cfg, label="route", teacher=teacher)
    trainer.eval()
    model.eval()
    entry: dict = {
        "blocks": [b.conv for b in gated.blocks],
        "signatures": found.keep,
        "router_weight": router.linear.weight.detach().clone(),
        "router_bias": cast(torch.Tensor, router.linear.bias).detach().clone(),
        "vote": settings.vote,
        "router_agreement": agreement,
    }
    routed = routed_network(model, entry, example, str(out))
    x, y = to_tensor(test_ds)
    with torch.no_grad():
        sliced = torch.cat([routed(x[i : i + ESTIMATE_BATCH]) for i in range(0, len(x), ESTIMATE_BATCH)])
        masked = torch.cat([trainer(x[i : i + ESTIMATE_BATCH]) for i in range(0, len(x), ESTIMATE_BATCH)])
        routes = torch.cat([routed.routes(x[i : i + ESTIMATE_BATCH]) for i in range(0, len(x), ESTIMATE_BATCH)])
    deviation = float((sliced - masked).abs().max())
    accuracy = float((sliced.argmax(1) == y).float().mean())
    shares = (torch.bincount(routes, minlength=k).double() / max(len(y), 1)).tolist()
    one = example[:1]
    macs = count_macs(routed.router, one) + sum(s * count_macs(n, one) for s, n in zip(shares, routed.signatures))
    entry.update(shares=shares, macs_mean=float(macs), dense_macs=gated.dense_macs, test_accuracy=accuracy)
    context.say(
        f"gate: routed top-1 {accuracy:.2%} on {len(y)} test images; MACs per input {macs / 1e6:.2f} M mean "
        f"({1 - macs / gated.dense_macs:.1%} fewer than dense, router included); routed "
        + " / ".join(f"{s:.0%}" for s in shares)
        + f"; signatures sliced vs masked: max |difference| {deviation:.1e}"
    )
    meta = {"gate": gate, "routing": entry, "test_accuracy": accuracy, "pruned_from": str(dense)}
    save_checkpoint(model, out, meta=meta)
