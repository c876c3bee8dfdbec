"""Channel gating (FTWT) routed on ONNX Runtime: the heads' per-input masks made into K static signatures, one
chosen per input, on a CIFAR-10 VGG gated by `edgeshift gate` (``benchmarks/gate_cifar.py``'s run folder).

Per input the thesis's gathered form ("Self-adaptive neural network for edge devices", sec. 6.3.4, Table 6.7)
slices every conv's weights by the masks of that input: ONNX Runtime then computes fewer MACs but on weights it
cannot pre-pack, and loses more time than it saves. Here the slicing happens once, before the sessions exist:

1. the gated network's masks on the training images are clustered (k-means over the concatenated masks) into K
   groups; a group's signature keeps, per block, the filters its heads keep for at least ``--vote`` of the
   group's inputs;
2. each signature is a plain VGG of its own widths, sliced from the gated backbone with conv-BN folded; masking
   a block's filters after its ReLU and slicing them away are the same function, checked here on test images;
3. a router (global max pooling of the first block's output, standardised, one linear layer: the heads' own shape)
   is trained to predict an input's group from its first block alone, so the choice costs the first block, about
   0.6% of the VGG-16's MACs;
4. the backbone is fine-tuned under the routed masks (``--finetune-epochs``: every training image through the
   signature its router chooses, one shared set of weights, distilled from the dense model as the pipeline's
   fine-tunes are): a network trained under per-input masks loses most of its accuracy on any fixed set of filters
   (on the CIFAR-10 VGG-16, before this step the signatures answered 10-16% of the test images alone).

Per input on the device: the router's session, then the chosen signature's. Top-1 on the whole test split
(PyTorch); latency per input against the dense model in one process under the profile (the two alternating per
image, threads stopping after each run as the cascade's, warm-up excluded): mean, p50, p95; MACs per input.

    python benchmarks/gate_routed_cifar.py /tmp/gate-bench/vgg16-dense.pt /tmp/gate-bench/vgg16-r83 \\
        --data ../shared/datasets/cifar10 --signatures 4
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from typing import Callable, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgeshift import device_profiles
from edgeshift.exporter.onnx_export import onnx_bytes
from edgeshift.pruner.checkpoint import load_checkpoint
from edgeshift.pruner.data import load_dataset
from edgeshift.pruner.distill import DistillConfig, Teacher
from edgeshift.pruner.fuse import fold_bn_into_conv, fuse_conv_bn
from edgeshift.pruner.gating import Gate, GatedNetwork, gated_network
from edgeshift.pruner.metrics import count_macs
from edgeshift.pruner.models.vgg import CifarVGG
from edgeshift.pruner.train import _augment
from edgeshift.runtime.cascade import spin_stopping
from edgeshift.runtime.measure import machine_label
from edgeshift.runtime.session import create_session

WARMUP = 30
BATCH = 250


@torch.no_grad()
def folded(block: nn.Sequential) -> tuple[torch.Tensor, torch.Tensor]:
    """A ConvBNReLU's conv weight and bias with its BatchNorm folded in (eval statistics; ``fold_bn_into_conv`` on a
    copy, the block left as it is)."""
    conv = copy.deepcopy(cast(nn.Conv2d, block[0]))
    fold_bn_into_conv(conv, cast(nn.BatchNorm2d, block[1]))
    return conv.weight.detach(), cast(torch.Tensor, conv.bias).detach()


class Sliced(nn.Module):
    """A CIFAR VGG keeping, per block, the filters of ``keep`` (index tensors): convs with BN folded, sliced rows
    (its filters) and columns (the block before's), the classifier on the last block's."""

    def __init__(self, vgg: CifarVGG, keep: list[torch.Tensor]):
        super().__init__()
        layers: list[nn.Module] = []
        before: torch.Tensor | None = None
        blocks = iter(keep)
        for m in vgg.features:
            if isinstance(m, nn.MaxPool2d):
                layers.append(nn.MaxPool2d(2))
                continue
            rows = next(blocks)
            weight, bias = folded(cast(nn.Sequential, m))
            weight = weight.index_select(0, rows)
            if before is not None:
                weight = weight.index_select(1, before)
            conv = nn.Conv2d(weight.shape[1], weight.shape[0], 3, padding=1)
            conv.weight.data, cast(torch.Tensor, conv.bias).data = weight.clone(), bias.index_select(0, rows).clone()
            layers += [conv, nn.ReLU()]
            before = rows
        assert before is not None
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(len(before), vgg.fc.out_features)
        self.fc.weight.data = vgg.fc.weight.detach().index_select(1, before).clone()
        self.fc.bias.data = vgg.fc.bias.detach().clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


class Router(nn.Module):
    """The first block (BN folded), global max pooling, standardisation folded into one linear layer: the logits of
    the K signatures."""

    def __init__(self, vgg: CifarVGG, linear: nn.Linear):
        super().__init__()
        weight, bias = folded(cast(nn.Sequential, vgg.features[0]))
        self.conv = nn.Conv2d(weight.shape[1], weight.shape[0], 3, padding=1)
        self.conv.weight.data, cast(torch.Tensor, self.conv.bias).data = weight, bias
        self.linear = linear

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x)).amax(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.features(x))


@torch.no_grad()
def masks_of(gated: GatedNetwork, x: torch.Tensor) -> np.ndarray:
    """(N, filters of every block) bool: each input's masks as the heads decide them (logits > 0)."""
    seen: list[list[torch.Tensor]] = [[] for _ in gated.blocks]
    hooks = [
        g.register_forward_hook(lambda m, args, out, i=i: seen[i].append(cast(Gate, m).logits(args[0]) > 0))
        for i, g in enumerate(gated.gate_list())
    ]
    try:
        for i in range(0, len(x), BATCH):
            gated(x[i : i + BATCH])
    finally:
        for h in hooks:
            h.remove()
    return torch.cat([torch.cat(s) for s in seen], dim=1).numpy()


def kmeans(points: np.ndarray, k: int, iterations: int = 30, seed: int = 0) -> np.ndarray:
    """Group labels of ``points`` (k-means++ start, Lloyd's iterations)."""
    rng = np.random.default_rng(seed)
    centres = [points[rng.integers(len(points))]]
    for _ in range(k - 1):
        d = np.min([((points - c) ** 2).sum(1) for c in centres], axis=0)
        centres.append(points[rng.choice(len(points), p=d / d.sum())])
    c = np.stack(centres)
    labels = np.zeros(len(points), np.int64)
    for _ in range(iterations):
        d = (points**2).sum(1)[:, None] - 2 * points @ c.T + (c**2).sum(1)[None]
        labels = d.argmin(1)
        c = np.stack([points[labels == j].mean(0) if (labels == j).any() else c[j] for j in range(k)])
    return labels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dense", type=Path, help="The trained CIFAR VGG the gated one came from.")
    ap.add_argument("run", type=Path, help="gate_cifar.py's --out folder (its gated checkpoint).")
    ap.add_argument("--data", required=True)
    ap.add_argument("--signatures", type=int, default=4)
    ap.add_argument("--vote", type=float, default=0.5, help="Share of a group's inputs that must keep a filter.")
    ap.add_argument("--train-samples", type=int, default=10000)
    ap.add_argument("--finetune-epochs", type=float, default=2.0)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--distill", type=float, default=0.9)
    ap.add_argument("--timed-images", type=int, default=1000)
    ap.add_argument("--test-samples", type=int, default=0, help="A stratified subset of the test split (0: all).")
    ap.add_argument("--profile", default="host")
    args = ap.parse_args()
    torch.manual_seed(0)
    checkpoint_path = sorted((args.run / "variants").glob("*.pt"))[-1]
    dense, _ = load_checkpoint(args.dense)
    backbone, checkpoint = load_checkpoint(checkpoint_path)
    assert isinstance(dense, CifarVGG) and isinstance(backbone, CifarVGG), "written for CifarVGG"
    test = load_dataset(args.data, "test", num_classes=10, size=32)
    test = test.subset(args.test_samples) if args.test_samples else test
    train = load_dataset(args.data, "train", num_classes=10, size=32).subset(args.train_samples)
    x, y = torch.from_numpy(test.normalised()), torch.from_numpy(test.labels)
    xt = torch.from_numpy(train.normalised())
    gated = gated_network(backbone, checkpoint["meta"]["gate"], x[:2], str(checkpoint_path))
    sizes = [b.out_channels for b in gated.blocks]
    edges = np.cumsum([0, *sizes])

    t0 = time.perf_counter()
    masks = masks_of(gated, xt)
    groups = kmeans(masks.astype(np.float32), args.signatures)
    keep: list[list[torch.Tensor]] = []
    for j in range(args.signatures):
        share = masks[groups == j].mean(0)
        per_block = []
        for b in range(len(sizes)):
            s = share[edges[b] : edges[b + 1]]
            kept = np.flatnonzero(s >= args.vote)
            per_block.append(torch.from_numpy(kept if len(kept) else np.array([int(s.argmax())])))
        keep.append(per_block)
    print(f"signatures from {len(xt)} training images in {time.perf_counter() - t0:.0f} s", flush=True)

    # the router: the first block's pooled output -> the group, standardised then one linear layer
    router = Router(backbone, nn.Linear(sizes[0], args.signatures)).eval()
    with torch.no_grad():
        feats = torch.cat([router.features(xt[i : i + BATCH]) for i in range(0, len(xt), BATCH)])
    mean, std = feats.mean(0), feats.std(0) + 1e-6
    linear = nn.Linear(sizes[0], args.signatures)
    opt = torch.optim.Adam(linear.parameters(), lr=0.05)
    target = torch.from_numpy(groups)
    z = (feats - mean) / std
    for _ in range(300):
        opt.zero_grad()
        loss = F.cross_entropy(linear(z), target)
        loss.backward()
        opt.step()
    with torch.no_grad():  # the standardisation folded into the layer
        router.linear.weight.data = linear.weight / std
        router.linear.bias.data = linear.bias - (linear.weight / std) @ mean
        route_train = (router.linear(feats).argmax(1) == target).float().mean().item()
        routes = router.linear(feats).argmax(1)
        gated_logits = torch.cat([gated(x[i : i + BATCH]) for i in range(0, len(x), BATCH)])
        own = torch.from_numpy(
            kmeans_assign(masks_of(gated, x).astype(np.float32), masks.astype(np.float32), groups, args.signatures)
        )
    before = [evaluate_masked(backbone, k, sizes, x, y) for k in keep]  # each signature alone, not fine-tuned
    if args.finetune_epochs > 0:
        finetune(backbone, dense, keep, sizes, xt, torch.from_numpy(train.labels), routes, args)
    backbone.eval()
    nets = [Sliced(backbone, k).eval() for k in keep]

    with torch.no_grad():
        chosen = torch.cat([router(x[i : i + BATCH]).argmax(1) for i in range(0, len(x), BATCH)])
        logits = torch.stack([torch.cat([n(x[i : i + BATCH]) for i in range(0, len(x), BATCH)]) for n in nets])
        dense_logits = torch.cat([dense.eval()(x[i : i + BATCH]) for i in range(0, len(x), BATCH)])
        # slicing equals masking: signature 0 against the backbone with that signature's masks after each ReLU
        check = x[:64]
        masked = masked_forward(backbone, keep[0], sizes, check)
        worst_slice = float((nets[0](check) - masked).abs().max())
    routed = logits[chosen, torch.arange(len(x))]
    oracle = logits[own, torch.arange(len(x))]
    top1 = {
        "dense": float((dense_logits.argmax(1) == y).float().mean()),
        "gated": float((gated_logits.argmax(1) == y).float().mean()),
        "routed": float((routed.argmax(1) == y).float().mean()),
        "own_group": float((oracle.argmax(1) == y).float().mean()),
        **{f"signature_{j}": float((logits[j].argmax(1) == y).float().mean()) for j in range(args.signatures)},
    }
    example = x[:1]
    router_macs = count_macs(router, example)
    net_macs = [count_macs(n, example) for n in nets]
    dense_macs = count_macs(dense, example)
    shares = torch.bincount(chosen, minlength=args.signatures).double() / len(x)
    routed_macs = router_macs + float(sum(float(s) * m for s, m in zip(shares, net_macs)))

    # latency: dense against router + chosen signature, alternating per image
    profile = spin_stopping(device_profiles.load_profile(args.profile))
    fused_dense = fuse_conv_bn(dense, example_inputs=example)
    sessions = {"dense": create_session(onnx_bytes(fused_dense, example), profile)}
    sessions["router"] = create_session(onnx_bytes(router, example), profile)
    for j, net in enumerate(nets):
        sessions[f"signature_{j}"] = create_session(onnx_bytes(net, example), profile)
    timed = x[: args.timed_images].numpy()

    def run_dense(item: np.ndarray) -> np.ndarray:
        return sessions["dense"].run(None, {"input": item})[0]

    def run_routed(item: np.ndarray) -> np.ndarray:
        j = int(sessions["router"].run(None, {"input": item})[0].argmax())
        return sessions[f"signature_{j}"].run(None, {"input": item})[0]

    forms: dict[str, Callable[[np.ndarray], np.ndarray]] = {"dense": run_dense, "routed": run_routed}
    for i in range(WARMUP):
        for f in forms.values():
            f(timed[i : i + 1])
    for j in range(args.signatures):  # every signature warm, whichever the router picks first
        sessions[f"signature_{j}"].run(None, {"input": timed[:1]})
    ms = {n: np.empty(len(timed)) for n in forms}
    worst_ort = 0.0
    names = list(forms)
    for i in range(len(timed)):
        item = timed[i : i + 1]
        for n in names[i % 2 :] + names[: i % 2]:
            t = time.perf_counter()
            out = forms[n](item)
            ms[n][i] = (time.perf_counter() - t) * 1e3
            if n == "routed":
                worst_ort = max(worst_ort, float(np.abs(out - routed[i : i + 1].numpy()).max()))
    figures = {
        n: {"mean_ms": float(v.mean()), "p50_ms": float(np.percentile(v, 50)), "p95_ms": float(np.percentile(v, 95))}
        for n, v in ms.items()
    }
    macs_cut = 1 - routed_macs / dense_macs
    latency_cut = 1 - figures["routed"]["mean_ms"] / figures["dense"]["mean_ms"]
    result = {
        "machine": machine_label(),
        "profile": profile.name,
        "date": time.strftime("%Y-%m-%d"),
        "checkpoint": str(checkpoint_path),
        "signatures": args.signatures,
        "vote": args.vote,
        "widths": [[len(k) for k in per] for per in keep],
        "signature_macs": net_macs,
        "router_macs": router_macs,
        "router_agreement_train": route_train,
        "routed_share": shares.tolist(),
        "top1": top1,
        "top1_signatures_before_finetune": before,
        "finetune_epochs": args.finetune_epochs,
        "dense_macs": dense_macs,
        "routed_macs": routed_macs,
        "macs_reduction": macs_cut,
        "latency_reduction": latency_cut,
        "latency_share_of_macs": latency_cut / macs_cut,
        "max_sliced_vs_masked": worst_slice,
        "max_ort_vs_torch": worst_ort,
        "timed_images": len(timed),
        "forms": figures,
    }
    (args.run / "routed_result.json").write_text(json.dumps(result, indent=1))
    print(f"machine: {machine_label()}; profile {profile.name}; {time.strftime('%Y-%m-%d')}")
    print(f"sliced vs masked: max |difference| {worst_slice:.2e}; ONNX Runtime vs PyTorch {worst_ort:.2e}")
    for j in range(args.signatures):
        print(
            f"signature {j}: widths {[len(k) for k in keep[j]]}, {net_macs[j] / 1e6:.1f} M MACs, routed "
            f"{100 * float(shares[j]):.1f}% of test inputs, top-1 alone {100 * top1[f'signature_{j}']:.2f}%"
        )
    print(
        f"router: {router_macs / 1e6:.2f} M MACs, agrees with the groups on {100 * route_train:.1f}% of training "
        f"images; top-1 dense {100 * top1['dense']:.2f}%, gated {100 * top1['gated']:.2f}%, routed "
        f"{100 * top1['routed']:.2f}% (each input on the signature of the group its own masks are nearest: "
        f"{100 * top1['own_group']:.2f}%); each signature alone before fine-tuning: "
        + ", ".join(f"{100 * t:.2f}%" for t in before)
    )
    print("\n| form | MACs per input | MACs reduction | mean ms | p50 ms | p95 ms | latency reduction (mean) |")
    print("|---|---|---|---|---|---|---|")
    for form, m in (("dense", dense_macs), ("routed", routed_macs)):
        fig = figures[form]
        print(
            f"| {form} | {m / 1e6:.1f} M | {1 - m / dense_macs:.1%} | {fig['mean_ms']:.3f} | {fig['p50_ms']:.3f} | "
            f"{fig['p95_ms']:.3f} | {1 - fig['mean_ms'] / figures['dense']['mean_ms']:.1%} |"
        )
    print(f"latency reduction / MACs reduction: {latency_cut / macs_cut:.2f} (the thesis's Table 6.7: 0.27 / 0.52)")


def finetune(
    vgg: CifarVGG,
    dense: nn.Module,
    keep: list[list[torch.Tensor]],
    sizes: list[int],
    x: torch.Tensor,
    y: torch.Tensor,
    routes: torch.Tensor,
    args: argparse.Namespace,
) -> None:
    """Train ``vgg`` with each image's filters masked by its routed signature (SGD, momentum 0.9, cosine from
    ``--lr``, weight decay 5e-4, batch 64, crop and flip, distilled from ``dense``). The first block, which the
    router reads, stays as it is: the routes stay the ones the router was trained to."""
    masks = [torch.zeros(len(keep), size) for size in sizes]
    for j, per in enumerate(keep):
        for b, rows in enumerate(per):
            masks[b][j, rows] = 1
    teacher = Teacher(dense.eval(), DistillConfig(weight=args.distill))
    first = set(map(id, vgg.features[0].parameters()))
    trained = [p for p in vgg.parameters() if id(p) not in first]
    opt = torch.optim.SGD(trained, lr=args.lr, momentum=0.9, weight_decay=5e-4)
    steps = int(args.finetune_epochs * len(x) / 64)
    gen = torch.Generator().manual_seed(0)
    vgg.train()
    vgg.features[0].eval()  # its BatchNorm statistics too
    t0 = time.perf_counter()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = args.lr * 0.5 * (1 + np.cos(np.pi * step / steps))
        idx = torch.randint(0, len(x), (64,), generator=gen)
        xb, yb, rb = _augment(x[idx], gen), y[idx], routes[idx]
        h = xb
        blocks = iter(range(len(sizes)))
        for m in vgg.features:
            h = m(h)
            if not isinstance(m, nn.MaxPool2d):
                h = h * masks[next(blocks)][rb][:, :, None, None]
        logits = vgg.fc(vgg.pool(h).flatten(1))
        loss = teacher.loss(xb, logits, F.cross_entropy(logits, yb))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % 100 == 0 or step + 1 == steps:
            print(
                f"fine-tune step {step + 1}/{steps}, loss {loss.item():.3f}, {time.perf_counter() - t0:.0f} s",
                flush=True,
            )


@torch.no_grad()
def evaluate_masked(
    vgg: CifarVGG, keep: list[torch.Tensor], sizes: list[int], x: torch.Tensor, y: torch.Tensor
) -> float:
    vgg.eval()
    out = torch.cat([masked_forward(vgg, keep, sizes, x[i : i + BATCH]) for i in range(0, len(x), BATCH)])
    return float((out.argmax(1) == y).float().mean())


def kmeans_assign(points: np.ndarray, train: np.ndarray, groups: np.ndarray, k: int) -> np.ndarray:
    """Each of ``points``' nearest group centre (the centres: the groups' means over ``train``)."""
    c = np.stack([train[groups == j].mean(0) for j in range(k)])
    d = (points**2).sum(1)[:, None] - 2 * points @ c.T + (c**2).sum(1)[None]
    return d.argmin(1)


@torch.no_grad()
def masked_forward(vgg: CifarVGG, keep: list[torch.Tensor], sizes: list[int], x: torch.Tensor) -> torch.Tensor:
    """``vgg`` with every filter outside ``keep`` zeroed after its block's ReLU (the oracle of ``Sliced``)."""
    blocks = iter(zip(keep, sizes))
    for m in vgg.features:
        x = m(x)
        if not isinstance(m, nn.MaxPool2d):
            rows, size = next(blocks)
            mask = torch.zeros(size)
            mask[rows] = 1
            x = x * mask[None, :, None, None]
    return vgg.fc(vgg.pool(x).flatten(1))


if __name__ == "__main__":
    main()
