"""The Runtime API as an application on the device uses it, run by the emulated-Pi check on the Pi and on the host:
open a portfolio, predict, switch through every variant and back, and print every answer as JSON.

usage: python on_device.py PORTFOLIO INPUTS.npy PROFILE
"""

import json
import sys

import numpy as np

from edgeshift import Runtime


def main(portfolio: str, inputs: str, profile: str) -> None:
    x = np.load(inputs)
    answers: dict[str, object] = {}
    with Runtime(portfolio, profile=profile, policy="manual") as rt:
        order = [rt.active, *[n for n in rt.variants if n != rt.active], rt.active]
        for name in order:
            rt.switch_to(name)
            answers.setdefault(name, rt.predict(x).tolist())
        stats = rt.stats()
    print(
        json.dumps(
            {
                "logits": answers,
                "switches": [[s["source"], s["target"]] for s in stats["switch_log"]],
                "execution": stats["execution"],
                "requests": stats["requests"],
                "torch_or_onnx_loaded": sorted(m for m in ("torch", "onnx") if m in sys.modules),
            }
        )
    )


if __name__ == "__main__":
    main(*sys.argv[1:4])
