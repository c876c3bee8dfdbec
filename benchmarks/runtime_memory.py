"""Memory of the runtime vs holding every session open (the ensemble approach), each in a fresh process.

For the smallest, median and largest variant active: process RSS and its growth over a baseline process that
has imported everything and opened the portfolio; against the same for all sessions open at once.
Target: median active <= 1/3 of the ensemble; inactive variants cost at most their deflated bytes.

    python benchmarks/runtime_memory.py [--portfolio PATH] [--profile host]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from _common import ensure_vgg16_portfolio

CHILD = r"""
import gc, json, sys
import numpy as np, psutil
from edgeshift.runtime.portfolio import Portfolio
from edgeshift.runtime.engine import Runtime
from edgeshift.runtime.session import session_for_variant
from edgeshift import device_profiles
path, mode, profile = sys.argv[1], sys.argv[2], sys.argv[3]
prof = device_profiles.load_profile(profile)
rss = lambda: psutil.Process().memory_info().rss
pf = Portfolio.open(path)
x = np.zeros([1 if d is None else d for d in pf.input_spec.shape], np.float32)
gc.collect()
base = rss()
keep = []
if mode == "ensemble":
    for name in pf.names:
        s = session_for_variant(pf, name, prof)[0]
        s.run(None, {s.get_inputs()[0].name: x})
        keep.append(s)
elif mode != "baseline":
    rt = Runtime(pf, profile=prof, start=mode)
    for _ in range(5):
        rt.predict(x)
    keep.append(rt)
gc.collect()
print(json.dumps({"rss": rss(), "growth": rss() - base, "base": base}))
"""


def child(path, mode, profile) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(path), mode, profile], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--portfolio")
    ap.add_argument("--profile", default="host")
    args = ap.parse_args()
    path = ensure_vgg16_portfolio(args.portfolio)
    from edgeshift.runtime.portfolio import Portfolio

    with Portfolio.open(path) as pf:
        names, infos = pf.names, {v.name: v for v in pf.variants}
        median, file_bytes = pf.median_variant, pf.file_bytes
    mb = lambda b: b / 2**20  # noqa: E731
    ens = child(path, "ensemble", args.profile)
    print(
        f"portfolio {path.name}: {len(names)} variants, file {mb(file_bytes):.1f} MB "
        f"({', '.join(f'{n} {mb(infos[n].bytes):.1f}/{mb(infos[n].deflated_bytes):.1f} MB' for n in names)} "
        "onnx/in-file)"
    )
    print(f"baseline process (imports + portfolio open, memory-mapped): {mb(ens['base']):.1f} MB RSS")
    print(f"ensemble (all {len(names)} sessions open): RSS {mb(ens['rss']):.1f} MB, growth {mb(ens['growth']):.1f} MB")
    for label, name in (("smallest", names[0]), ("median", median), ("largest", names[-1])):
        r = child(path, name, args.profile)
        print(
            f"runtime, {label} ({name}) active: RSS {mb(r['rss']):.1f} MB ({r['rss'] / ens['rss']:.2f} of ensemble), "
            f"growth {mb(r['growth']):.1f} MB ({r['growth'] / ens['growth']:.2f} of ensemble growth)"
        )


if __name__ == "__main__":
    main()
