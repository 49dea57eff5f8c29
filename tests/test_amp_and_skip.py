"""GradScaler: weightings see unscaled gradients, overflow skips without moving state.
nonfinite="skip": a nan or inf skips the step and nothing moves."""

from __future__ import annotations

import copy

import pytest
import torch

from mtlopt import MultiTaskOptimizer

from .conftest import WEIGHTINGS, Net, assert_same, make_batch, make_optimizer, snapshot


@pytest.mark.parametrize("name", sorted(WEIGHTINGS))
def test_scaled_steps_match_unscaled_ones(name: str) -> None:
    torch.manual_seed(0)
    net = Net()
    reference = copy.deepcopy(net)
    torch.manual_seed(1)
    opt = make_optimizer(net, WEIGHTINGS[name](), base="sgd")
    torch.manual_seed(1)
    ref = make_optimizer(reference, WEIGHTINGS[name](), base="sgd")
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    for step in range(4):
        opt.zero_grad()
        assert opt.backward(net.losses(*make_batch(step)), scaler=scaler)
        scaler.unscale_(opt)
        scaler.step(opt)
        scaler.update()
        ref.zero_grad()
        ref.step(reference.losses(*make_batch(step)))
    for p, q in zip(net.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    ours, theirs = opt.state_dict()["mtlopt"], ref.state_dict()["mtlopt"]
    for a, b in zip(ours["groups"], theirs["groups"]):
        if a is None:
            continue
        for key, value in a["state"].items():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                torch.testing.assert_close(value, b["state"][key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(WEIGHTINGS))
def test_overflow_is_skipped_by_the_scaler_and_moves_no_state(name: str) -> None:
    torch.manual_seed(0)
    net = Net()
    opt = make_optimizer(net, WEIGHTINGS[name](), base="sgd")
    scaler = torch.amp.GradScaler("cpu", init_scale=3e38)  # every scaled gradient overflows
    opt.step(net.losses(*make_batch(0)))  # some state first
    opt.zero_grad()
    before = snapshot(net, opt)
    losses = [loss * 100 for loss in net.losses(*make_batch(1))]  # large enough to overflow
    assert not opt.backward(losses, scaler=scaler)
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() < 3e38  # the scaler saw the overflow and backed off
    after = snapshot(net, opt)
    assert_same(after["params"], before["params"])
    assert_same(after["opt"], before["opt"])
    assert opt.skipped_steps == 1


@pytest.mark.parametrize("name", sorted(WEIGHTINGS))
@pytest.mark.parametrize("where", ["loss", "gradient"])
def test_skip_policy_moves_nothing(name: str, where: str) -> None:
    torch.manual_seed(0)
    net = Net()
    base = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    opt = MultiTaskOptimizer(base, weighting=WEIGHTINGS[name](), nonfinite="skip")
    opt.step(net.losses(*make_batch(0)))
    opt.zero_grad()
    before = snapshot(net, opt)
    losses = net.losses(*make_batch(1))
    if where == "loss":
        losses[1] = losses[1] * float("nan")
    else:
        # Finite value, infinite gradient: d sqrt(x) / dx at x = 0.
        losses[1] = losses[1] + torch.sqrt(net.encoder[0].weight[0, 0] * 0)
    assert opt.step(losses) is None
    assert_same(snapshot(net, opt), before)
    assert opt.skipped_steps == 1
    # The next good step proceeds normally.
    opt.step(net.losses(*make_batch(2)))
    assert not all(torch.equal(a, b) for a, b in zip(before["params"], net.parameters()))


def test_two_phase_skip_makes_the_next_step_a_no_op() -> None:
    torch.manual_seed(0)
    net = Net()
    opt = MultiTaskOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), nonfinite="skip")
    losses = net.losses(*make_batch(0))
    losses[0] = losses[0] * float("inf")
    before = snapshot(net, opt)
    assert opt.backward(losses) is False
    opt.step()
    assert_same(snapshot(net, opt), before)


def test_bad_nonfinite_policy() -> None:
    net = Net()
    with pytest.raises(ValueError, match="nonfinite: expected 'raise' or 'skip', got 'ignore'"):
        MultiTaskOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), nonfinite="ignore")
