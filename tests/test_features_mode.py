"""Representation mode: step(losses, features=z) against explicit autograd loops."""

from __future__ import annotations

import pytest
import torch

from mtlopt import MultiTaskOptimizer
from mtlopt.weighting import IMTLG, ExcessMTL, Mean

from .conftest import Net, assert_same, make_batch, snapshot


def forward(net: Net, seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    x, y = make_batch(seed)
    z = net.encoder(x)
    return z, [((h(z).squeeze(-1) - y[:, t]) ** 2).mean() for t, h in enumerate(net.heads)]


def test_encoder_gets_the_weighted_representation_gradient_backpropagated() -> None:
    torch.manual_seed(0)
    net = Net()
    opt = MultiTaskOptimizer(torch.optim.SGD(net.parameters(), lr=0.0), weighting=IMTLG())
    z, losses = forward(net, 0)
    rows = [torch.autograd.grad(loss, z, retain_graph=True)[0] for loss in losses]
    jz = torch.stack([r.reshape(-1) for r in rows]).double()
    expected_weights = IMTLG().weights_from_gramian(jz @ jz.T, torch.ones(3, dtype=torch.float64))
    d_z = sum(w * r for w, r in zip(expected_weights.float(), rows))
    enc = list(net.encoder.parameters())
    expected_enc = torch.autograd.grad(z, enc, d_z, retain_graph=True)
    expected_heads = [torch.autograd.grad(loss, list(h.parameters()), retain_graph=True) for loss, h in zip(losses, net.heads)]
    opt.step(losses, features=z)
    torch.testing.assert_close(opt.last_step[0].weights, expected_weights)
    for p, g in zip(enc, expected_enc):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)
    for head, grads in zip(net.heads, expected_heads):
        for p, g in zip(head.parameters(), grads):
            torch.testing.assert_close(p.grad, g)
    assert all(p.grad is None for p in net.unused.parameters())


def test_loss_only_weighting_matches_plain_backward() -> None:
    torch.manual_seed(0)
    net = Net()
    opt = MultiTaskOptimizer(torch.optim.SGD(net.parameters(), lr=0.0), weighting=Mean())
    z, losses = forward(net, 1)
    expected = torch.autograd.grad(sum(losses) / 3, list(net.parameters())[:-2], retain_graph=True)
    opt.step(losses, features=z)
    for p, g in zip(list(net.parameters())[:-2], expected):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)


def test_jacobian_weighting_is_refused_cleanly() -> None:
    torch.manual_seed(0)
    net = Net()
    opt = MultiTaskOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), weighting=ExcessMTL())
    z, losses = forward(net, 0)
    before = snapshot(net, opt)
    with pytest.raises(ValueError, match="features: ExcessMTL.*Gramian or the losses"):
        opt.step(losses, features=z)
    assert_same(snapshot(net, opt), before)


@pytest.mark.parametrize("bad", ["z", "leaf"])
def test_bad_features_refused(bad: str) -> None:
    torch.manual_seed(0)
    net = Net()
    opt = MultiTaskOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), weighting=IMTLG())
    z, losses = forward(net, 0)
    features = "z" if bad == "z" else torch.zeros(3, requires_grad=True)
    with pytest.raises((TypeError, ValueError), match="features"):
        opt.step(losses, features=features)
