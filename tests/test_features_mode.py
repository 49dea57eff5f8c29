"""Representation mode: step(losses, features=z) against explicit autograd loops."""

from __future__ import annotations

import pytest
import torch

from mtlopt import MultiTaskOptimizer, factored_rows, host_solve
from mtlopt import features as features_module
from mtlopt.features_single_pass import single_pass as one_pass
from mtlopt.solvers import host_linalg
from mtlopt.weighting import IMTL, IMTLG, ExcessMTL, GradVac, Mean, UPGrad

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
    expected_heads = [
        torch.autograd.grad(loss, list(h.parameters()), retain_graph=True)
        for loss, h in zip(losses, net.heads)
    ]
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


# --------------------------------------------------------------------------- brute force
def per_task_grads(losses: list[torch.Tensor], tensors: list[torch.Tensor]) -> list[list]:
    """One autograd.grad per loss: row t holds task t's gradient of each tensor (or None)."""
    return [
        list(torch.autograd.grad(loss, tensors, retain_graph=True, allow_unused=True))
        for loss in losses
    ]


def z_gramian(losses: list[torch.Tensor], z: torch.Tensor) -> torch.Tensor:
    rows = torch.stack([g[0].reshape(-1) for g in per_task_grads(losses, [z])]).double()
    return rows @ rows.T


def combined(grads: list[list], weights: torch.Tensor, k: int) -> torch.Tensor | None:
    present = [(w, row[k]) for w, row in zip(weights.tolist(), grads) if row[k] is not None]
    return sum(w * g for w, g in present) if present else None


def assert_written(opt, net, expected, heads, scales) -> None:  # noqa: ANN001
    """Each (group, weights, params, grads) of ``expected`` and the heads' scaled grads."""
    for index, weights, params, grads in expected:
        torch.testing.assert_close(opt.last_step[index].weights, weights)
        for p, g in zip(params, grads):
            torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)
    for t, (head, grads) in enumerate(zip(net.heads, heads)):
        for p, g in zip(head.parameters(), grads):
            torch.testing.assert_close(p.grad, g * scales[t].float(), rtol=1e-5, atol=1e-7)


def assert_refused(opt, net, losses, z) -> None:  # noqa: ANN001
    """A parameter reaches the losses around z too: ValueError, and nothing moved."""
    before = snapshot(net, opt)
    with pytest.raises(ValueError, match="features: .*both through the representation and around"):
        opt.step(losses, features=z)
    assert_same(snapshot(net, opt), before)


class PostNet(torch.nn.Module):
    """Encoder -> z -> a shared layer above z -> heads; ``skip`` adds a path around z."""

    def __init__(self, skip: str = "") -> None:
        super().__init__()
        self.encoder = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh())
        self.post = torch.nn.Linear(8, 8)
        self.heads = torch.nn.ModuleList(torch.nn.Linear(8, 1) for _ in range(3))
        self.side = torch.nn.Parameter(torch.randn(6, 8) * 0.1)  # reaches the losses around z
        self.skip = skip

    def forward(self, x: torch.Tensor, y: torch.Tensor):
        z = self.encoder(x)
        h = torch.tanh(self.post(z))
        if self.skip == "side":
            h = h + x @ self.side  # a parameter above z in the graph's sense: not below it
        elif self.skip == "encoder":
            h = h + self.encoder[0](x)  # an encoder parameter reached around z too
        return z, [
            ((head(h).squeeze(-1) - y[:, t]) ** 2).mean() for t, head in enumerate(self.heads)
        ]


