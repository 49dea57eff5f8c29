"""Bad input: a clear exception, and parameters, .grad and every state left untouched."""

from __future__ import annotations

import pytest
import torch

from .conftest import WEIGHTINGS, Net, assert_same, make_batch, make_optimizer, snapshot


def warmed_up(name: str):  # noqa: ANN201
    """A net and optimizer that already stepped twice (so there is state to protect)."""
    torch.manual_seed(0)
    net = Net()
    opt = make_optimizer(net, WEIGHTINGS[name]())
    for step in range(2):
        opt.zero_grad()
        opt.step(net.losses(*make_batch(step)))
    opt.zero_grad()
    # Leave a gradient in place so that "untouched" also covers existing .grad values.
    sum(net.losses(*make_batch(5))).backward()
    return net, opt


def nonfinite_grad_losses(net: Net) -> list[torch.Tensor]:
    losses = net.losses(*make_batch(3))
    # sqrt at 0: a finite loss whose gradient is infinite.
    z = net.encoder(make_batch(3)[0])
    losses[1] = losses[1] + torch.sqrt((z - z.detach()).abs().sum())
    return losses


def freed_graph_losses(net: Net) -> list[torch.Tensor]:
    losses = net.losses(*make_batch(4))
    torch.autograd.grad(sum(losses), list(net.encoder.parameters()))  # frees the graph
    return losses


BAD_INPUTS = {
    "none": (lambda net: None, TypeError, "losses: expected a non-empty sequence"),
    "empty": (lambda net: [], ValueError, "at least one task loss"),
    "string": (lambda net: "loss", TypeError, "losses: expected"),
    "not a tensor": (lambda net: [1.0, 2.0, 3.0], TypeError, r"losses\[0\]: expected a tensor"),
    "non-scalar": (
        lambda net: [net.encoder(make_batch(0)[0]).sum(0)] + net.losses(*make_batch(0))[1:],
        ValueError,
        r"losses\[0\]: expected a one-element tensor",
    ),
    "no graph": (
        lambda net: [loss.detach() for loss in net.losses(*make_batch(0))],
        ValueError,
        r"losses\[0\]: has no autograd graph",
    ),
    "integer": (
        lambda net: [torch.tensor(1)] + net.losses(*make_batch(0))[1:],
        TypeError,
        "floating-point",
    ),
    "0-d tensor": (
        lambda net: sum(net.losses(*make_batch(0))),
        ValueError,
        "1-D tensor",
    ),
    "2-d tensor": (
        lambda net: torch.stack(net.losses(*make_batch(0))).reshape(3, 1),
        ValueError,
        "1-D tensor",
    ),
    "nan loss": (
        lambda net: [net.losses(*make_batch(0))[0] * float("nan")] + net.losses(*make_batch(0))[1:],
        FloatingPointError,
        r"task\(s\) \[0\]",
    ),
    "inf loss": (
        lambda net: net.losses(*make_batch(0))[:2] + [net.losses(*make_batch(0))[2] * float("inf")],
        FloatingPointError,
        "finite",
    ),
    "inf gradient": (nonfinite_grad_losses, FloatingPointError, "not finite"),
    "graph freed": (freed_graph_losses, RuntimeError, "graph was already freed"),
    "mixed dtypes": (
        lambda net: [net.losses(*make_batch(0))[0].double()] + net.losses(*make_batch(0))[1:],
        TypeError,
        "one dtype",
    ),
    "mixed devices": (
        lambda net: net.losses(*make_batch(0))[:2]
        + [torch.zeros((), device="meta", requires_grad=True) * 2],
        ValueError,
        "one device",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_losses_change_nothing(weighting_name: str, case: str) -> None:
    make_losses, error, message = BAD_INPUTS[case]
    net, opt = warmed_up(weighting_name)
    before = snapshot(net, opt)
    if case != "none":  # step() without losses is the second phase of backward(), not an error
        with pytest.raises(error, match=message):
            opt.step(make_losses(net))
    with pytest.raises(error, match=message):
        opt.backward(make_losses(net))
    assert_same(before, snapshot(net, opt))


@pytest.mark.parametrize("name", ["GradVac", "ExcessMTL", "ExcessMTL-warmup", "IMTL", "IMTLL"])
def test_other_number_of_losses_for_stateful_weighting(name: str) -> None:
    net, opt = warmed_up(name)
    before = snapshot(net, opt)
    with pytest.raises(ValueError, match="keeps state for 3 tasks, got 2 losses"):
        opt.step(net.losses(*make_batch(0))[:2])
    assert_same(before, snapshot(net, opt))


def test_stateless_weighting_accepts_another_number_of_losses() -> None:
    net, opt = warmed_up("IMTLG")
    opt.step(net.losses(*make_batch(0))[:2])


def test_losses_and_closure_together_refused() -> None:
    net, opt = warmed_up("Mean")
    before = snapshot(net, opt)
    with pytest.raises(ValueError, match="either losses or a closure"):
        opt.step(net.losses(*make_batch(0)), closure=lambda: None)
    assert_same(before, snapshot(net, opt))


def test_closure_that_raises_changes_nothing() -> None:
    net, opt = warmed_up("GradVac")
    before = snapshot(net, opt)

    def closure():  # noqa: ANN202
        raise KeyError("data loader failed")

    with pytest.raises(KeyError, match="data loader failed"):
        opt.step(closure)
    assert_same(before, snapshot(net, opt))


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        ("GradVac(beta=-0.1)", "beta"),
        ("GradVac(beta=1.5)", "beta"),
        ("GradVac(eps=0)", "eps"),
        ("GradVac(seed=-1)", "seed"),
        ("ExcessMTL(robust_step_size=0)", "robust_step_size"),
        ("ExcessMTL(robust_step_size=-1.0)", "robust_step_size"),
        ("ExcessMTL(n_warmup_steps=-1)", "n_warmup_steps"),
        ("ExcessMTL(n_warmup_steps=1.5)", "n_warmup_steps"),
        ("IMTLL(lr=0)", "lr"),
        ("IMTL(n_tasks=0)", "n_tasks"),
    ],
)
def test_hyperparameters_out_of_range(factory: str, message: str) -> None:
    from mtlopt.weighting import IMTL, IMTLL, ExcessMTL, GradVac  # noqa: F401

    with pytest.raises((ValueError, TypeError), match=message):
        eval(factory)


@pytest.mark.parametrize("chunk_size", [0, -2, 1.5])
def test_bad_chunk_size(chunk_size: object) -> None:
    from mtlopt import MultiTaskOptimizer

    with pytest.raises(ValueError, match="chunk_size"):
        MultiTaskOptimizer(torch.optim.SGD(Net().parameters(), lr=0.1), chunk_size=chunk_size)  # type: ignore[arg-type]


def test_duplicate_parameters_across_groups_refused() -> None:
    net = Net()
    with pytest.raises(ValueError, match="more than one parameter group"):
        torch.optim.SGD([{"params": net.encoder.parameters()}, {"params": net.parameters()}], lr=0.1)
