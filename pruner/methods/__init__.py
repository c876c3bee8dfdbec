"""Pruning methods: each one class in one file, found through the ``edgeshift.methods`` entry points."""

from .base import DataChoice, MethodContext, PruningMethod
from .registry import GROUP, METHODS, check_method

__all__ = ["GROUP", "METHODS", "DataChoice", "MethodContext", "PruningMethod", "check_method"]
