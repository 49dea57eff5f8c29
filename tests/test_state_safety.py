"""Regressions from review: schedulers with loss-scale groups, copies after a scheduler wraps
``step``, atomic multi-group steps, load rollback, half precision, late vmap failures."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch.optim import lr_scheduler

from mtlopt import MultiTaskOptimizer
from mtlopt.aggregation import gramian
from mtlopt.weighting import IMTL, IMTLL, ExcessMTL, GradVac

from .conftest import Net, assert_same, make_batch, snapshot

SCHEDULERS = {
    "OneCycleLR": lambda o: lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=10),
    "LambdaLR": lambda o: lr_scheduler.LambdaLR(o, lambda step: 0.9**step),
    "SequentialLR": lambda o: lr_scheduler.SequentialLR(
        o,
        [lr_scheduler.ConstantLR(o, factor=0.5, total_iters=2), lr_scheduler.ExponentialLR(o, 0.9)],
        milestones=[2],
    ),
    "CosineAnnealingLR": lambda o: lr_scheduler.CosineAnnealingLR(o, T_max=5),
}


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
@pytest.mark.parametrize("weighting", [IMTL, IMTLL])
def test_scheduler_built_before_first_step_drives_scale_group(name: str, weighting) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    net = Net()
    opt = MultiTaskOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), weighting=weighting())
    scheduler = SCHEDULERS[name](opt)
    for step in range(4):
        opt.zero_grad()
        opt.step(net.losses(*make_batch(step)))
        scheduler.step()
    groups = opt.param_groups
    assert groups[-1].get("mtlopt_role") == "loss_scales"
    assert groups[-1]["params"][0].shape == (3,)
    # The scale group follows the same schedule as the model's group.
    assert groups[-1]["lr"] == pytest.approx(groups[0]["lr"])


def test_copies_after_scheduler_wrapped_step_are_independent() -> None:
    torch.manual_seed(0)
    net = Net()
    opt = MultiTaskOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), weighting=GradVac())
    lr_scheduler.StepLR(opt, step_size=1)
    opt.step(net.losses(*make_batch(0)))
    before = [p.detach().clone() for p in net.parameters()]
    for net2, opt2 in (copy.deepcopy((net, opt)), pickle.loads(pickle.dumps((net, opt)))):
        opt2.zero_grad()
        opt2.step(net2.losses(*make_batch(1)))
        assert not all(torch.equal(a, b) for a, b in zip(before, net2.parameters()))
    for a, b in zip(before, net.parameters()):
        assert torch.equal(a, b)  # the copies' steps never reached the original


#: Per-tensor state of each Jacobian weighting, and the start of its layout error.
LAYOUT_STATE = {
    "ExcessMTL": ("squared_grad_sums", "ExcessMTL keeps squared-gradient sums"),
    "DBMTL": ("buffers", "DBMTL keeps gradient buffers"),
    "MoCo": ("tracked", "MoCo keeps gradient tracks"),
    "AdaTask": ("exp_avg", "AdaTask keeps Adam moments"),
}


@pytest.mark.parametrize("name", sorted(LAYOUT_STATE))
def test_layout_error_in_one_group_leaves_every_group_untouched(name: str) -> None:
    torch.manual_seed(0)
    net = Net()
    base = torch.optim.SGD(
        [
            {"params": net.encoder[0].parameters(), "weighting": GradVac()},
            {"params": net.encoder[2].parameters(), "weighting": name},
            {"params": net.heads.parameters()},
        ],
        lr=0.1,
    )
    opt = MultiTaskOptimizer(base)
    opt.step(net.losses(*make_batch(0)))
    # A corrupted layout of the per-tensor state (as after swapping the group's parameters).
    attribute, message = LAYOUT_STATE[name]
    weighting = opt.param_groups[1]["weighting"]
    setattr(weighting, attribute, getattr(weighting, attribute)[:1])
    opt.zero_grad()
    before = snapshot(net, opt)
    with pytest.raises(ValueError, match=message):
        opt.step(net.losses(*make_batch(1)))
    assert_same(snapshot(net, opt), before)


def test_failed_load_restores_scales_and_groups() -> None:
    torch.manual_seed(0)
    net = Net()
    opt = MultiTaskOptimizer(torch.optim.Adam(net.parameters(), lr=0.1), weighting=IMTL())
    for step in range(2):
        opt.zero_grad()
        opt.step(net.losses(*make_batch(step)))
    saved = opt.state_dict()
    opt.zero_grad()
    opt.step(net.losses(*make_batch(5)))
    before = snapshot(net, opt)
    groups = list(opt.param_groups)
    broken = copy.deepcopy(saved)
    broken["param_groups"][0]["params"] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]  # extra id
    broken["param_groups"][1]["params"] = [13]
    with pytest.raises(ValueError):
        opt.load_state_dict(broken)
    assert_same(snapshot(net, opt), before)
    assert opt.param_groups == groups


def test_failed_load_in_base_optimizer_rolls_back_weightings() -> None:
    torch.manual_seed(0)
    net = Net()
    opt = MultiTaskOptimizer(torch.optim.Adam(net.parameters(), lr=0.1), weighting=IMTL())
    opt.step(net.losses(*make_batch(0)))
    saved = copy.deepcopy(opt.state_dict())
    opt.zero_grad()
    opt.step(net.losses(*make_batch(1)))
    before = snapshot(net, opt)
    saved["mtlopt"]["groups"][0]["state"]["log_scales"] = torch.tensor([9.0, 9.0, 9.0])
    saved["state"] = 5  # the base optimizer's own load fails, after the weightings loaded
    with pytest.raises(Exception):
        opt.load_state_dict(saved)
    assert_same(snapshot(net, opt), before)


def test_half_precision_gramian_does_not_overflow() -> None:
    block = torch.full((2, 4000), 300.0, dtype=torch.float16)  # each product 9e4 > fp16 max
    expected = torch.full((2, 2), 300.0**2 * 4000, dtype=torch.float64)
    torch.testing.assert_close(gramian([block]), expected)


def test_half_precision_excess_mtl_keeps_float32_sums() -> None:
    weighting = ExcessMTL()
    block = torch.full((2, 10), 400.0, dtype=torch.float16)
    for _ in range(3):
        weights = weighting.weights_from_jacobian([block], torch.ones(2, dtype=torch.float64))
    assert weighting.squared_grad_sums[0].dtype == torch.float32
    assert torch.isfinite(weighting.squared_grad_sums[0]).all()
    assert torch.isfinite(weights).all()


def test_large_finite_half_gradients_are_not_called_non_finite() -> None:
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.full((5000,), 60000.0, dtype=torch.float16))
    opt = MultiTaskOptimizer(torch.optim.SGD([w], lr=0.0), weighting=GradVac())
    # d loss_i / d w = 60000 per entry: a float16 norm would overflow, the values do not.
    losses = [(w.float() * w.float()).sum() / 2 / 60000 * c for c in (1.0, 0.5)]
    opt.step(losses)
    assert torch.isfinite(w.grad.float()).all()


class FlakyVmap(torch.autograd.Function):
    """Identity whose backward refuses vmap only when ``fail`` is set (a late code path)."""

    fail = False

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
        pass

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        if FlakyVmap.fail and torch._C._functorch.is_batchedtensor(grad):
            raise RuntimeError("no batching rule on this code path")
        return grad * 1.0


def test_fallback_after_batched_steps_succeeded() -> None:
    torch.manual_seed(0)
    net = Net()
    reference = copy.deepcopy(net)

    def losses(model: Net, step: int) -> list[torch.Tensor]:
        x, y = make_batch(step)
        z = FlakyVmap.apply(model.encoder(x))
        return [((h(z).squeeze(-1) - y[:, t]) ** 2).mean() for t, h in enumerate(model.heads)]

    opt = MultiTaskOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), weighting=GradVac(seed=1))
    ref = MultiTaskOptimizer(
        torch.optim.SGD(reference.parameters(), lr=0.1), weighting=GradVac(seed=1), jacobian="loop"
    )
    try:
        for step in range(3):
            FlakyVmap.fail = step == 2
            for model, o in ((net, opt), (reference, ref)):
                o.zero_grad()
                if step == 2 and o is opt:
                    with pytest.warns(RuntimeWarning, match="no batching rule"):
                        o.step(losses(model, step))
                else:
                    o.step(losses(model, step))
    finally:
        FlakyVmap.fail = False
    for a, b in zip(net.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_adatask_role_change_in_one_group_leaves_every_group_untouched() -> None:
    """A tensor that was one task's head and becomes shared is refused before any group's
    weighting runs (AdaTask's per-task moments for it do not exist)."""
    torch.manual_seed(0)
    net = Net()
    switch = torch.nn.Linear(8, 1)
    base = torch.optim.SGD(
        [
            {"params": net.encoder.parameters(), "weighting": GradVac()},
            {"params": switch.parameters(), "weighting": "adatask"},
            {"params": net.heads.parameters()},
        ],
        lr=0.1,
    )
    opt = MultiTaskOptimizer(base)

    def losses(step: int, share: bool) -> list[torch.Tensor]:
        x, y = make_batch(step)
        z = net.encoder(x)
        extra = switch(z).pow(2).mean()
        out = net.losses(x, y)
        return [out[0] + extra, out[1] + (extra if share else 0.0), out[2]]

    opt.step(losses(0, share=False))
    opt.zero_grad()
    before = snapshot(net, opt)
    with pytest.raises(ValueError, match="was a task head"):
        opt.step(losses(1, share=True))
    assert_same(snapshot(net, opt), before)


def test_state_snapshot_is_independent_of_the_live_state() -> None:
    from fractions import Fraction

    from mtlopt.weighting.base import snapshot as state_snapshot

    live_tensor = torch.arange(4.0)
    state = {
        "n_tasks": 3,
        "beta": 0.5,
        "name": "x",
        "flag": True,
        "none": None,
        "tensor": live_tensor,
        "nested": {"history": [torch.ones(2), (torch.zeros(1), 7)]},
        "other": [Fraction(1, 3)],
    }
    want = copy.deepcopy(state)
    copied = state_snapshot(state)
    live_tensor.add_(10)
    state["nested"]["history"][0].mul_(5)
    state["nested"]["history"].append("late")
    state["other"].append(1)
    assert copied.keys() == want.keys()
    assert torch.equal(copied["tensor"], want["tensor"])
    assert torch.equal(copied["nested"]["history"][0], want["nested"]["history"][0])
    assert isinstance(copied["nested"]["history"][1], tuple)
    assert len(copied["nested"]["history"]) == 2
    assert copied["other"] == want["other"]
    assert {k: copied[k] for k in ("n_tasks", "beta", "name", "flag", "none")} == {
        k: want[k] for k in ("n_tasks", "beta", "name", "flag", "none")
    }
