"""CIFAR-style VGG with a single linear classifier (the OpenLTH / lottery-ticket configuration)."""

from __future__ import annotations

from torch import nn

from .registry import register_model

PLANS = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512],
}


class ConvBNReLU(nn.Sequential):
    def __init__(self, cin: int, cout: int):
        super().__init__(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class CifarVGG(nn.Module):
    """VGG for 32x32 inputs: conv stages, a final 2x2 average pool, one linear layer."""

    def __init__(self, plan: list, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_channels
        for spec in plan:
            if spec == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers.append(ConvBNReLU(cin, int(spec)))
                cin = int(spec)
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        self.init_weights()

    def init_weights(self) -> None:
        """The architecture's initialisation (Kaiming fan-out convs; PyTorch defaults elsewhere)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = self.pool(self.features(x))
        return self.fc(x.flatten(1))


@register_model("vgg11", num_classes=10, input_size=32, help="CIFAR VGG-11, one linear layer")
def vgg11(num_classes: int = 10, **kw) -> CifarVGG:
    return CifarVGG(PLANS["vgg11"], num_classes, **kw)


@register_model("vgg16", num_classes=10, input_size=32, help="CIFAR VGG-16, one linear layer (OpenLTH)")
def vgg16(num_classes: int = 10, **kw) -> CifarVGG:
    return CifarVGG(PLANS["vgg16"], num_classes, **kw)


@register_model("vgg19", num_classes=10, input_size=32, help="CIFAR VGG-19, one linear layer")
def vgg19(num_classes: int = 10, **kw) -> CifarVGG:
    return CifarVGG(PLANS["vgg19"], num_classes, **kw)
