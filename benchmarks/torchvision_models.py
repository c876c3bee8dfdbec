"""Real torchvision models through the kit: resnet18's residual blocks found by what they compute and two removed
exactly by layerprune (no fine-tune), and VGG-11-BN and AlexNet at 224 with 30% of their channels dead pruned
exactly. Needs torchvision, which needs CUDA torch for its C ops: in a folder of your own, unzip the torchvision
wheel matching torch 2.13 (0.28.0) and empty its ``_meta_registrations.py``, then

    PYTHONPATH=that/folder python benchmarks/torchvision_models.py
"""

import copy
import os
import tempfile
import time

import torch
import torchvision
from torch import nn
from typer.testing import CliRunner

from edgeshift.cli import app
from edgeshift.pruner.checkpoint import load_checkpoint
from edgeshift.pruner.layers import find_candidates
from edgeshift.pruner.structured import prune_zero_channels


def oracle_same(a, b, x):
    with torch.no_grad():
        want, got = copy.deepcopy(a).double()(x.double()), copy.deepcopy(b).double()(x.double())
    return float((got - want).abs().max()), float(want.abs().max())


# 1. resnet18: candidates and layerprune --remove 2 without fine-tuning
torch.manual_seed(0)
m = torchvision.models.resnet18(num_classes=10).eval()
with torch.no_grad():
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            assert (
                mod.running_mean is not None
                and mod.running_var is not None
                and mod.weight is not None
                and mod.bias is not None
            )
            mod.running_var.uniform_(0.5, 1.5)
            mod.weight.uniform_(0.5, 1.5)
print("resnet18 blocks:", [c.name for c in find_candidates(m, torch.randn(1, 3, 64, 64)) if c.kind == "block"])
with tempfile.TemporaryDirectory() as d:
    os.chdir(d)
    torch.save(m.state_dict(), "w.pt")
    t = time.time()
    r = CliRunner().invoke(
        app,
        [
            "layerprune",
            "--arch",
            "torchvision/resnet18",
            "--num-classes",
            "10",
            "--weights",
            "w.pt",
            "--input-size",
            "64",
            "--criterion",
            "weight-norm",
            "--remove",
            "2",
            "--epochs",
            "0",
            "--data",
            "generated",
            "--test-samples",
            "20",
            "--imprint-samples",
            "20",
            "-o",
            "lp.pt",
        ],
    )
    print(
        "layerprune exit",
        r.exit_code,
        f"{time.time() - t:.1f}s",
        r.output.strip().splitlines()[-3:] if r.exit_code else "",
    )
    p, _ = load_checkpoint("lp.pt")
    removed = [n for n, mod in p.named_modules() if isinstance(mod, nn.Identity) and n.startswith("layer")]
    z = copy.deepcopy(m)
    with torch.no_grad():
        for n in removed:
            z.get_submodule(n).bn2.weight.zero_()
            z.get_submodule(n).bn2.bias.zero_()
    diff, scale = oracle_same(z, p, torch.randn(2, 3, 64, 64))
    print("resnet18 removed", removed, f"max |diff| vs zeroed-branch model {diff:.2e} (output scale {scale:.2f})")

# 2. VGG-11-BN and AlexNet at 224 with 30% of every conv's channels dead
for name in ("vgg11_bn", "alexnet"):
    torch.manual_seed(0)
    m = getattr(torchvision.models, name)(num_classes=1000).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        convs = [mod for mod in m.modules() if isinstance(mod, nn.Conv2d)]
        bns = (
            {id(c): b for c, b in zip(convs, [mod for mod in m.modules() if isinstance(mod, nn.BatchNorm2d)])}
            if name.endswith("bn")
            else {}
        )
        for c in convs:
            dead = torch.randperm(c.out_channels, generator=g)[: int(0.3 * c.out_channels)]
            c.weight[dead] = 0
            if c.bias is not None:
                c.bias[dead] = 0
            if id(c) in bns:
                b = bns[id(c)]
                assert (
                    b.running_mean is not None
                    and b.running_var is not None
                    and b.weight is not None
                    and b.bias is not None
                )
                b.running_var.uniform_(0.5, 1.5)
                b.weight[dead] = 0
                b.bias[dead] = 0
    x = torch.randn(2, 3, 224, 224)
    t = time.time()
    pruned, report = prune_zero_channels(m, x)
    took = time.time() - t
    diff, scale = oracle_same(m, pruned, torch.randn(2, 3, 224, 224, generator=g))
    share_removed = 1 - report.params_after / report.params_before
    print(
        f"{name}: {took:.1f} s, params {report.params_before:,} -> {report.params_after:,} "
        f"({100 * share_removed:.1f}% removed), "
        f"float64 max |diff| {diff:.2e} of {scale:.2f}, notes {report.notes}"
    )