@pytest.mark.parametrize("chunk_size", [None, 2])
@pytest.mark.parametrize("skip", ["", "side"])
def test_shared_layers_above_the_representation_get_their_combined_rows(
    skip: str, chunk_size: int | None
) -> None:
    torch.manual_seed(1)
    net = PostNet(skip)
    base = torch.optim.SGD(net.parameters(), lr=0.0)
    opt = MultiTaskOptimizer(base, weighting=IMTLG(), chunk_size=chunk_size)
    x, y = make_batch(3)
    z, losses = net(x, y)
    above = list(net.post.parameters()) + ([net.side] if skip else [])
    grads = per_task_grads(losses, above)
    weights = IMTLG().weights_from_gramian(z_gramian(losses, z), torch.ones(3, dtype=torch.float64))
    d_z = combined(per_task_grads(losses, [z]), weights, 0)
    encoder = list(net.encoder.parameters())
    below = torch.autograd.grad(z, encoder, d_z.float(), retain_graph=True)
    heads = [per_task_grads([loss], list(h.parameters()))[0] for loss, h in zip(losses, net.heads)]
    opt.step(losses, features=z)
    torch.testing.assert_close(opt.last_step[0].weights, weights)
    for k, p in enumerate(above):
        torch.testing.assert_close(
            p.grad, combined(grads, weights, k).float(), rtol=1e-5, atol=1e-7
        )
    for p, g in zip(encoder, below):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)
    for head, expected in zip(net.heads, heads):
        for p, g in zip(head.parameters(), expected):
            torch.testing.assert_close(p.grad, g)
    if not skip:
        assert net.side.grad is None


def test_a_parameter_reaching_the_losses_around_the_representation_too_is_refused() -> None:
    torch.manual_seed(1)
    net = PostNet("encoder")
    opt = MultiTaskOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), weighting=GradVac(seed=0))
    x, y = make_batch(3)
    opt.step(net(x, y)[1])  # GradVac has state now
    opt.zero_grad()
    z, losses = net(x, y)
    assert_refused(opt, net, losses, z)


def test_each_group_sends_its_own_direction_through_the_encoder() -> None:
    torch.manual_seed(2)
    net = Net()
    groups = [
        {"params": net.encoder[0].parameters(), "weighting": IMTLG()},
        {"params": net.encoder[2].parameters(), "weighting": UPGrad()},
        {"params": net.heads.parameters(), "weighting": IMTL(n_tasks=3)},
    ]
    with torch.no_grad():  # scales other than one, so that applying them shows
        groups[2]["weighting"].log_scales.copy_(torch.tensor([0.3, -0.5, 0.8]))
    opt = MultiTaskOptimizer(torch.optim.SGD(groups, lr=0.0))
    z, losses = forward(net, 4)
    values = torch.stack([loss.detach() for loss in losses]).double()
    gram, z_rows = z_gramian(losses, z), per_task_grads(losses, [z])
    expected = []
    for index, reference in [(0, IMTLG()), (1, UPGrad())]:
        weights = reference.weights_from_gramian(gram, values)
        params = list(opt.param_groups[index]["params"])
        d_z = combined(z_rows, weights, 0).float()
        expected.append(
            (index, weights, params, torch.autograd.grad(z, params, d_z, retain_graph=True))
        )
    # The heads' group: IMTL's loss scales (its IMTL-L part) multiply each head's gradient.
    scales = groups[2]["weighting"].loss_weights(values)
    heads = [per_task_grads([loss], list(h.parameters()))[0] for loss, h in zip(losses, net.heads)]
    opt.step(losses, features=z)
    assert_written(opt, net, expected, heads, scales)


def stateful_gradvac(seed: int) -> tuple[Net, MultiTaskOptimizer]:
    """A net and a GradVac optimizer that has taken one step (so its state is not empty)."""
    torch.manual_seed(seed)
    net = Net()
    opt = MultiTaskOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), weighting=GradVac(seed=0))
    opt.step(forward(net, 0)[1])
    opt.zero_grad()
    return net, opt


