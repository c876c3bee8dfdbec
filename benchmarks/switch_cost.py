"""What a switch costs: inflate, create and warm-up measured separately, a cold switch against inflate+create
measured alone, a switch to a warm standby neighbour, and loading the same variant from an uncompressed .onnx
file. Medians over --repeats. Targets: standby switch < 1 ms; cold switch <= 1.2x (inflate + create alone).

    python benchmarks/switch_cost.py [--portfolio PATH] [--profile host] [--repeats 15]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from _common import ensure_vgg16_portfolio

from edgeshift import device_profiles
from edgeshift.runtime.engine import Runtime
from edgeshift.runtime.measure import machine_label
from edgeshift.runtime.portfolio import Portfolio
from edgeshift.runtime.session import absorb_first_session_cost, create_session, session_for_variant


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--portfolio")
    ap.add_argument("--profile", default="host")
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    path = ensure_vgg16_portfolio(args.portfolio)
    prof = device_profiles.load_profile(args.profile)
    med = statistics.median
    print(f"machine: {machine_label()}; profile {prof.name}; portfolio {path.name}; medians of {args.repeats}")
    print(
        f"{'variant':<8} {'MB':>6} {'inflate':>8} {'create':>8} {'alone':>8} {'warm':>7} {'cold switch':>11} "
        f"{'ratio':>6} {'overhead':>9} {'from .onnx':>10} {'standby':>8}"
    )
    with Portfolio.open(path) as pf, tempfile.TemporaryDirectory() as tmp:
        absorb_first_session_cost(pf, prof)
        for name in pf.names:
            alone, inflates, creates, files, colds, warms, overheads, standbys = ([] for _ in range(8))
            onnx_file = Path(tmp) / f"{name}.onnx"
            onnx_file.write_bytes(pf.inflate(name))
            other = pf.names[0] if name != pf.names[0] else pf.names[1]
            with Runtime(pf, profile=prof, start=other, preload_neighbours=False) as rt:
                for _ in range(args.repeats):  # interleaved, so both see the same allocator state
                    t = time.perf_counter()
                    session, a, c = session_for_variant(pf, name, prof)
                    alone.append((time.perf_counter() - t) * 1e3)
                    inflates.append(a)
                    creates.append(c)
                    del session
                    t = time.perf_counter()
                    session = create_session(str(onnx_file), prof)
                    files.append((time.perf_counter() - t) * 1e3)
                    del session
                    rec = rt.switch_to(name)
                    colds.append(rec.total_ms)
                    warms.append(rec.warm_ms)
                    overheads.append(rec.total_ms - rec.inflate_ms - rec.create_ms - rec.warm_ms)
                    rt.switch_to(other)
            neighbour = pf.names[pf.names.index(name) - 1] if name != pf.names[0] else pf.names[1]
            with Runtime(pf, profile=prof, start=neighbour, preload_neighbours=True) as rt:
                rt.switch_to(neighbour)  # waits for the standby build queued at start
                for _ in range(args.repeats):
                    rec = rt.switch_to(name)
                    assert rec.standby, "expected a warm standby"
                    standbys.append(rec.total_ms)
                    rt.switch_to(neighbour)
            print(
                f"{name:<8} {pf.info(name).bytes / 2**20:6.1f} {med(inflates):8.1f} {med(creates):8.1f} "
                f"{med(alone):8.1f} {med(warms):7.1f} {med(colds):11.1f} {med(colds) / med(alone):6.2f} "
                f"{med(overheads):9.2f} {med(files):10.1f} {med(standbys):8.3f}"
            )
    print(
        "times in ms; alone = inflate + create measured alone; cold switch = request to swap (inflate + create + "
        "warm-up run, on the switch thread); overhead = cold switch minus its inflate, create and warm-up (the "
        "switching mechanism itself); standby = switch to a warm neighbour"
    )


if __name__ == "__main__":
    main()
