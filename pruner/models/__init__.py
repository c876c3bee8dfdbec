"""The model zoo: CIFAR VGG-11/16/19, CIFAR ResNet-20/56, ResNet-18/50, MobileNetV2."""

from .registry import MODELS, register_model
from .zoo import create_model, entry, get, input_shape, names, reinitialise

__all__ = ["MODELS", "create_model", "entry", "get", "input_shape", "names", "register_model", "reinitialise"]
