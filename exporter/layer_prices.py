"""What each conv and linear layer costs on the device as a function of its widths, measured.

For every conv/linear layer of a model, a one-node ONNX graph with the layer's kernel, stride, padding, groups and
input size is timed through ONNX Runtime under the device profile at a few widths (both sides scaled together),
and ``p50 = fixed + per_mac * MACs`` is fitted to them by least squares. What the layers do not explain of the whole
model's measured p50 (activations, additions, pooling, the session's own per-call cost) is the model's overhead,
a constant. The learned masks (``edgeshift.pruner.learned_masks``) price each gate with this model, so a channel
whose removal saves nothing on the device is not worth closing. ``MacsPricer`` is the other choice: MACs alone.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from edgeshift.device_profiles import DeviceProfile, load_profile
from edgeshift.pruner.metrics import forward_with_hooks
from edgeshift.runtime.timing_process import Graph, TimingSettings, time_graphs

from .profile import OrtMeasurer

__all__ = ["LatencyPricer", "MacsPricer", "PriceModel", "layer_graph"]

WIDTH_FRACTIONS = (0.25, 0.5, 0.75, 1.0)


@dataclass(frozen=True)
class _Geometry:
    """One layer as ONNX will run it."""

    name: str
    kind: str  # "conv" | "linear"
    in_channels: int
    out_channels: int
    kernel: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1
    input_hw: tuple[int, ...] = ()

    @property
    def depthwise(self) -> bool:
        return self.groups > 1 and self.groups == self.in_channels == self.out_channels

    def at(self, fraction: float) -> _Geometry:
        """The same layer with both widths scaled by ``fraction`` (grouped convs keep their group count)."""

        def scaled(c: int) -> int:
            step = self.groups if not self.depthwise else 1
            return max(step, int(round(c * fraction / step)) * step)

        cin, cout = scaled(self.in_channels), scaled(self.out_channels)
        groups = cin if self.depthwise else self.groups
        if self.depthwise:
            cout = cin
        return dataclasses.replace(self, in_channels=cin, out_channels=cout, groups=groups)

    def macs(self, batch: int = 1) -> float:
        if self.kind == "linear":
            return float(batch * self.in_channels * self.out_channels)
        out_hw = [
            (h + 2 * p - d * (k - 1) - 1) // s + 1
            for h, p, d, k, s in zip(self.input_hw, self.padding, self.dilation, self.kernel, self.stride)
        ]
        return float(
            batch * self.out_channels * np.prod(out_hw) * np.prod(self.kernel) * self.in_channels / self.groups
        )


def layer_graph(g: _Geometry, batch: int = 1) -> bytes:
    """A one-node ONNX model running layer ``g`` (random weights) on an input named ``x``."""
    rng = np.random.default_rng(0)
    if g.kind == "linear":
        shape = [batch, g.in_channels]
        w = rng.standard_normal((g.out_channels, g.in_channels)).astype(np.float32)
        node = helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1)
    else:
        shape = [batch, g.in_channels, *g.input_hw]
        w = rng.standard_normal((g.out_channels, g.in_channels // g.groups, *g.kernel)).astype(np.float32)
        node = helper.make_node(
            "Conv",
            ["x", "w", "b"],
            ["y"],
            kernel_shape=list(g.kernel),
            strides=list(g.stride),
            pads=list(g.padding) * 2,
            dilations=list(g.dilation),
            group=g.groups,
        )
    b = rng.standard_normal(g.out_channels).astype(np.float32)
    graph = helper.make_graph(
        [node],
        g.name or "layer",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def _geometries(model, example_inputs) -> list[_Geometry]:
    """Every conv and linear layer the forward on ``example_inputs`` runs, with its input size."""

    seen: dict[str, _Geometry] = {}
    names = {m: n for n, m in model.named_modules()}

    def hook(m, inputs, output):
        name = names[m]
        if isinstance(m, nn.Conv2d):
            seen[name] = _Geometry(
                name,
                "conv",
                m.in_channels,
                m.out_channels,
                tuple(m.kernel_size),
                tuple(m.stride),
                tuple(m.padding) if not isinstance(m.padding, str) else (0, 0),
                tuple(m.dilation),
                m.groups,
                tuple(inputs[0].shape[2:]),
            )
        else:
            seen[name] = _Geometry(name, "linear", m.in_features, m.out_features)

    forward_with_hooks(
        model, example_inputs, [(m, hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    )
    return list(seen.values())


@dataclass
class PriceModel:
    """Per layer ``(fixed, per_mac)`` and the model's constant overhead, in the unit the pricer measures in."""

    layers: dict[str, tuple[float, float]]
    overhead: float
    unit: str  # "ms" | "MACs"
    dense: float | None = None  # the whole dense model's measured p50 (ms), for latency prices
    samples: dict[str, list[tuple[float, float]]] | None = None  # per layer: (MACs, p50 ms) at each width

    def to_dict(self) -> dict:
        return {
            "unit": self.unit,
            "overhead": self.overhead,
            "dense": self.dense,
            "layers": {k: {"fixed": a, "per_mac": b} for k, (a, b) in self.layers.items()},
        }


