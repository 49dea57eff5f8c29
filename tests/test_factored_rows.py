"""Representation mode with the heads' factors (mtlopt.factored_rows) against explicit
per-task autograd loops and against the materialised rows."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mtlopt import MultiTaskOptimizer, factored_rows
from mtlopt import features_single_pass as single_pass_module
from mtlopt.reachability import GraphMasks
from mtlopt.solvers import host_linalg
from mtlopt.task_cut import find_cut
from mtlopt.weighting import MGDA, UPGrad

N_TASKS = 3


@pytest.fixture(autouse=True)
def factors_at_any_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """These models are small: let the factors serve them anyway."""
    monkeypatch.setattr(factored_rows, "MIN_ROWS_ELEMENTS", 0)


class Heads(nn.Module):
    """An encoder and one head per task, in the ways a head can read z."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.encoder = nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh())
        width = 3 if kind == "wide" else 1
        bias = kind != "no-bias"
        self.heads = nn.ModuleList(nn.Linear(32, width, bias=bias) for _ in range(N_TASKS))
        self.second = nn.Linear(32, 2)  # task 1's second reading of z ("twice")
        self.inner = nn.Linear(32, 32)  # a head layer after a non-product op ("mixed")

    def task_outputs(self, z: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for task, head in enumerate(self.heads):
            if self.kind == "alpha":  # torch.addmm with a scale: r = alpha G A^T
                out = torch.addmm(head.bias, z, head.weight.T, alpha=2.5)
            elif self.kind == "mixed" and task == 2:
                out = head(torch.tanh(self.inner(z)) * z)  # z also read elementwise
            elif self.kind == "silent" and task == 1:
                out = head(z.detach())  # this task sends z no gradient
            else:
                out = head(z)
            if self.kind == "twice" and task == 1:
                out = out + self.second(z).sum(1, keepdim=True)
            outs.append(out.sum(1))
        return outs

    def forward(self, x: torch.Tensor, y: torch.Tensor):
        z = self.encoder(x)
        losses = [((out - y[:, t]) ** 2).mean() for t, out in enumerate(self.task_outputs(z))]
        return z, losses


def batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(64, 6, generator=g), torch.randn(64, N_TASKS, generator=g)


def reference_gramian(losses: list[torch.Tensor], z: torch.Tensor) -> torch.Tensor:
    """Each task's gradient of z by its own autograd call, the Gramian in float64."""
    rows = []
    for loss in losses:
        (grad,) = torch.autograd.grad(loss, z, retain_graph=True, allow_unused=True)
        rows.append(torch.zeros_like(z) if grad is None else grad)
    flat = torch.stack(rows).reshape(len(rows), -1).double()
    return flat @ flat.T


KINDS = ["linear", "no-bias", "wide", "alpha", "twice", "silent"]


@pytest.mark.parametrize("kind", KINDS)
def test_the_factored_gramian_and_direction_match_explicit_rows(kind: str, monkeypatch) -> None:
    torch.manual_seed(3)
    net = Heads(kind)
    served = []
    build = factored_rows.FactoredRows.for_cut
    monkeypatch.setattr(
        factored_rows.FactoredRows,
        "for_cut",
        classmethod(lambda cls, *a: served.append(build(*a)) or served[-1]),
    )
    opt = MultiTaskOptimizer(torch.optim.SGD(net.parameters(), lr=0.0), weighting=UPGrad())
    z, losses = net(*batch(1))
    gram = reference_gramian(losses, z)
    weights = UPGrad().weights_from_gramian(gram, torch.ones(N_TASKS, dtype=torch.float64))
    rows = [
        torch.autograd.grad(loss, z, retain_graph=True, allow_unused=True)[0] for loss in losses
    ]
    d_z = sum(w.float() * r for w, r in zip(weights, rows) if r is not None)
    encoder = list(net.encoder.parameters())
    expected = torch.autograd.grad(z, encoder, d_z, retain_graph=True)
    opt.step(losses, features=z)
    assert isinstance(served[0], factored_rows.FactoredRows)  # the factors served this step
    # The reference multiplies float32 rows (round-off ~1e-7 of each entry); the factors'
    # Gramian is formed in float64.
    torch.testing.assert_close(opt.last_step[0].gramian, gram, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(opt.last_step[0].weights, weights, rtol=1e-5, atol=1e-8)
    for p, g in zip(encoder, expected):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind", KINDS)
def test_factors_and_materialised_rows_write_the_same_step(kind: str, monkeypatch) -> None:
    grads = []
    for enabled in (True, False):
        monkeypatch.setattr(factored_rows, "ENABLED", enabled)
        torch.manual_seed(4)
        net = Heads(kind)
        opt = MultiTaskOptimizer(torch.optim.SGD(net.parameters(), lr=0.0), weighting=MGDA())
        z, losses = net(*batch(2))
        opt.step(losses, features=z)
        grads.append(([p.grad for p in net.parameters()], opt.last_step[0].weights))
    (with_factors, w1), (with_rows, w2) = grads
    torch.testing.assert_close(w1, w2, rtol=1e-6, atol=1e-9)
    for a, b in zip(with_factors, with_rows):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_a_head_that_reads_z_otherwise_keeps_the_materialised_rows(monkeypatch) -> None:
    """Task 2's head multiplies z elementwise: its node is not a product, so the step
    materialises z's rows, and still matches the explicit loops."""
    served = []
    original = single_pass_module.MaterialisedRows
    monkeypatch.setattr(
        single_pass_module,
        "MaterialisedRows",
        lambda *a: served.append("rows") or original(*a),
    )
    torch.manual_seed(5)
    net = Heads("mixed")
    opt = MultiTaskOptimizer(torch.optim.SGD(net.parameters(), lr=0.0), weighting=UPGrad())
    z, losses = net(*batch(3))
    gram = reference_gramian(losses, z)
    opt.step(losses, features=z)
    assert served == ["rows"]
    torch.testing.assert_close(opt.last_step[0].gramian, gram, rtol=1e-5, atol=1e-9)


def factors_for(z: torch.Tensor, heads: list[nn.Module]) -> factored_rows.FactoredRows | None:
    losses = [head(z).square().mean() for head in heads]
    cut = find_cut(GraphMasks([loss.grad_fn for loss in losses], stop=z.grad_fn))
    assert cut is not None
    return factored_rows.FactoredRows.for_cut(cut, z, len(heads))


def test_heads_with_many_outputs_keep_the_materialised_rows() -> None:
    """K^2 (B + d) + K B d above (m^2 + 2 m) B d: the factors would cost more than the rows."""
    z = torch.randn(4, 8, requires_grad=True) * 1.0
    assert factors_for(z, [nn.Linear(8, 64) for _ in range(2)]) is None
    served = factors_for(z, [nn.Linear(8, 1) for _ in range(2)])
    assert isinstance(served, factored_rows.FactoredRows)


def test_a_three_dimensional_representation_keeps_the_materialised_rows() -> None:
    z = torch.randn(2, 4, 8, requires_grad=True) * 1.0
    assert factors_for(z, [nn.Linear(8, 1) for _ in range(2)]) is None


def test_small_rows_keep_the_materialised_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """Below MIN_ROWS_ELEMENTS entries (m B d) copying the rows is the cheaper side."""
    monkeypatch.setattr(factored_rows, "MIN_ROWS_ELEMENTS", 2 * 4 * 8 + 1)
    z = torch.randn(4, 8, requires_grad=True) * 1.0
    assert factors_for(z, [nn.Linear(8, 1) for _ in range(2)]) is None
    monkeypatch.setattr(factored_rows, "MIN_ROWS_ELEMENTS", 2 * 4 * 8)
    assert factors_for(z, [nn.Linear(8, 1) for _ in range(2)]) is not None


@pytest.mark.parametrize("enabled", [True, False], ids=["factors", "materialised"])
@pytest.mark.parametrize("host_reads", [True, False], ids=["cpu-reads", "device-code"])
def test_an_optimizer_of_the_heads_alone_weighs_the_true_gramian(
    enabled: bool, host_reads: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing below z is differentiated (the encoder is not in the optimizer): the
    weighting still sees the heads' gradients of z, and no graph (a Gramian that required
    grad broke GradVac's state copy on its second step)."""
    monkeypatch.setattr(factored_rows, "ENABLED", enabled)
    monkeypatch.setattr(host_linalg, "HOST_READS", host_reads)
    torch.manual_seed(6)
    net = Heads("linear")
    opt = MultiTaskOptimizer(torch.optim.SGD(net.heads.parameters(), lr=0.1), weighting="gradvac")
    for seed in range(2):
        z, losses = net(*batch(seed))
        gram = reference_gramian(losses, z)
        opt.step(losses, features=z)
        opt.zero_grad()
        result = opt.last_step[0]
        assert not result.gramian.requires_grad and not result.weights.requires_grad
        torch.testing.assert_close(result.gramian, gram, rtol=1e-5, atol=1e-9)


class ZeroesItsGradient(torch.autograd.Function):
    """The identity, whose backward overwrites its incoming gradient in place."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.mul_(0.0)


def test_a_head_gradient_changed_in_place_later_does_not_reach_the_gramian() -> None:
    """addmm(C, z, W^T) with a full-shape C hands its output's gradient G itself to C's
    branch, where a backward may change it in place: the Gramian uses G as it was."""
    torch.manual_seed(7)
    net = Heads("linear")
    shift = nn.Parameter(torch.zeros(64, 1))
    opt = MultiTaskOptimizer(
        torch.optim.SGD([*net.parameters(), shift], lr=0.0), weighting=UPGrad()
    )
    x, y = batch(4)
    z = net.encoder(x)
    outs = [head(z) for head in net.heads]
    outs[1] = torch.addmm(ZeroesItsGradient.apply(shift), z, net.heads[1].weight.T)
    losses = [((out.sum(1) - y[:, t]) ** 2).mean() for t, out in enumerate(outs)]
    gram = reference_gramian(losses, z)
    opt.step(losses, features=z)
    torch.testing.assert_close(opt.last_step[0].gramian, gram, rtol=1e-5, atol=1e-9)


def test_a_float64_model_gets_float64_accuracy() -> None:
    torch.manual_seed(8)
    net = Heads("wide").double()
    opt = MultiTaskOptimizer(torch.optim.SGD(net.parameters(), lr=0.0), weighting=MGDA())
    x, y = batch(5)
    z, losses = net(x.double(), y.double())
    gram = reference_gramian(losses, z)
    opt.step(losses, features=z)
    torch.testing.assert_close(opt.last_step[0].gramian, gram, rtol=1e-12, atol=1e-15)


def test_a_complex_representation_keeps_the_materialised_rows() -> None:
    z = torch.randn(4, 8, dtype=torch.complex64, requires_grad=True) * 1.0
    heads = [nn.Linear(8, 1, dtype=torch.complex64) for _ in range(2)]
    assert factors_for(z, heads) is None


def test_the_kept_rows_buffer_is_released_while_the_factors_serve() -> None:
    torch.manual_seed(9)
    net = Heads("mixed")  # task 2 reads z elementwise: the rows are materialised
    opt = MultiTaskOptimizer(torch.optim.SGD(net.parameters(), lr=0.0), weighting=MGDA())
    z, losses = net(*batch(6))
    opt.step(losses, features=z)
    assert opt._rows_workspace._buffer is not None
    net.kind = "linear"
    z, losses = net(*batch(7))
    opt.step(losses, features=z)
    assert opt._rows_workspace._buffer is None
