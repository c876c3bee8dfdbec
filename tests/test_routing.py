"""Gating made static (routed signatures): the signatures voted from masks, each one the backbone under its masks
pruned exactly, the router's frozen part in the fine-tuning, the one-graph export on ONNX Runtime, and the
refusal of a malformed routing entry; tiny models, generated tensors."""

from __future__ import annotations

from typing import cast

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from helpers import make
from test_gating import Chain
from torch import nn

from edgeshift.core.errors import EdgeshiftError
from edgeshift.exporter.routing import export_routed
from edgeshift.pruner.gating import GatedNetwork
from edgeshift.pruner.routing import (
    RoutedNetwork,
    RoutedTraining,
    Router,
    routed_network,
    router_prefix,
    signature_network,
    signatures_of,
)
from edgeshift.runtime.graph_check import check_graph


def _chain(seed: int = 0) -> Chain:
    torch.manual_seed(seed)
    model = Chain()
    for bn in (model.b1, model.b2):
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _masked_chain(model: Chain, keep: list[list[int]], x: torch.Tensor) -> torch.Tensor:
    """The oracle: Chain's forward written out, each block's filters outside ``keep`` zeroed after its ReLU."""
    m1, m2 = torch.zeros(8), torch.zeros(6)
    m1[keep[0]], m2[keep[1]] = 1.0, 1.0
    h = torch.relu(model.b1(model.c1(x))) * m1[None, :, None, None]
    h = torch.relu(model.b2(model.c2(F.max_pool2d(h, 2)))) * m2[None, :, None, None]
    return model.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))


def test_a_signature_keeps_the_filters_its_group_votes_for_and_never_empties_a_block():
    # two clear groups of inputs over one block of 4 filters and one of 2
    first = np.array([[1, 1, 0, 0, 1, 0]] * 6 + [[1, 0, 0, 0, 1, 0]] * 4, bool)  # filter 1 kept by 60%
    second = np.array([[0, 0, 1, 1, 0, 0]] * 10, bool)  # block 2: no filter kept
    found = signatures_of(np.concatenate([first, second]), [4, 2], k=2, vote=0.6)
    assert set(found.groups[:10]) != set(found.groups[10:]) and len(set(found.groups[:10])) == 1
    a, b = int(found.groups[0]), int(found.groups[10])
    assert found.keep[a] == [[0, 1], [0]]
    assert found.keep[b][0] == [2, 3] and len(found.keep[b][1]) == 1  # the most kept filter, not none
    assert signatures_of(np.concatenate([first, second]), [4, 2], k=2, vote=0.7).keep[a] == [[0], [0]]


@pytest.mark.parametrize("bad", [{"k": 1}, {"k": 17}, {"vote": 0.0}, {"vote": 1.5}])
def test_signature_settings_out_of_range_are_refused_in_one_line(bad):
    args = {"k": 2, "vote": 0.5, **bad}
    with pytest.raises(EdgeshiftError) as info:
        signatures_of(np.ones((8, 3), bool), [3], int(args["k"]), float(args["vote"]))
    assert "\n" not in str(info.value)


def test_a_signature_network_is_the_backbone_under_its_masks_with_only_the_kept_filters():
    model, x = _chain(), torch.randn(16, 3, 8, 8)
    gated = GatedNetwork(model, x[:2], 0.8)
    keep = [[1, 4, 5], [0, 2]]
    net, report = signature_network(model, x[:2], gated.blocks, keep)
    with torch.no_grad():
        got, want = net(x), _masked_chain(model, keep, x)
    assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max())
    assert report.max_abs_diff <= 1e-5 * float(want.abs().max())  # the prune's own measure says so too
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [3, 2]  # the rest pruned away, not merely zero
    assert [b.weight.abs().sum() > 0 for b in (model.b1, model.b2)] == [True, True]  # the backbone untouched


