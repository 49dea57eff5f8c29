"""Checkpoints: weights_only loading into fresh objects resumes bit-identically."""

from __future__ import annotations

import io

import pytest
import torch

from mtlopt.weighting import IMTL, ExcessMTL, GradVac, IMTLG, Mean

from .conftest import N_TASKS, WEIGHTINGS, Net, assert_same, make_batch, make_optimizer


def run(net: Net, opt, steps: range) -> None:  # noqa: ANN001
    for step in steps:
        opt.zero_grad()
        opt.step(net.losses(*make_batch(step)))


def roundtrip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def build(name: str, seed: int = 0):  # noqa: ANN201
    torch.manual_seed(seed)
    net = Net()
    return net, make_optimizer(net, WEIGHTINGS[name]())


@pytest.mark.parametrize("stop_at", [1, 2, 5])
def test_resume_is_bit_identical(weighting_name: str, stop_at: int) -> None:
    # Uninterrupted reference run.
    net_a, opt_a = build(weighting_name)
    run(net_a, opt_a, range(8))

    # Interrupted run: stop (also mid-warmup for ExcessMTL-warmup), save, load fresh, continue.
    net_b, opt_b = build(weighting_name)
    run(net_b, opt_b, range(stop_at))
    saved = roundtrip({"model": net_b.state_dict(), "opt": opt_b.state_dict()})
    torch.manual_seed(1234)  # fresh objects get other seeds: the checkpoint must win
    net_c = Net()
    opt_c = make_optimizer(net_c, WEIGHTINGS[weighting_name]())
    net_c.load_state_dict(saved["model"])
    opt_c.load_state_dict(saved["opt"])
    run(net_c, opt_c, range(stop_at, 8))

    for p, q in zip(net_a.parameters(), net_c.parameters()):
        assert torch.equal(p, q)
    assert_same(roundtrip(opt_a.state_dict()), roundtrip(opt_c.state_dict()))


def test_state_dict_holds_only_plain_data(weighting_name: str) -> None:
    net, opt = build(weighting_name)
    run(net, opt, range(2))
    state = opt.state_dict()

    def walk(value: object) -> None:
        if isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v)
        else:
            assert value is None or isinstance(value, (torch.Tensor, int, float, str, bool)), value

    walk(state)
    assert state["mtlopt"]["version"] == 1
    names = [g and g["weighting"] for g in state["mtlopt"]["groups"]]
    assert type(opt.weighting).__name__ in names


def test_state_dict_is_standard_optimizer_shape() -> None:
    net, opt = build("GradVac")
    run(net, opt, range(1))
    state = opt.state_dict()
    assert {"state", "param_groups", "mtlopt"} <= set(state)
    assert all("weighting" not in g for g in state["param_groups"])
    # The live groups keep their weighting objects.
    assert all("weighting" in g for g in opt.param_groups)


def test_load_rebinds_delegated_attributes() -> None:
    net, opt = build("GradVac")
    run(net, opt, range(2))
    state = roundtrip(opt.state_dict())
    opt.load_state_dict(state)
    assert opt.param_groups is opt.optimizer.param_groups
    assert opt.state is opt.optimizer.state
    assert all(isinstance(g["weighting"], GradVac) for g in opt.param_groups)
    run(net, opt, range(2, 3))  # still trains


@pytest.mark.parametrize(
    ("saved", "fresh", "message"),
    [
        (GradVac, IMTLG, "weighting GradVac"),
        (lambda: GradVac(beta=0.3), lambda: GradVac(beta=0.5), "beta"),
        (lambda: ExcessMTL(n_warmup_steps=1), lambda: ExcessMTL(n_warmup_steps=2), "n_warmup_steps"),
        (IMTL, Mean, "weighting IMTL"),
    ],
)
def test_mismatched_checkpoint_raises_and_changes_nothing(saved, fresh, message) -> None:  # noqa: ANN001
    net, opt = make_net_opt(saved)
    run(net, opt, range(2))
    state = roundtrip(opt.state_dict())
    net2, opt2 = make_net_opt(fresh)
    run(net2, opt2, range(1))
    before = roundtrip(opt2.state_dict())
    with pytest.raises(ValueError, match=message):
        opt2.load_state_dict(state)
    assert_same(before, roundtrip(opt2.state_dict()))


def make_net_opt(factory):  # noqa: ANN001, ANN201
    torch.manual_seed(0)
    net = Net()
    return net, make_optimizer(net, factory())


def test_other_number_of_tasks_raises() -> None:
    torch.manual_seed(0)
    net = Net(n_tasks=N_TASKS)
    opt = make_optimizer(net, GradVac())
    run(net, opt, range(1))
    state = roundtrip(opt.state_dict())
    torch.manual_seed(0)
    net2 = Net(n_tasks=2)
    opt2 = make_optimizer(net2, GradVac())
    opt2.zero_grad()
    opt2.step(net2.losses(*make_batch(0, n_tasks=2)))
    with pytest.raises(ValueError, match="3 tasks"):
        opt2.load_state_dict(state)


def test_other_group_layout_raises() -> None:
    net, opt = build("GradVac")
    run(net, opt, range(1))
    state = roundtrip(opt.state_dict())
    torch.manual_seed(0)
    net2 = Net()
    opt2 = torch.optim.Adam(net2.parameters(), lr=0.1)
    from mtlopt import MultiTaskOptimizer

    wrapped = MultiTaskOptimizer(opt2, weighting=GradVac(beta=0.3))
    with pytest.raises(ValueError, match="aggregation group"):
        wrapped.load_state_dict(state)


def test_plain_optimizer_state_dict_is_refused() -> None:
    net, opt = build("Mean")
    with pytest.raises(ValueError, match="not a MultiTaskOptimizer state_dict"):
        opt.load_state_dict(opt.optimizer.state_dict())


def test_unsupported_version_is_refused() -> None:
    net, opt = build("Mean")
    state = opt.state_dict()
    state["mtlopt"]["version"] = 99
    with pytest.raises(ValueError, match="version 99"):
        opt.load_state_dict(state)


def test_unsized_scales_load_into_fresh_optimizer() -> None:
    net, opt = build("IMTL")
    run(net, opt, range(3))
    n_groups = len(opt.param_groups)
    saved = roundtrip({"model": net.state_dict(), "opt": opt.state_dict()})
    net2, opt2 = build("IMTL")
    # The scale groups exist from construction (for LR schedulers), empty until sized.
    assert len(opt2.param_groups) == n_groups
    scales2 = [g["weighting"].log_scales for g in opt2.param_groups if "weighting" in g]
    assert all(s.numel() == 0 for s in scales2)
    net2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    scales = [g["weighting"].log_scales for g in opt.param_groups if "weighting" in g]
    for a, b in zip(scales, scales2):
        assert a.shape == (3,) and torch.equal(a, b)
