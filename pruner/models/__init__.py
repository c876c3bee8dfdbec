"""The model zoo: CIFAR VGG-11/16/19, CIFAR ResNet-20/56, ResNet-18/50, MobileNetV2."""
from .registry import create_model, get, input_shape, names

__all__ = ["create_model", "get", "input_shape", "names"]