def test_signatures_on_a_residual_network_stay_exact():
    model = make("resnet20", {}, 16)
    x = torch.randn(8, 3, 16, 16)
    gated = GatedNetwork(model, x[:2], 0.8)
    g = torch.Generator().manual_seed(1)
    keep = [sorted(torch.randperm(b.out_channels, generator=g)[: b.out_channels // 2].tolist()) for b in gated.blocks]
    net, _ = signature_network(model, x[:2], gated.blocks, keep)
    masks = [torch.zeros(b.out_channels) for b in gated.blocks]
    for m, rows in zip(masks, keep):
        m[rows] = 1.0
    for gate, m in zip(gated.gate_list(), masks):
        gate.fixed = m.expand(len(x), -1)
    with torch.no_grad():
        want, got = gated.eval()(x), net(x)
    assert float((got - want).abs().max()) <= 1e-4 * float(want.abs().max())
    assert sum(p.numel() for p in net.parameters()) < sum(p.numel() for p in model.parameters())


def _routed(model: Chain, x: torch.Tensor, keep: list[list[list[int]]]) -> RoutedNetwork:
    """A router sending inputs to each signature by their pooled first-block features."""
    gated = GatedNetwork(model, x[:2], 0.8)
    linear = nn.Linear(8, len(keep))
    router = Router(router_prefix(model, x[:2], gated.blocks[0].conv), linear).eval()
    with torch.no_grad():  # route k: the input's feature k lies the furthest above its mean over ``x``
        mean = router.features(x).mean(0)
        linear.weight.copy_(torch.eye(len(keep), 8))
        linear.bias.copy_(-mean[: len(keep)])
    return RoutedNetwork(router, [signature_network(model, x[:2], gated.blocks, k)[0] for k in keep])


KEEP = [[[0, 1, 2], [0, 1]], [[3, 4, 5, 6], [2, 3, 4]], [[7], [5]]]


def test_the_routed_graph_runs_each_input_through_its_own_signature_on_onnx_runtime(tmp_path):
    model, x = _chain(), torch.randn(24, 3, 8, 8)
    routed = _routed(model, x, KEEP)
    with torch.no_grad():
        routes = routed.router(x).argmax(1)
        # the oracle: every input through the backbone under its own signature's masks
        want = torch.cat([_masked_chain(model, KEEP[int(r)], x[i : i + 1]) for i, r in enumerate(routes)]).numpy()
    assert len(set(routes.tolist())) == len(KEEP)  # the test means something: inputs take every signature
    report = export_routed(routed, x[:4], tmp_path / "routed.onnx")
    data = (tmp_path / "routed.onnx").read_bytes()
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    batch = session.run(None, {"input": x.numpy()})[0]
    single = np.concatenate([session.run(None, {"input": x[i : i + 1].numpy()})[0] for i in range(len(x))])
    one_route = x[routes == routes[0]][:3]  # a batch that leaves the other signatures' branches unrun
    only = session.run(None, {"input": one_route.numpy()})[0]
    scale = float(np.abs(want).max())
    assert np.abs(batch - want).max() <= 1e-5 * scale and np.abs(single - want).max() <= 1e-5 * scale
    assert np.abs(only - want[(routes == routes[0]).numpy()][:3]).max() <= 1e-5 * scale
    assert report.op_counts["If"] == len(KEEP) and "Loop" not in report.op_counts and "Scan" not in report.op_counts
    proto = onnx.load_from_string(data)
    convs = _op_counts_by_branch(proto.graph)
    assert convs == [1, *(2 for _ in KEEP)]  # the router's conv, then each signature's two, once each in its branch
    facts = check_graph(data, input_name="input", input_shape=[None, 3, 8, 8], max_nodes=500, max_initializers=500)
    assert facts.ops["If"] == len(KEEP)  # what the device side admits


def _op_counts_by_branch(graph: onnx.GraphProto) -> list[int]:
    """Conv nodes of the main graph, then of each If's then-branch."""
    counts = [sum(n.op_type == "Conv" for n in graph.node)]
    for node in graph.node:
        for a in node.attribute:
            if a.name == "then_branch":
                counts.append(sum(n.op_type == "Conv" for n in a.g.node))
    return counts


def test_the_routed_fine_tuning_moves_the_backbone_but_not_the_router_or_its_block():
    model, x = _chain(), torch.randn(32, 3, 8, 8)
    gated = GatedNetwork(model, x[:2], 0.8)
    router = Router(router_prefix(model, x[:2], gated.blocks[0].conv), nn.Linear(8, 2))
    trainer = RoutedTraining(gated, router, [[[0, 1, 2, 3], [0, 1, 2]], [[4, 5, 6, 7], [3, 4, 5]]])
    first = [*model.c1.parameters(), *model.b1.parameters()]  # what the router reads
    frozen = [p.detach().clone() for p in first]
    stats = model.b1.running_mean.clone()
    before = model.c2.weight.detach().clone()
    trainer.train()
    opt = torch.optim.SGD([p for g in trainer.parameter_groups() for p in g["params"]], lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(trainer(x), torch.randint(0, 4, (32,))).backward()
        opt.step()
    assert not torch.equal(model.c2.weight, before)
    assert all(torch.equal(p, q) for p, q in zip(first, frozen))
    assert torch.equal(model.b1.running_mean, stats) and not model.b1.training
    assert all(g.fixed is None for g in gated.gate_list())  # the masks do not outlive the forward


def _entry(**change) -> dict:
    entry = {
        "blocks": ["c1", "c2"],
        "signatures": [[[0, 1], [0]], [[2, 3], [1, 2]]],
        "router_weight": torch.zeros(2, 8),
        "router_bias": torch.zeros(2),
    }
    return {**entry, **change}


@pytest.mark.parametrize(
    "entry, says",
    [
        ("not a table", "not a table"),
        (_entry(blocks=["c9", "c2"]), "gated blocks"),
        (_entry(signatures=[[[0, 1], [0]]]), "2..16 signatures"),
        (_entry(signatures=[[[0, 1], [0]], [[3, 2], [1]]]), "ascending filter indices"),
        (_entry(signatures=[[[0, 1], [0]], [[2, 99], [1]]]), "ascending filter indices"),
        (_entry(signatures=[[[0, 1], [0]], [[2], []]]), "ascending filter indices"),
        (_entry(signatures=[[[0, 1], [0]], [[2]]]), "ascending filter indices"),
        (_entry(router_weight=torch.zeros(3, 8)), "router needs"),
        (_entry(router_bias=torch.tensor([0.0, float("nan")])), "router needs"),
        (_entry(shares=[0.5, "half"]), "shares must be 2 fractions"),
        (_entry(shares=[0.5, float("nan")]), "shares must be 2 fractions"),
        (_entry(shares=[1.0]), "shares must be 2 fractions"),
    ],
)
def test_a_malformed_routing_entry_is_refused_in_one_line(entry, says):
    with pytest.raises(EdgeshiftError) as info:
        routed_network(_chain(), entry, torch.randn(2, 3, 8, 8), "x.pt")
    message = str(info.value)
    assert message.startswith("x.pt: ") and says in message and "\n" not in message


def test_a_well_formed_routing_entry_builds_the_network_it_describes():
    model, x = _chain(), torch.randn(6, 3, 8, 8)
    routed = routed_network(model, _entry(router_bias=torch.tensor([0.0, 1.0])), x[:2], "x.pt")
    with torch.no_grad():
        assert torch.equal(routed.routes(x), torch.ones(6, dtype=torch.long))  # the bias decides: signature 1
        want = _masked_chain(model, [[2, 3], [1, 2]], x)
        assert float((routed(x) - want).abs().max()) <= 1e-5 * float(want.abs().max())
    assert cast(nn.Conv2d, routed.signatures[1].c1).out_channels == 2
