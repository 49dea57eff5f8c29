"""The optimizer's side of the weighting hooks: several mini-batches per step, losses seen
after the step. Tested with small recording weightings, against explicit autograd loops."""

from __future__ import annotations

import pytest
import torch

from mtlopt import MultiTaskOptimizer
from mtlopt.weighting.base import Weighting

from .conftest import Net, assert_same, make_batch, snapshot


class _CrossRecorder(Weighting):
    needs = "gramian"
    n_batches = 3

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def weights_from_cross_gramians(
        self, gramians: torch.Tensor, losses: torch.Tensor
    ) -> torch.Tensor:
        self.seen.append(gramians.clone())
        # Any deterministic function of the cross terms will do.
        return torch.softmax(gramians[1, 2].diagonal() / gramians[1, 2].diagonal().abs().max(), 0)


class _Observer(Weighting):
    wants_losses_after_step = True

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[bool, torch.Tensor]] = []

    def loss_weights(self, losses: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(losses)

    def observe(self, losses: torch.Tensor, after_step: bool) -> None:
        self.calls.append((after_step, losses.clone()))


def encoder_jacobian(net: Net, seed: int) -> torch.Tensor:
    losses = net.losses(*make_batch(seed))
    params = list(net.encoder.parameters())
    rows = []
    for loss in losses:
        grads = torch.autograd.grad(loss, params, retain_graph=True)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows).double()


def test_closure_is_called_once_per_batch_and_cross_gramians_match() -> None:
    torch.manual_seed(0)
    net = Net()
    base = torch.optim.SGD(
        [
            {"params": net.encoder.parameters(), "weighting": _CrossRecorder()},
            {"params": net.heads.parameters(), "weighting": "sum"},
        ],
        lr=0.0,
    )
    opt = MultiTaskOptimizer(base)
    seeds = iter([10, 11, 12])
    drawn = []

    def closure() -> list[torch.Tensor]:
        seed = next(seeds)
        drawn.append(seed)
        return net.losses(*make_batch(seed))

    opt.step(closure)
    assert drawn == [10, 11, 12]
    jacobians = [encoder_jacobian(net, seed) for seed in drawn]
    recorder = opt.param_groups[0]["weighting"]
    (cross,) = recorder.seen
    for p in range(3):
        for q in range(3):
            torch.testing.assert_close(
                cross[p, q], jacobians[p] @ jacobians[q].T, rtol=1e-6, atol=1e-9
            )
    weights = opt.last_step[0].weights
    update = torch.cat([p.grad.reshape(-1) for p in net.encoder.parameters()]).double()
    torch.testing.assert_close(update, weights @ jacobians[0], rtol=1e-5, atol=1e-7)
    # Task heads get the first batch's gradient.
    head_loss = net.losses(*make_batch(10))[1]
    head_grads = torch.autograd.grad(head_loss, list(net.heads[1].parameters()))
    for p, g in zip(net.heads[1].parameters(), head_grads):
        torch.testing.assert_close(p.grad, g)


def test_multi_batch_weighting_without_closure_is_refused_cleanly() -> None:
    torch.manual_seed(0)
    net = Net()
    opt = MultiTaskOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), weighting=_CrossRecorder())
    before = snapshot(net, opt)
    with pytest.raises(
        ValueError, match=r"extra_batches: _CrossRecorder.*reads 3 mini-batch\(es\)"
    ):
        opt.step(net.losses(*make_batch(0)))
    assert_same(snapshot(net, opt), before)


def test_extra_batches_with_another_number_of_losses_refused() -> None:
    torch.manual_seed(0)
    net = Net()
    opt = MultiTaskOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), weighting=_CrossRecorder())
    batch = net.losses(*make_batch(0))
    with pytest.raises(ValueError, match=r"extra_batches\[1\]: expected 3 losses"):
        opt.backward(batch, extra_batches=[net.losses(*make_batch(1)), batch[:2]])


