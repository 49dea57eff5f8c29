"""Every stateful weighting resumes bit-identically from a weights_only checkpoint.

Steps go through ``opt.step(closure)`` with a closure that draws the next batch, so methods
that read several batches (SDMGrad, MoDo) or the losses after the step (FAMO) run their full
protocol; the batch counter is saved with the checkpoint.
"""

from __future__ import annotations

import io

import pytest
import torch

from mtlopt.weighting.base import REGISTRY

from .conftest import Net, assert_same, make_batch, make_optimizer
from .method_kit import FACTORIES, FIXED_TASKS

pytestmark = pytest.mark.filterwarnings("ignore:.*finished \\(Adam-like\\) step")

STATEFUL = sorted(name for name, cls in REGISTRY.items() if cls.stateful and name in FACTORIES)


class Batches:
    def __init__(self, net: Net, start: int = 0) -> None:
        self.net, self.drawn = net, start

    def __call__(self) -> list[torch.Tensor]:
        self.drawn += 1
        return self.net.losses(*make_batch(self.drawn))


def run(net: Net, opt, batches: Batches, steps: int) -> None:  # noqa: ANN001
    for _ in range(steps):
        opt.zero_grad()
        opt.step(batches)


def build(name: str, seed: int):  # noqa: ANN201
    torch.manual_seed(seed)
    net = Net()
    return net, make_optimizer(net, FACTORIES[name](), base="sgd")


def roundtrip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("name", STATEFUL)
@pytest.mark.parametrize("stop_at", [1, 3])
def test_resume_is_bit_identical(name: str, stop_at: int) -> None:
    if FIXED_TASKS.get(name, 3) != 3:
        pytest.skip("built for another number of tasks")
    net_a, opt_a = build(name, 0)
    run(net_a, opt_a, Batches(net_a), 6)

    net_b, opt_b = build(name, 0)
    batches_b = Batches(net_b)
    run(net_b, opt_b, batches_b, stop_at)
    saved = roundtrip(
        {"model": net_b.state_dict(), "opt": opt_b.state_dict(), "drawn": batches_b.drawn}
    )

    net_c, opt_c = build(name, 1234)  # other seeds: the checkpoint must win
    net_c.load_state_dict(saved["model"])
    opt_c.load_state_dict(saved["opt"])
    run(net_c, opt_c, Batches(net_c, saved["drawn"]), 6 - stop_at)

    for p, q in zip(net_a.parameters(), net_c.parameters()):
        assert torch.equal(p, q), name
    assert_same(roundtrip(opt_a.state_dict()), roundtrip(opt_c.state_dict()))


@pytest.mark.parametrize("name", STATEFUL)
@pytest.mark.parametrize("where", ["loss", "gradient"])
def test_skip_policy_moves_no_state(name: str, where: str) -> None:
    """nonfinite="skip" for every stateful method: the step is skipped, nothing moves."""
    from mtlopt import MultiTaskOptimizer

    from .conftest import snapshot

    torch.manual_seed(0)
    net = Net()
    opt = MultiTaskOptimizer(
        torch.optim.SGD(net.parameters(), lr=0.05), weighting=FACTORIES[name](), nonfinite="skip"
    )
    batches = Batches(net)
    run(net, opt, batches, 2)
    opt.zero_grad()
    before = snapshot(net, opt)

    def poisoned() -> list[torch.Tensor]:
        losses = batches()
        if where == "loss":
            losses[1] = losses[1] * float("nan")
        else:  # a finite value with an infinite gradient: d sqrt(x)/dx at 0
            losses[1] = losses[1] + torch.sqrt(net.encoder[0].weight[0, 0] * 0)
        return losses

    opt.step(poisoned)
    assert opt.skipped_steps == 1
    assert_same(snapshot(net, opt), before)
