"""Loaded first by every Python the emulated-Pi check starts: an import of the build side's libraries is reported
(the check fails on the marker) and then refused as if the module were not installed, which on a Pi it is not."""

import sys

_BUILD_SIDE = ("torch", "torchvision", "onnx", "onnxsim", "torch_pruning")


class _BuildSideGuard:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in _BUILD_SIDE:
            sys.stderr.write(f"EDGESHIFT-PI-CHECK: the device side imported {name}\n")
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, _BuildSideGuard())