def test_observe_sees_step_losses_and_post_step_losses_with_closure() -> None:
    torch.manual_seed(0)
    net = Net()
    opt = MultiTaskOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), weighting=_Observer())
    x, y = make_batch(0)
    before = torch.stack(net.losses(x, y)).detach().double()
    opt.step(lambda: net.losses(x, y))
    after = torch.stack(net.losses(x, y)).detach().double()
    observer = opt.param_groups[0]["weighting"]
    assert [flag for flag, _ in observer.calls] == [False, True]
    torch.testing.assert_close(observer.calls[0][1], before)
    torch.testing.assert_close(observer.calls[1][1], after)
    assert (after < before).any()


def test_observe_without_closure_sees_only_the_step() -> None:
    torch.manual_seed(0)
    net = Net()
    opt = MultiTaskOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), weighting=_Observer())
    opt.step(net.losses(*make_batch(0)))
    observer = opt.param_groups[0]["weighting"]
    assert [flag for flag, _ in observer.calls] == [False]


def test_non_finite_post_step_losses_skip_the_update_with_a_warning() -> None:
    torch.manual_seed(0)
    net = Net()
    opt = MultiTaskOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), weighting=_Observer())
    calls = iter([net.losses(*make_batch(0))])

    def closure() -> list[torch.Tensor]:
        return next(calls, [torch.tensor(float("nan"))] * 3)

    with pytest.warns(RuntimeWarning, match="not finite"):
        opt.step(closure)
    observer = opt.param_groups[0]["weighting"]
    assert [flag for flag, _ in observer.calls] == [False]


def test_closure_returning_none_steps_on_existing_grads() -> None:
    """torch's closure convention (and Lightning's after ``backward``): a closure that returns
    None leaves the step to the ``.grad`` already written."""
    torch.manual_seed(0)
    net = Net()
    x, y = make_batch(0)
    opt = MultiTaskOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), weighting="upgrad")
    opt.zero_grad()
    opt.backward(net.losses(x, y))
    grads = {name: p.grad.clone() for name, p in net.named_parameters() if p.grad is not None}
    before = {name: p.detach().clone() for name, p in net.named_parameters()}
    calls = []
    assert opt.step(closure=lambda: calls.append(1)) is None
    assert calls == [1]
    for name, p in net.named_parameters():
        want = before[name].add(grads[name], alpha=-0.1) if name in grads else before[name]
        torch.testing.assert_close(p.detach(), want, rtol=0, atol=0)


@pytest.mark.parametrize("weighting", ["upgrad", "imtl", "gradvac", "excessmtl", "mean"])
def test_step_inside_autocast_computes_in_full_precision(weighting: str) -> None:
    """Inside a bfloat16 autocast region (Lightning's bf16-mixed) the weighting's arithmetic
    is the same as outside it, and ``.grad`` keeps the parameters' dtype."""
    x, y = make_batch(0)
    grads = []
    for inside in (False, True):
        torch.manual_seed(0)
        net = Net()
        opt = MultiTaskOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), weighting=weighting)
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            losses = [loss.float() for loss in net.losses(x, y)]
            if inside:
                opt.backward(losses)
        if not inside:
            opt.backward(losses)
        grads.append([p.grad for p in net.encoder.parameters()])
    for outside, inside in zip(*grads):
        assert inside.dtype == torch.float32
        torch.testing.assert_close(inside, outside, rtol=0, atol=0)


def test_a_post_hook_registered_during_the_step_runs_after_it() -> None:
    """As in torch.optim: the post-hooks are looked up once the step has run."""
    torch.manual_seed(0)
    net = Net()
    opt = MultiTaskOptimizer(torch.optim.SGD(net.parameters(), lr=0.05))
    seen: list[str] = []
    x, y = make_batch(0)

    def closure() -> list[torch.Tensor]:
        if not seen:
            opt.register_step_post_hook(lambda *args: seen.append("post"))
        return net.losses(x, y)

    opt.step(closure)
    assert seen == ["post"]
