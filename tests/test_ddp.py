"""Data-parallel training through torchrun on CPU: two processes, gloo."""

import json
import os
import subprocess
import sys

import torch

from edgeshift.pruner.checkpoint import load_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = [
    "--data",
    "generated",
    "--iterations",
    "3",
    "--batch-size",
    "16",
    "--train-samples",
    "64",
    "--test-samples",
    "20",
]


def torchrun(args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "edgeshift",
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


def test_train_with_two_processes_writes_one_checkpoint(tmp_path):
    proc = torchrun(["train", "--arch", "resnet20", "-o", str(tmp_path / "d.pt"), *SMALL], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("wrote") == 1 and "2 processes" in proc.stdout
    model, payload = load_checkpoint(tmp_path / "d.pt")
    assert payload["meta"]["processes"] == 2 and payload["meta"]["steps"] == 3
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_imp_with_two_processes(tmp_path):
    out = tmp_path / "run"
    proc = torchrun(["imp", "--arch", "resnet20", "--levels", "1", "--out", str(out), *SMALL], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = json.loads((out / "level_1" / "metrics.json").read_text())
    assert metrics["processes"] == 2 and metrics["sparsity"] == 0.5
    model, payload = load_checkpoint(out / "level_1" / "checkpoint.pt")
    weights = dict(model.named_parameters())
    assert all(torch.count_nonzero(weights[k][~m]) == 0 for k, m in payload["masks"].items())
