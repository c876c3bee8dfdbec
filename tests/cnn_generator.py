"""Random small CNNs drawn from the blocks real models are made of, for property tests of exact pruning and export.

A model is described by a ``CNNSpec`` (plain frozen data, so hypothesis can shrink it and a failure prints the
smallest architecture that breaks) and built by ``build``. Blocks: convolutions (grouped, depthwise, dilated,
strided) with batch norm, a norm+activation module or none, zero-preserving activations; residual blocks (identity
or projection shortcut); two-branch concatenations; channel chunks each through its own conv; channel shuffles;
squeeze-excitation gates; max and average pooling. Heads: global pooling into a linear layer, flatten into a linear
layer, global pooling into a two-layer MLP, a 1x1 conv classifier then global pooling.

Each conv block can have channels planted dead (exactly 0 for every input) and constant. ``judged_widths`` says,
independently of the pruner, how many output channels the conv of a block must keep where that is simple to know:
a plain conv block (one group, a zero-preserving activation) at the top level, read only by a plain conv block or
by a linear head. Every other place (inside residual blocks, branches, chunks, before shuffles, SE gates, grouped or
depthwise convs) is left unjudged: those channels are coupled to others, and the test does not second-guess the
planner there; exactness is still checked everywhere.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Union

import torch
from hypothesis import strategies as st
from torch import nn

INPUT_SIZE = 16
WIDTHS = (4, 6, 8, 12, 16)
ACTIVATIONS = {"relu": nn.ReLU, "silu": nn.SiLU, "hardswish": nn.Hardswish, "gelu": nn.GELU, "none": nn.Identity}
HEADS = ("gap-linear", "flatten-linear", "gap-mlp", "conv-gap")


@dataclass(frozen=True)
class Conv:
    out: int
    kernel: int = 3
    stride: int = 1
    dilation: int = 1
    groups: str = "one"  # one | depthwise | two
    norm: str = "bn"  # none | bn | bnact (a norm+activation module, as timm's BatchNormAct2d)
    act: str = "relu"
    dead: tuple[int, ...] = ()  # output channels planted exactly 0
    constant: tuple[int, ...] = ()  # output channels planted constant


@dataclass(frozen=True)
class Residual:
    body: tuple[Conv, ...]
    projection: bool  # a 1x1 conv on the shortcut (its width may change); else identity


@dataclass(frozen=True)
class Concat:
    left: Conv
    right: Conv


@dataclass(frozen=True)
class Chunks:
    parts: int  # torch.chunk along channels, each part through its own 1x1 conv, concatenated back
    out_per_part: int


@dataclass(frozen=True)
class Shuffle:
    groups: int


@dataclass(frozen=True)
class SqueezeExcite:
    hidden: int


@dataclass(frozen=True)
class Pool:
    kind: str  # max | avg


Block = Union[Conv, Residual, Concat, Chunks, Shuffle, SqueezeExcite, Pool]


@dataclass(frozen=True)
class CNNSpec:
    stem: Conv
    blocks: tuple[Block, ...]
    head: str
    classes: int = 5
    seed: int = 0


def kind_of(block: Block) -> list[str]:
    """The block kinds a block exercises (for coverage counts)."""
    if isinstance(block, Conv):
        kinds = ["conv"]
        kinds += {"depthwise": ["depthwise conv"], "two": ["grouped conv"]}.get(block.groups, [])
        kinds += ["strided conv"] if block.stride > 1 else []
        kinds += ["dilated conv"] if block.dilation > 1 else []
        kinds += {"bn": ["batch norm"], "bnact": ["norm+activation module"]}.get(block.norm, [])
        kinds += [f"activation {block.act}"] if block.act != "none" else []
        kinds += ["dead channels"] if block.dead else []
        kinds += ["constant channels"] if block.constant else []
        return kinds
    if isinstance(block, Residual):
        inner = [k for c in block.body for k in kind_of(c)]
        return ["residual add (projection)" if block.projection else "residual add (identity)", *inner]
    if isinstance(block, Concat):
        return ["concat", *kind_of(block.left), *kind_of(block.right)]
    return {
        Chunks: ["channel chunk"],
        Shuffle: ["channel shuffle"],
        SqueezeExcite: ["squeeze-excitation gate"],
        Pool: ["pooling"],
    }[type(block)]


def coverage(spec: CNNSpec) -> collections.Counter:
    counts = collections.Counter(kind_of(spec.stem))
    for block in spec.blocks:
        counts.update(kind_of(block))
    counts[f"head {spec.head}"] += 1
    return counts


# -- strategies -----------------------------------------------------------------------------------------------
@st.composite
def convs(draw, width_in: int, size: int, *, out: int | None = None, allow_stride: bool = True) -> Conv:
    """A conv block reading ``width_in`` channels of a ``size`` x ``size`` map."""
    groups = draw(st.sampled_from(["one", "one", "depthwise", "two"]))
    if groups == "depthwise":
        out = width_in
    if out is None:
        out = draw(st.sampled_from(WIDTHS))
    if groups == "two" and (width_in % 2 or out % 2):
        groups = "one"
    kernel = draw(st.sampled_from([1, 3]))
    dilation = draw(st.sampled_from([1, 1, 2])) if kernel == 3 and size >= 6 else 1
    stride = draw(st.sampled_from([1, 1, 2])) if allow_stride and size >= 8 else 1
    channels = st.lists(st.integers(0, out - 1), unique=True, max_size=out // 2)
    dead = tuple(sorted(draw(channels)))
    constant = tuple(sorted(set(draw(st.lists(st.integers(0, out - 1), unique=True, max_size=2))) - set(dead)))
    return Conv(
        out,
        kernel,
        stride,
        dilation,
        groups,
        draw(st.sampled_from(["none", "bn", "bn", "bnact"])),
        draw(st.sampled_from(sorted(ACTIVATIONS))),
        dead,
        constant,
    )


def _out_size(size: int, conv: Conv) -> int:
    return size // conv.stride if conv.stride > 1 else size


@st.composite
def cnn_specs(draw, max_blocks: int = 5) -> CNNSpec:
    size = INPUT_SIZE
    stem = draw(convs(3, size, allow_stride=False).filter(lambda c: c.groups == "one"))
    width, blocks = stem.out, []
    for _ in range(draw(st.integers(0, max_blocks))):
        kind = draw(st.sampled_from(["conv", "conv", "residual", "concat", "chunks", "shuffle", "se", "pool"]))
        if kind == "conv":
            conv = draw(convs(width, size))
            block: Block = conv
            width, size = conv.out, _out_size(size, conv)
        elif kind == "residual":
            projection = draw(st.booleans())
            out = draw(st.sampled_from(WIDTHS)) if projection else width
            first = draw(convs(width, size, allow_stride=False))
            last = draw(convs(first.out, size, out=out, allow_stride=False).filter(lambda c: c.groups != "depthwise"))
            block = Residual((first, last), projection)
            width = out
        elif kind == "concat":
            left = draw(convs(width, size, allow_stride=False))
            right = draw(convs(width, size, allow_stride=False))
            block, width = Concat(left, right), left.out + right.out
        elif kind == "chunks":
            if width % 2:
                continue
            block = Chunks(2, draw(st.sampled_from([2, 4, 6])))
            width = 2 * block.out_per_part
        elif kind == "shuffle":
            if width % 2:
                continue
            block = Shuffle(2)
        elif kind == "se":
            block = SqueezeExcite(draw(st.sampled_from([2, 4])))
        else:
            if size < 4:
                continue
            block, size = Pool(draw(st.sampled_from(["max", "avg"]))), size // 2
        blocks.append(block)
    return CNNSpec(stem, tuple(blocks), draw(st.sampled_from(HEADS)), seed=draw(st.integers(0, 2**16)))


# -- building ---------------------------------------------------------------------------------------------------
class NormAct(nn.BatchNorm2d):
    """Batch norm then an activation in one module (the shape of timm's BatchNormAct2d)."""

    def __init__(self, channels: int, act: nn.Module):
        super().__init__(channels)
        self.act = act

    def forward(self, x):
        return self.act(super().forward(x))


class ConvBlock(nn.Module):
    def __init__(self, c_in: int, spec: Conv):
        super().__init__()
        groups = {"one": 1, "depthwise": c_in, "two": 2}[spec.groups]
        padding = spec.dilation * (spec.kernel // 2)
        self.conv = nn.Conv2d(
            c_in, spec.out, spec.kernel, spec.stride, padding, spec.dilation, groups, bias=spec.norm == "none"
        )
        act = ACTIVATIONS[spec.act]()
        self.norm = {"none": nn.Identity(), "bn": nn.BatchNorm2d(spec.out), "bnact": NormAct(spec.out, act)}[spec.norm]
        self.act = nn.Identity() if spec.norm == "bnact" else act
        self.spec = spec

    def forward(self, x):
        return self.act(self.norm(self.conv(x)))

    @torch.no_grad()
    def plant(self, generator: torch.Generator) -> None:
        """Realistic statistics, then the planted channels: dead ones exactly 0 for every input, constant ones
        one value (the activation of the norm's bias)."""
        spec, norm = self.spec, self.norm
        if isinstance(norm, nn.BatchNorm2d):
            assert (
                norm.running_mean is not None
                and norm.running_var is not None
                and norm.weight is not None
                and norm.bias is not None
            )
            norm.running_mean.normal_(0, 0.1, generator=generator)
            norm.running_var.uniform_(0.5, 1.5, generator=generator)
            norm.weight.uniform_(0.5, 1.5, generator=generator)
            norm.bias.normal_(0, 0.1, generator=generator)
            for c in spec.dead:
                norm.weight[c], norm.bias[c] = 0.0, 0.0
            for c in spec.constant:
                norm.weight[c], norm.bias[c] = 0.0, 0.7
        else:
            assert self.conv.bias is not None  # a conv without a norm after it has a bias
            for c in spec.dead:
                self.conv.weight[c], self.conv.bias[c] = 0.0, 0.0
            for c in spec.constant:
                self.conv.weight[c], self.conv.bias[c] = 0.0, 0.7


class ResidualBlock(nn.Module):
    def __init__(self, c_in: int, spec: Residual):
        super().__init__()
        self.body = nn.Sequential(ConvBlock(c_in, spec.body[0]), ConvBlock(spec.body[0].out, spec.body[1]))
        self.shortcut = nn.Conv2d(c_in, spec.body[1].out, 1, bias=False) if spec.projection else nn.Identity()

    def forward(self, x):
        return torch.relu(self.body(x) + self.shortcut(x))


class ConcatBlock(nn.Module):
    def __init__(self, c_in: int, spec: Concat):
        super().__init__()
        self.left, self.right = ConvBlock(c_in, spec.left), ConvBlock(c_in, spec.right)

    def forward(self, x):
        return torch.cat([self.left(x), self.right(x)], 1)


class ChunkBlock(nn.Module):
    def __init__(self, c_in: int, spec: Chunks):
        super().__init__()
        self.parts = spec.parts
        self.convs = nn.ModuleList(nn.Conv2d(c_in // spec.parts, spec.out_per_part, 1) for _ in range(spec.parts))

    def forward(self, x):
        parts = torch.chunk(x, self.parts, 1)
        return torch.cat([conv(parts[i]) for i, conv in enumerate(self.convs)], 1)


class ShuffleBlock(nn.Module):
    def __init__(self, spec: Shuffle):
        super().__init__()
        self.groups = spec.groups

    def forward(self, x):
        n, c, h, w = x.size(0), x.size(1), x.size(2), x.size(3)
        return x.view(n, self.groups, c // self.groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class SEBlock(nn.Module):
    def __init__(self, c_in: int, spec: SqueezeExcite):
        super().__init__()
        self.reduce, self.expand = nn.Conv2d(c_in, spec.hidden, 1), nn.Conv2d(spec.hidden, c_in, 1)

    def forward(self, x):
        gate = torch.sigmoid(self.expand(torch.relu(self.reduce(x.mean((2, 3), keepdim=True)))))
        return x * gate


class Head(nn.Module):
    def __init__(self, kind: str, c_in: int, size: int, classes: int):
        super().__init__()
        self.kind = kind
        self.fc: nn.Module
        if kind == "gap-linear":
            self.fc = nn.Linear(c_in, classes)
        elif kind == "flatten-linear":
            self.fc = nn.Linear(c_in * size * size, classes)
        elif kind == "gap-mlp":
            self.fc = nn.Sequential(nn.Linear(c_in, 16), nn.ReLU(), nn.Linear(16, classes))
        else:
            self.fc = nn.Conv2d(c_in, classes, 1)

    def forward(self, x):
        if self.kind == "flatten-linear":
            return self.fc(torch.flatten(x, 1))
        if self.kind == "conv-gap":
            return self.fc(x).mean((2, 3))
        return self.fc(x.mean((2, 3)))


class GeneratedCNN(nn.Module):
    def __init__(self, spec: CNNSpec):
        super().__init__()
        width, size = spec.stem.out, INPUT_SIZE
        layers: list[nn.Module] = [ConvBlock(3, spec.stem)]
        for block in spec.blocks:
            if isinstance(block, Conv):
                layers.append(ConvBlock(width, block))
                width, size = block.out, _out_size(size, block)
            elif isinstance(block, Residual):
                layers.append(ResidualBlock(width, block))
                width = block.body[1].out
            elif isinstance(block, Concat):
                layers.append(ConcatBlock(width, block))
                width = block.left.out + block.right.out
            elif isinstance(block, Chunks):
                layers.append(ChunkBlock(width, block))
                width = block.parts * block.out_per_part
            elif isinstance(block, Shuffle):
                layers.append(ShuffleBlock(block))
            elif isinstance(block, SqueezeExcite):
                layers.append(SEBlock(width, block))
            else:
                layers.append(nn.MaxPool2d(2) if block.kind == "max" else nn.AvgPool2d(2))
                size //= 2
        self.features = nn.Sequential(*layers)
        self.head = Head(spec.head, width, size, spec.classes)

    def forward(self, x):
        return self.head(self.features(x))


def build(spec: CNNSpec) -> GeneratedCNN:
    """The model of ``spec``, in eval mode, its weights drawn from ``spec.seed`` and its channels planted."""
    torch.manual_seed(spec.seed)
    model = GeneratedCNN(spec)
    generator = torch.Generator().manual_seed(spec.seed)
    for module in model.modules():
        if isinstance(module, ConvBlock):
            module.plant(generator)
    return model.eval()


# -- the independent judgement ------------------------------------------------------------------------------------
def judged_widths(spec: CNNSpec) -> dict[str, int]:
    """{conv module name: the output width pruning must leave} for the blocks simple enough to judge: a top-level
    plain conv block (one group) whose output reaches, through any pooling, only a plain conv block or the head.
    Its dead channels (0 through a zero-preserving activation, and through pooling) are removable exactly; its
    constant channels too where they reach a reader that folds a constant into its bias: a linear head (through
    the global mean or the flatten) or an unpadded 1x1 conv (pooling without padding keeps a constant constant)."""
    layers: list[Block] = [spec.stem, *spec.blocks]
    judged = {}
    for i, block in enumerate(layers):
        if not isinstance(block, Conv) or block.groups != "one":
            continue
        reader = next((after for after in layers[i + 1 :] if not isinstance(after, Pool)), None)
        if reader is None:
            folds = True  # every head reads a constant channel as a constant: a linear layer or a 1x1 conv
        elif isinstance(reader, Conv) and reader.groups == "one":
            folds = reader.kernel == 1
        else:
            continue
        judged[f"features.{i}.conv"] = block.out - len(block.dead) - (len(block.constant) if folds else 0)
    return judged