@pytest.fixture(params=["cpu-reads", "device-code", "host-solve"])
def host_reads(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CPU's early checks; the device code's single check after the backward; or, as on
    a GPU, the weighting on a CPU copy of the Gramian."""
    monkeypatch.setattr(host_linalg, "HOST_READS", request.param == "cpu-reads")
    if request.param == "host-solve":
        monkeypatch.setattr(host_solve, "off_host", lambda tensor: True)


@pytest.fixture(params=["one-pass", "two-passes"])
def passes(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    if request.param == "two-passes":
        monkeypatch.setattr(features_module, "single_pass_applies", lambda *a: False)


@pytest.fixture(params=["factors", "materialised"])
def z_rows(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """z's rows from the heads' factors (at any size), or materialised."""
    monkeypatch.setattr(factored_rows, "ENABLED", request.param == "factors")
    monkeypatch.setattr(factored_rows, "MIN_ROWS_ELEMENTS", 0)


@pytest.mark.usefixtures("host_reads", "passes", "z_rows")
def test_a_non_finite_gradient_below_the_representation_changes_nothing() -> None:
    net, opt = stateful_gradvac(3)
    before = snapshot(net, opt)
    x, y = make_batch(5)
    h = net.encoder[0](x)
    z = net.encoder[1](torch.sqrt(h - h.detach()) + h)  # sqrt(0): an infinite derivative
    losses = [((head(z).squeeze(-1) - y[:, t]) ** 2).mean() for t, head in enumerate(net.heads)]
    with pytest.raises(FloatingPointError, match="below the representation"):
        opt.step(losses, features=z)
    assert_same(snapshot(net, opt), before)


def test_one_pass_serves_heads_on_z_with_loss_scales_in_another_group(monkeypatch) -> None:
    """Heads read z, the encoder's group is the only one below it: one backward pass
    serves the step, with the heads' group scaling its gradients by IMTL's scales."""
    torch.manual_seed(4)
    net = Net()
    imtl = IMTL(n_tasks=3)
    with torch.no_grad():
        imtl.log_scales.copy_(torch.tensor([0.2, -0.4, 0.6]))
    groups = [
        {"params": net.encoder.parameters(), "weighting": UPGrad()},
        {"params": net.heads.parameters(), "weighting": imtl},
    ]
    opt = MultiTaskOptimizer(torch.optim.SGD(groups, lr=0.0))
    z, losses = forward(net, 6)
    values = torch.stack([loss.detach() for loss in losses]).double()
    weights = UPGrad().weights_from_gramian(z_gramian(losses, z), values)
    d_z = combined(per_task_grads(losses, [z]), weights, 0).float()
    encoder = list(net.encoder.parameters())
    expected = torch.autograd.grad(z, encoder, d_z, retain_graph=True)
    scales = imtl.loss_weights(values)
    heads = [per_task_grads([loss], list(h.parameters()))[0] for loss, h in zip(losses, net.heads)]
    runs = []
    monkeypatch.setattr(features_module, "single_pass", lambda *a: runs.append(1) or one_pass(*a))
    opt.step(losses, features=z)
    assert runs == [1]
    assert_written(opt, net, [(0, weights, encoder, expected)], heads, scales)


def test_a_head_weight_tied_below_the_representation_is_refused() -> None:
    torch.manual_seed(5)
    net = Net()
    opt = MultiTaskOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), weighting=IMTLG())
    x, y = make_batch(7)
    z = net.encoder(x + net.heads[0].bias)  # head 0's bias also feeds the encoder
    losses = [((h(z).squeeze(-1) - y[:, t]) ** 2).mean() for t, h in enumerate(net.heads)]
    assert_refused(opt, net, losses, z)


@pytest.mark.usefixtures("host_reads", "passes")
def test_non_finite_representation_gradients_change_nothing() -> None:
    net, opt = stateful_gradvac(6)
    before = snapshot(net, opt)
    x, y = make_batch(8)
    z = net.encoder(x)
    outs = [h(z).squeeze(-1) for h in net.heads]
    outs[2] = outs[2] + torch.sqrt(z - z.detach()).sum(1)  # an infinite derivative at z
    losses = [((o - y[:, t]) ** 2).mean() for t, o in enumerate(outs)]
    with pytest.raises(FloatingPointError, match="representation are not finite"):
        opt.step(losses, features=z)
    assert_same(snapshot(net, opt), before)


@pytest.mark.usefixtures("host_reads", "z_rows")
def test_a_non_finite_head_output_gradient_changes_nothing() -> None:
    """Task 1's loss has an infinite derivative at its head's output: the factors' Gramian
    (or the rows') is not finite, and nothing moves."""
    net, opt = stateful_gradvac(11)
    before = snapshot(net, opt)
    x, y = make_batch(12)
    z = net.encoder(x)
    outs = [h(z).squeeze(-1) for h in net.heads]
    losses = [((o - y[:, t]) ** 2).mean() for t, o in enumerate(outs)]
    losses[1] = losses[1] + torch.sqrt((outs[1] - outs[1].detach()).abs()).sum()
    with pytest.raises(FloatingPointError, match="not finite"):
        opt.step(losses, features=z)
    assert_same(snapshot(net, opt), before)


@pytest.mark.parametrize("factors", [True, False])
@pytest.mark.parametrize("method", ["imtlg", "upgrad", "mgda", "cagrad", "nashmtl", "imtl"])
def test_one_pass_and_two_passes_agree(method: str, factors: bool, monkeypatch) -> None:
    """The one-pass path against the general one (itself checked against autograd loops).
    With z's rows materialised both paths run the same float32 operations; with the heads'
    factors (:mod:`mtlopt.factored_rows`) d_z is one product of other float32 terms."""
    monkeypatch.setattr(factored_rows, "ENABLED", factors)
    monkeypatch.setattr(factored_rows, "MIN_ROWS_ELEMENTS", 0)  # a small model
    rtol, atol = (1e-5, 1e-7) if factors else (1e-6, 1e-8)
    grads = []
    for one in (True, False):
        if not one:
            monkeypatch.setattr(features_module, "single_pass_applies", lambda *a: False)
        torch.manual_seed(7)
        net = Net()
        opt = MultiTaskOptimizer(torch.optim.SGD(net.parameters(), lr=0.0), weighting=method)
        z, losses = forward(net, 9)
        opt.step(losses, features=z)
        grads.append(([p.grad for p in net.parameters()], opt.last_step[0].weights))
    (one_pass_grads, w1), (two_pass_grads, w2) = grads
    torch.testing.assert_close(w1, w2)
    for a, b in zip(one_pass_grads, two_pass_grads):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


@pytest.mark.parametrize("one_pass", [True, False])
def test_stepping_twice_on_one_graph_is_refused_and_changes_nothing(
    one_pass: bool, monkeypatch
) -> None:
    """The one-pass path frees the graph (the clear error); the two-pass path keeps the
    heads' part, whose weights the first step changed in place (autograd's error)."""
    if not one_pass:
        monkeypatch.setattr(features_module, "single_pass_applies", lambda *a: False)
    net, opt = stateful_gradvac(7)
    z, losses = forward(net, 10)
    opt.step(losses, features=z)
    opt.zero_grad()
    before = snapshot(net, opt)
    message = "already freed" if one_pass else "modified by an inplace operation"
    with pytest.raises(RuntimeError, match=message):
        opt.step(losses, features=z)
    assert_same(snapshot(net, opt), before)


@pytest.mark.parametrize("method", ["mgda", "upgrad", "imtlg"])
def test_a_single_task_steps_like_its_plain_gradient(method: str) -> None:
    """m = 1: every method's weight is 1, so the step writes the loss's own gradient (the
    representation's gradient then comes without a task dimension from the engine)."""
    torch.manual_seed(8)
    encoder, head = torch.nn.Linear(6, 8), torch.nn.Linear(8, 1)
    params = [*encoder.parameters(), *head.parameters()]
    x = torch.randn(16, 6)
    expected = torch.autograd.grad((head(encoder(x)) ** 2).mean(), params)
    opt = MultiTaskOptimizer(torch.optim.SGD(params, lr=0.0), weighting=method)
    z = encoder(x)
    opt.step([(head(z) ** 2).mean()], features=z)
    for p, g in zip(params, expected):
        torch.testing.assert_close(p.grad, g, rtol=1e-6, atol=1e-8)


def test_the_kept_rows_buffer_never_leaks_a_previous_step(monkeypatch) -> None:
    """On the CPU the one-pass path writes z's rows into a buffer the optimizer keeps from
    step to step (reallocated when the shape changes): each step must equal the same step
    taken by a fresh optimizer, including one where a task's head no longer reads z (its
    row must be zeros, not the last step's). (Materialised rows: the heads' factors, which
    need no buffer, are off.)"""
    monkeypatch.setattr(factored_rows, "ENABLED", False)
    torch.manual_seed(9)
    net = Net()
    opt = MultiTaskOptimizer(torch.optim.SGD(net.parameters(), lr=0.0), weighting="mgda")
    buffers = []
    for seed, rows, detached in [(0, 16, False), (1, 16, False), (2, 8, False), (3, 16, True)]:
        x, y = make_batch(seed)
        x, y = x[:rows], y[:rows]

        def losses_and_z(x=x, y=y, detached=detached) -> tuple[torch.Tensor, list[torch.Tensor]]:
            z = net.encoder(x)
            inputs = [z.detach() if detached and t == 1 else z for t in range(len(net.heads))]
            losses = [
                ((h(inp).squeeze(-1) - y[:, t]) ** 2).mean()
                for t, (h, inp) in enumerate(zip(net.heads, inputs))
            ]
            return z, losses

        fresh = MultiTaskOptimizer(torch.optim.SGD(net.parameters(), lr=0.0), weighting="mgda")
        fresh.zero_grad()
        z, losses = losses_and_z()
        fresh.step(losses, features=z)
        expected = [None if p.grad is None else p.grad.clone() for p in net.parameters()]
        expected_weights = fresh.last_step[0].weights
        opt.zero_grad()
        z, losses = losses_and_z()
        opt.step(losses, features=z)
        buffers.append(opt._rows_workspace._buffer)
        torch.testing.assert_close(opt.last_step[0].weights, expected_weights, rtol=0, atol=0)
        for p, g in zip(net.parameters(), expected):
            if g is None:
                assert p.grad is None
            else:
                torch.testing.assert_close(p.grad, g, rtol=0, atol=0)
    assert buffers[0] is buffers[1]  # kept while the shape stays
    assert buffers[2].shape[1] == 8 and buffers[3].shape[1] == 16


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_a_weight_two_heads_share_as_a_non_leaf_still_weighs_z_rows(chunk_size) -> None:
    """Two tasks read z through one non-leaf weight (W = 2 P): the cut has two targets, z
    and W, and z's rows come from the batched backward seeded at both. Autograd reads z's
    gradient before z's node's pre-hooks run, so z's rows must go in as seeds, not be
    swapped in by a hook (they were read as zeros: a zero Gramian, no encoder gradient)."""
    torch.manual_seed(10)
    encoder = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh())
    shared_weight = torch.nn.Parameter(torch.randn(16, 3) * 0.1)
    head = torch.nn.Linear(16, 3)
    params = [*encoder.parameters(), shared_weight, *head.parameters()]
    opt = MultiTaskOptimizer(
        torch.optim.SGD(params, lr=0.0), weighting=UPGrad(), chunk_size=chunk_size
    )
    x, y = torch.randn(32, 5), torch.randn(32, 3)
    z = encoder(x)
    tied = shared_weight * 2
    outs = [z @ tied, (z @ tied).pow(2), head(z)]
    losses = [((o.sum(1) - y[:, t]) ** 2).mean() for t, o in enumerate(outs)]
    rows = per_task_grads(losses, [z])
    gram = z_gramian(losses, z)
    weights = UPGrad().weights_from_gramian(gram, torch.ones(3, dtype=torch.float64))
    d_z = combined(rows, weights, 0).float()
    expected = torch.autograd.grad(z, list(encoder.parameters()), d_z, retain_graph=True)
    opt.step(losses, features=z)
    torch.testing.assert_close(opt.last_step[0].gramian, gram, rtol=1e-5, atol=1e-9)
    for p, g in zip(encoder.parameters(), expected):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)
