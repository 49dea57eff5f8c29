"""Grouping helpers and per-group aggregation (the GradVac paper's four granularities)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mtlopt import MultiTaskOptimizer, per_layer, per_network, per_tensor, together
from mtlopt.weighting import GradVac, IMTLG

from .conftest import Net, make_batch


def test_helpers_partition_the_parameters() -> None:
    net = Net()
    everything = {id(p) for p in net.parameters()}
    for groups in (
        together(net),
        per_network(net.encoder, net.heads, net.unused),
        per_layer(net),
        per_tensor(net),
    ):
        ids = [id(p) for g in groups for p in g["params"]]
        assert len(ids) == len(set(ids)) and set(ids) == everything
        assert all(isinstance(g["name"], str) for g in groups)
    assert len(together(net)) == 1
    assert len(per_network(net.encoder, net.heads)) == 2
    assert len(per_layer(net)) == 2 + 3 + 1  # two encoder Linears, three heads, unused
    assert len(per_tensor(net)) == len(list(net.parameters()))
    assert [g["name"] for g in per_tensor(net)][:2] == ["encoder.0.weight", "encoder.0.bias"]


def test_options_are_copied_and_frozen_parameters_skipped() -> None:
    net = Net()
    net.unused.weight.requires_grad_(False)
    groups = per_tensor(net, lr=0.5)
    assert all(g["lr"] == 0.5 for g in groups)
    assert not any(p is net.unused.weight for g in groups for p in g["params"])
    with pytest.raises(ValueError, match="weighting"):
        per_layer(net, weighting=GradVac())
    with pytest.raises(ValueError, match="modules"):
        per_network()


def imtl_g_reference(jacobian: torch.Tensor) -> torch.Tensor:
    """IMTL-G weights written plainly: a = pinv(G) sqrt(diag G), normalised to sum 1."""
    gram = jacobian @ jacobian.T
    v = torch.linalg.pinv(gram, hermitian=True) @ gram.diagonal().sqrt()
    return v / v.sum()


@pytest.mark.parametrize("grouping", ["together", "per_tensor"])
def test_each_group_aggregates_its_own_gradients(grouping: str) -> None:
    torch.manual_seed(0)
    net = Net().double()
    x, y = make_batch(0)
    x, y = x.double(), y.double()
    groups = together(net) if grouping == "together" else per_tensor(net)
    opt = MultiTaskOptimizer(torch.optim.SGD(groups, lr=0.1), weighting=IMTLG())
    opt.backward(net.losses(x, y))

    losses = net.losses(x, y)
    shared = list(net.encoder.parameters())
    per_task = [torch.autograd.grad(loss, shared, retain_graph=True) for loss in losses]
    if grouping == "together":
        flat = torch.stack([torch.cat([g.flatten() for g in grads]) for grads in per_task])
        expected_flat = imtl_g_reference(flat) @ flat
        got = torch.cat([p.grad.flatten() for p in shared])
        assert torch.allclose(got, expected_flat, rtol=1e-8, atol=1e-10)
    else:
        for index, param in enumerate(shared):
            jac = torch.stack([grads[index].flatten() for grads in per_task])
            expected = (imtl_g_reference(jac) @ jac).reshape(param.shape)
            assert torch.allclose(param.grad, expected, rtol=1e-8, atol=1e-10)
    # Task heads got their own task's gradient in either case.
    for task, head in enumerate(net.heads):
        expected = torch.autograd.grad(losses[task], list(head.parameters()), retain_graph=True)
        for param, grad in zip(head.parameters(), expected):
            assert torch.allclose(param.grad, grad)


def test_groups_keep_separate_gradvac_state() -> None:
    torch.manual_seed(0)
    net = Net()
    opt = MultiTaskOptimizer(torch.optim.SGD(per_layer(net), lr=0.1), weighting=GradVac(beta=0.5))
    opt.step(net.losses(*make_batch(0)))
    tables = [g["weighting"].phi_hat for g in opt.param_groups]
    encoder_tables = [t for t in tables[:2]]
    assert all(t is not None for t in encoder_tables)
    assert not torch.equal(encoder_tables[0], encoder_tables[1])
    # Heads are reached by one loss each: their groups never call the weighting.
    assert all(t is None for t in tables[2:])


def test_per_network_two_encoders() -> None:
    class TwoTower(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)
            self.heads = nn.ModuleList(nn.Linear(4, 1) for _ in range(2))

    torch.manual_seed(0)
    m = TwoTower()
    opt = MultiTaskOptimizer(torch.optim.SGD(per_network(m.a, m.b, m.heads), lr=0.1), weighting=GradVac())
    x = torch.randn(8, 4)
    z = m.b(torch.relu(m.a(x)))
    opt.step([h(z).pow(2).mean() for h in m.heads])
    assert all(p.grad is not None for p in m.parameters())
