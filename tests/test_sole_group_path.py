"""The usual loss-only step's short path (``loss_only.sole_group_backward``): taken for one
param group and a list of 0-d losses, it writes what the general path writes, and anything
else (other layouts, bad input) goes to the general path, which names the problem."""

from __future__ import annotations

import io

import pytest
import torch

from mtlopt import MultiTaskOptimizer, NonFiniteError
from mtlopt import loss_only as loss_only_module
from mtlopt.solvers import host_linalg
from mtlopt.weighting import DWA, IMTLL, UW, Constant, Mean
from mtlopt.weighting.base import Weighting

from .conftest import Net
from .device_reads import DeviceReads
from .references import batch64 as make_batch

WEIGHTS = (0.5, 2.0, 0.25)
FACTORIES = {
    "Mean": Mean,
    "Constant": lambda: Constant(WEIGHTS),
    "UW": UW,
    "IMTLL": IMTLL,
    "DWA": DWA,
}


@pytest.fixture
def short_path(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Per call of the short path: whether it served the step (False: it handed over)."""
    served: list[bool] = []
    short = loss_only_module.sole_group_backward

    def recording(*args, **kwargs):
        done = short(*args, **kwargs)
        served.append(done is not None)
        return done

    monkeypatch.setattr(loss_only_module, "sole_group_backward", recording)
    return served


def net_and_optimizer(weighting, groups: bool = False, **options) -> tuple[Net, MultiTaskOptimizer]:
    torch.manual_seed(0)
    net = Net().double()
    if groups:
        params = [{"params": net.encoder.parameters()}, {"params": net.heads.parameters()}]
    else:
        params = [*net.encoder.parameters(), *net.heads.parameters()]
    return net, MultiTaskOptimizer(torch.optim.SGD(params, lr=0.05), weighting=weighting, **options)


def reference_grads(net: Net, seed: int) -> list[torch.Tensor]:
    """The gradients of ``sum_i c_i L_i`` by plain autograd."""
    losses = net.losses(*make_batch(seed))
    total = sum(c * loss for c, loss in zip(WEIGHTS, losses))
    return list(torch.autograd.grad(total, [*net.encoder.parameters(), *net.heads.parameters()]))


def trained(name: str, force_general: bool) -> bytes:
    """Three steps of ``name``; the parameters, gradients and optimizer state, serialised."""
    net, opt = net_and_optimizer(FACTORIES[name]())
    with pytest.MonkeyPatch.context() as patch:
        if force_general:
            patch.setattr(MultiTaskOptimizer, "_sole_group_backward", lambda *a: None)
        for seed in range(3):
            opt.zero_grad()
            opt.step(net.losses(*make_batch(seed)))
    buffer = io.BytesIO()
    grads = [p.grad for p in net.parameters()]
    torch.save({"net": net.state_dict(), "grads": grads, "opt": opt.state_dict()}, buffer)
    return buffer.getvalue()


def test_short_path_writes_the_weighted_sum(short_path: list[bool]) -> None:
    net, opt = net_and_optimizer(Constant(WEIGHTS))
    want = reference_grads(net, 0)
    opt.zero_grad()
    assert opt.step(net.losses(*make_batch(0))) is None
    assert short_path == [True]
    params = [*net.encoder.parameters(), *net.heads.parameters()]
    # The step moved the parameters by lr * grad: compare the gradients left in .grad.
    for p, g in zip(params, want):
        torch.testing.assert_close(p.grad, g, rtol=1e-12, atol=1e-14)
    assert net.unused.weight.grad is None
    torch.testing.assert_close(
        opt.last_step[0].weights, torch.tensor(WEIGHTS, dtype=torch.float64), rtol=0, atol=0
    )


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_short_path_matches_the_general_path_bit_for_bit(name: str, short_path: list[bool]) -> None:
    general = trained(name, force_general=True)
    assert short_path == []
    short = trained(name, force_general=False)
    assert short_path == [True] * 3
    assert short == general


@pytest.mark.parametrize(
    "layout",
    ["tensor", "one-element 1-D", "two groups", "grad present", "autocast", "tuple"],
)
def test_other_layouts_take_the_general_path(layout: str, short_path: list[bool]) -> None:
    net, opt = net_and_optimizer(Constant(WEIGHTS), groups=layout == "two groups")
    want = reference_grads(net, 0)
    params = [*net.encoder.parameters(), *net.heads.parameters()]
    opt.zero_grad()
    losses = net.losses(*make_batch(0))
    if layout == "tensor":
        losses = torch.stack(losses)
    elif layout == "one-element 1-D":
        losses = [loss.reshape(1) for loss in losses]
    elif layout == "tuple":
        losses = tuple(losses)
    elif layout == "grad present":
        for p in params:
            p.grad = torch.zeros_like(p)
    if layout == "autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            opt.backward(losses)
    else:
        opt.backward(losses)
    assert short_path == (
        [True] if layout == "tuple" else [False] if layout == "grad present" else []
    )
    for p, g in zip(params, want):
        torch.testing.assert_close(p.grad, g, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    ("make_losses", "error", "message"),
    [
        (lambda ls: [ls[0].float(), *ls[1:]], TypeError, "one dtype"),
        (lambda ls: [*ls[:2], 1.0], TypeError, r"losses\[2\]: expected a tensor"),
        (lambda ls: [*ls[:2], ls[2].detach()], ValueError, "has no autograd graph"),
        (lambda ls: [ls[0].long(), *ls[1:]], TypeError, "floating-point"),
        (lambda ls: [], ValueError, "at least one task loss"),
        (lambda ls: ls[:2], ValueError, "keeps state for 3 tasks"),
    ],
)
def test_bad_losses_get_the_general_paths_errors_and_move_nothing(
    make_losses, error: type[Exception], message: str
) -> None:
    net, opt = net_and_optimizer(UW())
    opt.zero_grad()
    opt.step(net.losses(*make_batch(0)))  # UW now keeps state for 3 tasks
    opt.zero_grad()
    scales = opt.weightings()[0].log_variances.detach().clone()
    values = [p.detach().clone() for p in net.parameters()]
    with pytest.raises(error, match=message):
        opt.step(make_losses(net.losses(*make_batch(1))))
    assert all(torch.equal(p, v) for p, v in zip(net.parameters(), values))
    assert all(p.grad is None for p in net.parameters())
    assert torch.equal(opt.weightings()[0].log_variances, scales)
    assert opt.weightings()[0].log_variances.grad is None


@pytest.mark.parametrize("where", ["loss", "gradient"])
def test_non_finite_values_are_skipped_with_nothing_moved(
    where: str, short_path: list[bool]
) -> None:
    net, opt = net_and_optimizer(UW(), nonfinite="skip")
    opt.zero_grad()
    opt.step(net.losses(*make_batch(0)))
    opt.zero_grad()
    values = [p.detach().clone() for p in net.parameters()]
    scales = opt.weightings()[0].log_variances.detach().clone()
    losses = net.losses(*make_batch(1))
    if where == "loss":
        losses[1] = losses[1] * float("inf")
    else:  # finite loss, infinite gradient: d sqrt(x) / dx at 0
        losses[1] = losses[1] + torch.sqrt(net.heads[1].bias.sum() * 0)
    assert opt.step(losses) is None
    assert opt.skipped_steps == 1
    assert all(torch.equal(p, v) for p, v in zip(net.parameters(), values))
    assert all(p.grad is None for p in net.parameters())
    assert torch.equal(opt.weightings()[0].log_variances, scales)
    with pytest.raises(NonFiniteError):
        net2, strict = net_and_optimizer(UW())
        strict.step([loss * float("nan") for loss in net2.losses(*make_batch(0))])


@pytest.mark.parametrize("how", ["step", "backward"])
def test_losses_are_read_once_when_the_step_hands_over(
    how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a .grad already there the short path hands over before reading the losses (on a
    GPU each read is a wait), and step() does not try it twice."""
    monkeypatch.setattr(host_linalg, "HOST_READS", False)
    net, opt = net_and_optimizer(UW())
    opt.step(net.losses(*make_batch(0)))
    opt.zero_grad(set_to_none=False)  # zero tensors, not None: the general path accumulates
    losses = net.losses(*make_batch(1))
    with DeviceReads() as counter:
        opt.step(losses) if how == "step" else opt.backward(losses)
    assert counter.sites["losses.py:check_finite_values"] == 1


class RefusingWeighting(Weighting, register=False):
    """A custom loss-only weighting whose own check raises NonFiniteError."""

    needs = "losses"

    def loss_weights(self, losses: torch.Tensor) -> torch.Tensor:
        raise NonFiniteError("RefusingWeighting: refused")


@pytest.mark.parametrize("force_general", [False, True])
def test_a_weightings_own_non_finite_error_is_not_a_skipped_step(
    force_general: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """nonfinite="skip" skips non-finite losses and gradients, not errors that a weighting
    raises itself: both paths let them through."""
    if force_general:
        monkeypatch.setattr(MultiTaskOptimizer, "_sole_group_backward", lambda *a: None)
    net, opt = net_and_optimizer(RefusingWeighting(), nonfinite="skip")
    with pytest.raises(NonFiniteError, match="refused"):
        opt.step(net.losses(*make_batch(0)))
    assert opt.skipped_steps == 0
    assert all(p.grad is None for p in net.parameters())
