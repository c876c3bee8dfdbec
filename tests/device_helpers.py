"""What device-side tests share: a runner of the CLI with torch made unimportable, and test images."""
import os

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BLOCK_TORCH = """
import sys, runpy
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'onnx', 'onnxsim', 'torch_pruning', 'torchvision'):
            raise ModuleNotFoundError(f'No module named {name!r} (blocked in this test)', name=name)
        return None
sys.meta_path.insert(0, Block())
sys.argv = ['edgeshift'] + sys.argv[1:]
try:
    runpy.run_module('edgeshift', run_name='__main__')
finally:
    leaked = [m for m in ('torch', 'onnx') if m in sys.modules]
    assert not leaked, f'imported {leaked}'
"""


def npy_images(folder, n=3, size=8):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        np.save(folder / f"img{i}.npy", rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
    return folder
