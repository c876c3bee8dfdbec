"""What device-side tests share: a runner of the CLI with torch made unimportable, and test images."""

import os

import numpy as np

from edgeshift.runtime.measure import machine_fingerprint
from edgeshift.runtime.portfolio import Portfolio

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


# What tests give as this device's timings (ms, p50 per interleaved round): the order the ladder must
# follow is the test's, so no test depends on how fast anything ran. The speed portfolio's variants are built to
# time in this order (onnx_helpers.SPEED_VARIANTS); benchmarks, not tests, show that they do.
GIVEN_P50 = {"big_fast": 0.1, "dense": 0.4, "small_slow": 1.6}


def given_bench(portfolio, profile_name: str, p50: dict[str, float] = GIVEN_P50) -> dict:
    """A bench document as ``edgeshift bench`` writes it on this machine, with the timings ``p50`` gives."""
    with Portfolio.open(portfolio) as pf:
        rows = [
            {
                "name": n,
                "sha256": pf.info(n).sha256,
                "p50_ms": p50[n],
                "p95_ms": 1.5 * p50[n],
                "round_p50_ms": [p50[n] * f for f in (0.98, 1.0, 1.02)],
            }
            for n in pf.names
        ]
    return {"profile": profile_name, "fingerprint": machine_fingerprint(), "variants": rows}