class MacsPricer:
    """Every layer costs its MACs; nothing is measured."""

    name = "macs"

    def prices(self, model, example_inputs) -> PriceModel:
        return PriceModel({g.name: (0.0, 1.0) for g in _geometries(model, example_inputs)}, 0.0, "MACs")


class LatencyPricer:
    """Every layer costs what ONNX Runtime takes for it under ``profile`` at the serving batch, fitted over a width
    sweep; the rest of the model's measured p50 is its overhead."""

    name = "latency"

    def __init__(self, profile: DeviceProfile | str = "host", *, iterations: int = 400, rounds: int = 4) -> None:
        self.profile = load_profile(profile) if isinstance(profile, str) else profile
        self.iterations, self.rounds = iterations, rounds

    def _time(self, graphs: dict[str, tuple[bytes, dict]]) -> dict[str, float]:
        settings = TimingSettings(warmup=20, iterations=self.iterations * len(graphs), rounds=self.rounds)
        stats = time_graphs({k: Graph(raw, feed) for k, (raw, feed) in graphs.items()}, self.profile, settings)
        return {k: v.p50_ms for k, v in stats.items()}

    def prices(self, model, example_inputs) -> PriceModel:

        batch = self.profile.serving.batch_size
        layers, samples = {}, {}
        geometries = _geometries(model, example_inputs)
        for g in geometries:
            widths = {f: g.at(f) for f in WIDTH_FRACTIONS}
            graphs = {}
            for f, gf in widths.items():
                shape = [batch, gf.in_channels, *gf.input_hw]
                graphs[str(f)] = (layer_graph(gf, batch), {"x": np.zeros(shape, np.float32) + 0.5})
            p50 = self._time(graphs)
            xs = np.array([widths[f].macs() for f in WIDTH_FRACTIONS])  # per sample, as the masks count
            ys = np.array([p50[str(f)] for f in WIDTH_FRACTIONS])
            per_mac, fixed = np.polyfit(xs, ys, 1) if len(set(xs)) > 1 else (0.0, float(ys.mean()))
            per_mac = max(float(per_mac), 0.0)
            fixed = max(float(ys.mean() - per_mac * xs.mean()), 0.0)
            layers[g.name] = (fixed, per_mac)
            samples[g.name] = [(float(x), float(y)) for x, y in zip(xs, ys)]
        x1 = example_inputs[:1].expand(batch, *example_inputs.shape[1:]).contiguous()
        dense = float(OrtMeasurer(self.profile).latency(model, x1)[0]["p50_ms"])
        explained = sum(layers[g.name][0] + layers[g.name][1] * g.macs() for g in geometries)
        # A layer run alone pays a whole session call (and wakes the thread pool) each time; inside the model it
        # does not, so the layers' sum overshoots the model. The call's own cost is the overhead, and the layers
        # are scaled to explain the rest of the dense p50: their relative prices stand as measured.
        overhead = min(self._call_cost(), dense)
        scale = (dense - overhead) / explained if explained > 0 else 1.0
        layers = {k: (a * scale, b * scale) for k, (a, b) in layers.items()}
        return PriceModel(layers, overhead, "ms", dense, samples)

    def _call_cost(self) -> float:
        """p50 of a session call that does almost nothing (one Relu on one value)."""
        node = helper.make_node("Relu", ["x"], ["y"])
        graph = helper.make_graph(
            [node],
            "call",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        return self._time({"call": (model.SerializeToString(), {"x": np.ones(1, np.float32)})})["call"]
