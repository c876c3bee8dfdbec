"""INT8 vs FP32 through ONNX Runtime: both formats, 1 and 2 threads, and top-1 on the whole test split.

For each model: the FP32 ONNX the exporter ships (conv-BN fused, simplified), its INT8 models in QOperator/uint8
and QDQ/int8 (``edgeshift.exporter.quantize``: ORT's pre-processing, static quantization, per-channel int8
weights, calibrated on training images), timed against each other in one interleaved run under the device profile
(warm-up excluded, p50 of all rounds) at each thread count; the ratio is FP32 p50 / INT8 p50 from that same run.
Trained checkpoints also get top-1 through ONNX Runtime on the whole test split. Zoo models at 224x224 are timed
only (random weights, calibrated on random images: speed does not depend on what the weights learned).

    python benchmarks/int8_speed.py --checkpoint resnet20=/tmp/edgeshift-bench/resnet20-dense.pt \
        --checkpoint vgg16=/tmp/edgeshift-bench/vgg16-dense.pt --zoo mobilenetv2 --zoo resnet18 \
        --data ../shared/datasets/cifar10 --out /tmp/edgeshift-bench/int8.json [--profile host] [--threads 1 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
from pathlib import Path

import numpy as np

from edgeshift.pruner.models.record import record_of


def fp32_onnx(model, shape) -> bytes:
    import tempfile

    import torch

    from edgeshift.exporter.onnx_export import export_onnx

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.onnx"
        export_onnx(model.eval(), torch.randn(shape, generator=torch.Generator().manual_seed(0)), path)
        return path.read_bytes()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", action="append", default=[], help="name=path of a trained checkpoint")
    ap.add_argument("--zoo", action="append", default=[], help="a zoo architecture at its own input size")
    ap.add_argument("--data", help="the dataset the checkpoints were trained on (calibration and test split)")
    ap.add_argument("--profile", default="host")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--calibration-samples", type=int, default=64)
    ap.add_argument("--calibration-method", default="minmax")
    ap.add_argument("--out", type=Path, required=True, help="JSON results")
    args = ap.parse_args()

    import onnxruntime as ort

    from edgeshift.exporter.profile import TestData, onnx_accuracy, time_interleaved_models, timing_profile
    from edgeshift.exporter.quantize import Calibration, Int8Scheme, quantize_onnx
    from edgeshift.pruner.checkpoint import load_checkpoint
    from edgeshift.pruner.data import load_dataset
    from edgeshift.pruner.models.zoo import create_model, input_shape
    from edgeshift.runtime.measure import machine_label

    schemes = [Int8Scheme("qoperator", "uint8"), Int8Scheme("qdq", "int8")]
    models = []
    for spec in args.checkpoint:
        name, path = spec.split("=", 1)
        model, _ = load_checkpoint(Path(path))
        models.append((name, model, True))
    for arch in args.zoo:
        models.append((arch, create_model(arch), False))
    results = {
        "machine": machine_label(),
        "date": datetime.date.today().isoformat(),
        "profile": args.profile,
        "models": {},
    }
    for name, model, trained in models:
        shape = input_shape(model, 1)
        fp32 = fp32_onnx(model, shape)
        if trained:
            record = record_of(model)
            train = load_dataset(args.data, "train", num_classes=record.classes, size=record.input_size)
            test = load_dataset(args.data, "test", num_classes=record.classes, size=record.input_size)
            train = dataclasses.replace(train.subset(args.calibration_samples), mean=test.mean, std=test.std)
            calibration = Calibration(train.normalised(), args.calibration_method, train.name)
        else:
            rng = np.random.default_rng(0)
            calibration = Calibration(
                rng.standard_normal((args.calibration_samples, *shape[1:])).astype(np.float32),
                args.calibration_method,
                "random",
            )
        blobs = {"fp32": fp32, **{s.label: quantize_onnx(fp32, calibration, s, name=name) for s in schemes}}
        row: dict[str, dict] = {"bytes": {k: len(v) for k, v in blobs.items()}, "p50_ms": {}, "speedup": {}, "top1": {}}
        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        for threads in args.threads:
            profile = timing_profile(args.profile, threads=threads)
            stats = time_interleaved_models(blobs, {"input": x}, profile, batch=1)
            row["p50_ms"][threads] = {k: s.p50_ms for k, s in stats.items()}
            row["speedup"][threads] = {k: stats["fp32"].p50_ms / s.p50_ms for k, s in stats.items() if k != "fp32"}
            print(
                f"{name} {threads} thread(s): "
                + ", ".join(f"{k} {s.p50_ms:.3f} ms" for k, s in stats.items())
                + " | speed-up "
                + ", ".join(f"{k} {v:.2f}x" for k, v in row["speedup"][threads].items()),
                flush=True,
            )
        if trained:
            data = TestData(test.normalised(), test.labels, test.name)
            opts = ort.SessionOptions()
            for k, blob in blobs.items():
                session = ort.InferenceSession(blob, opts, providers=["CPUExecutionProvider"])
                row["top1"][k] = onnx_accuracy(session, data)[0]
            print(
                f"{name} top-1 on {len(test.labels)} test images: "
                + ", ".join(f"{k} {100 * v:.2f}%" for k, v in row["top1"].items()),
                flush=True,
            )
        results["models"][name] = row
        args.out.write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
