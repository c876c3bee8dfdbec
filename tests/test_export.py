"""ONNX export: fused, simplified, fully checked, and numerically equal to PyTorch."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from helpers import ZOO_CASES, assert_onnx_computes, inputs_for, make, plant_zeros
from torch import nn

from edgeshift.core.errors import EdgeshiftError
from edgeshift.exporter.onnx_export import ExportError, export_onnx
from edgeshift.pruner.structured import prune_zero_channels


def ort_run(path, x):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x})[0]


@pytest.mark.parametrize("name,kw,size", ZOO_CASES)
def test_every_zoo_model_exports_fused_checked_and_equal(name, kw, size, tmp_path):
    model = make(name, kw, size)
    report = export_onnx(model, inputs_for(size), tmp_path / "m.onnx")
    proto = onnx.load(tmp_path / "m.onnx")
    onnx.checker.check_model(proto, full_check=True)
    counted = {op: sum(n.op_type == op for n in proto.graph.node) for op in ("BatchNormalization", "Conv")}
    assert counted["BatchNormalization"] == 0 and report.op_counts.get("Conv") == counted["Conv"] > 0
    assert report.simplified
    # a batch size not seen at export (the batch is dynamic), against torch in float64: the test's own oracle
    assert_onnx_computes(tmp_path / "m.onnx", model, inputs_for(size, batch=3, seed=7))


def test_pruned_model_exports_with_its_own_widths(tmp_path):
    model = make("resnet20", {}, 32)
    plant_zeros(model)
    pruned, _ = prune_zero_channels(model, inputs_for(32))
    report = export_onnx(pruned, inputs_for(32), tmp_path / "p.onnx")
    dense = export_onnx(model, inputs_for(32), tmp_path / "d.onnx")
    assert report.params < dense.params
    assert report.macs < dense.macs
    x = inputs_for(32, seed=3)
    with torch.no_grad():
        ref = model(x).numpy()
    assert np.abs(ort_run(tmp_path / "p.onnx", x.numpy()) - ref).max() <= 1e-4 * np.abs(ref).max()


def test_tiny_graph_op_counts_after_fusion(tmp_path):
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2)
    ).eval()
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    report = export_onnx(model, torch.randn(2, 3, 8, 8), tmp_path / "t.onnx")
    assert report.op_counts == {"Conv": 1, "Relu": 1, "Flatten": 1, "Gemm": 1}
    assert report.params == 4 * 3 * 9 + 4 + 4 * 36 * 2 + 2
    assert report.macs == 4 * 36 * 27 + 144 * 2


class NotExportable(nn.Module):
    def forward(self, x):
        return torch.from_numpy(x.detach().numpy() * 2)  # leaves the traced graph


def test_model_that_fails_to_export_is_a_clear_error(tmp_path):
    with pytest.raises(ExportError, match="failed to export to ONNX"):
        export_onnx(NotExportable(), torch.randn(1, 3, 4, 4), tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


def test_output_in_missing_directory(tmp_path):
    with pytest.raises(EdgeshiftError, match="output directory does not exist"):
        export_onnx(make("resnet20", {}, 32), inputs_for(32), tmp_path / "no" / "m.onnx")


class SmallPoolHead(nn.Module):
    """A VGG-style head pooling adaptively to a size that does not divide the feature map (2x2 -> 3x3)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=8, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(3)
        self.fc = nn.Linear(36, 5)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.conv(x)), 1))


def test_adaptive_pool_to_a_size_that_does_not_divide_exports_exactly(tmp_path):
    from edgeshift.exporter import export_onnx

    model = SmallPoolHead().eval()
    report = export_onnx(
        model, torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(7)), tmp_path / "m.onnx"
    )  # checks batch 1 and 2 through ORT
    assert report.rel_diff < 1e-5 and "Einsum" in report.op_counts
