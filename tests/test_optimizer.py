"""MultiTaskOptimizer behaves as a torch optimizer: delegation, schedulers, hooks, pickling."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch.optim import lr_scheduler
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from mtlopt import MultiTaskOptimizer
from mtlopt.weighting import IMTLL, GradVac, IMTLG, Mean, Sum

from .conftest import Net, make_batch, make_optimizer


def fresh(weighting=None, base: str = "adam"):  # noqa: ANN001, ANN201
    torch.manual_seed(0)
    net = Net()
    return net, make_optimizer(net, weighting or GradVac(), base=base)


def test_is_a_torch_optimizer_and_delegates_both_ways() -> None:
    net, opt = fresh()
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups is opt.optimizer.param_groups
    assert opt.state is opt.optimizer.state
    assert opt.defaults is opt.optimizer.defaults
    opt.param_groups[0]["lr"] = 0.123
    assert opt.optimizer.param_groups[0]["lr"] == 0.123
    new_groups = list(opt.param_groups)
    opt.param_groups = new_groups
    assert opt.optimizer.param_groups is new_groups


def test_default_weighting_is_mean_and_copied_per_group() -> None:
    torch.manual_seed(0)
    net = Net()
    opt = MultiTaskOptimizer(torch.optim.SGD(net.parameters(), lr=0.1))
    assert isinstance(opt.weighting, Mean)
    net, opt = fresh(GradVac())
    weightings = [g["weighting"] for g in opt.param_groups]
    assert len({id(w) for w in weightings}) == len(weightings)
    assert all(w is not opt.weighting for w in weightings)


def test_group_may_name_its_own_weighting() -> None:
    torch.manual_seed(0)
    net = Net()
    own = IMTLG()
    base = torch.optim.SGD(
        [{"params": net.encoder.parameters(), "weighting": own}, {"params": net.heads.parameters()}],
        lr=0.1,
    )
    opt = MultiTaskOptimizer(base, weighting=Sum())
    assert opt.param_groups[0]["weighting"] is own
    assert isinstance(opt.param_groups[1]["weighting"], Sum)


def test_shared_weighting_instance_is_refused() -> None:
    torch.manual_seed(0)
    net = Net()
    w = GradVac()
    base = torch.optim.SGD(
        [{"params": net.encoder.parameters(), "weighting": w}, {"params": net.heads.parameters(), "weighting": w}],
        lr=0.1,
    )
    with pytest.raises(ValueError, match="same weighting instance"):
        MultiTaskOptimizer(base)


@pytest.mark.parametrize("bad", [object(), 3])
def test_bad_weighting_type(bad: object) -> None:
    net = Net()
    with pytest.raises(TypeError, match="weighting"):
        MultiTaskOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), weighting=bad)  # type: ignore[arg-type]


def test_unknown_weighting_name() -> None:
    net = Net()
    with pytest.raises(ValueError, match="unknown weighting 'gradvac_typo'.*GradVac"):
        MultiTaskOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), weighting="gradvac_typo")


@pytest.mark.parametrize("name", ["gradvac", "GradVac", "grad_vac", "IMTL-G"])
def test_weighting_by_name(name: str) -> None:
    net = Net()
    base = torch.optim.SGD(
        [{"params": net.encoder.parameters(), "weighting": name}, {"params": net.heads.parameters()}],
        lr=0.1,
    )
    opt = MultiTaskOptimizer(base, weighting="sum")
    assert type(opt.param_groups[0]["weighting"]).__name__.lower() == name.lower().replace("_", "").replace("-", "")
    assert isinstance(opt.param_groups[1]["weighting"], Sum)
    opt.add_param_group({"params": net.unused.parameters(), "weighting": "mean"})
    assert type(opt.param_groups[2]["weighting"]).__name__ == "Mean"


def test_bad_base_optimizer() -> None:
    net = Net()
    with pytest.raises(TypeError, match="optimizer"):
        MultiTaskOptimizer(net.parameters())  # type: ignore[arg-type]
    _, opt = fresh()
    with pytest.raises(TypeError, match="optimizer"):
        MultiTaskOptimizer(opt)


def test_two_phase_equals_one_call() -> None:
    net_a, opt_a = fresh()
    net_b, opt_b = fresh()
    for step in range(3):
        opt_a.zero_grad()
        opt_a.step(net_a.losses(*make_batch(step)))
        opt_b.zero_grad()
        opt_b.backward(net_b.losses(*make_batch(step)))
        opt_b.step()
    for p, q in zip(net_a.parameters(), net_b.parameters()):
        assert torch.equal(p, q)


def test_clipping_between_phases() -> None:
    net, opt = fresh(Sum(), base="sgd")
    opt.zero_grad()
    opt.backward(net.losses(*make_batch(0)))
    torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1e-3)
    total = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in net.parameters() if p.grad is not None]))
    assert total <= 1e-3 * (1 + 1e-5)
    opt.step()


def test_closure_returning_losses() -> None:
    net_a, opt_a = fresh()
    net_b, opt_b = fresh()
    batch = make_batch(0)
    opt_a.zero_grad()
    opt_a.step(net_a.losses(*batch))

    def closure():  # noqa: ANN202
        opt_b.zero_grad()
        return net_b.losses(*batch)

    result = opt_b.step(closure)
    assert len(result) == 3
    for p, q in zip(net_a.parameters(), net_b.parameters()):
        assert torch.equal(p, q)
    opt_b.step(closure=closure)


def test_step_under_no_grad() -> None:
    net, opt = fresh()
    losses = net.losses(*make_batch(0))
    before = [p.clone() for p in net.parameters()]
    with torch.no_grad():
        opt.step(losses)
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))


def test_losses_as_1d_tensor_equal_list() -> None:
    net_a, opt_a = fresh(IMTLG())
    net_b, opt_b = fresh(IMTLG())
    opt_a.backward(net_a.losses(*make_batch(0)))
    opt_b.backward(torch.stack(net_b.losses(*make_batch(0))))
    for p, q in zip(net_a.parameters(), net_b.parameters()):
        assert (p.grad is None and q.grad is None) or torch.allclose(p.grad, q.grad)


def test_unreached_parameter_keeps_grad_none_and_grads_accumulate() -> None:
    net, opt = fresh(Sum(), base="sgd")
    opt.zero_grad()
    opt.backward(net.losses(*make_batch(0)))
    assert all(p.grad is None for p in net.unused.parameters())
    first = [p.grad.clone() for p in net.encoder.parameters()]
    opt.backward(net.losses(*make_batch(0)))
    for g, p in zip(first, net.encoder.parameters()):
        assert torch.allclose(p.grad, 2 * g)


@pytest.mark.parametrize(
    "make_scheduler",
    [
        lambda o: lr_scheduler.StepLR(o, step_size=1, gamma=0.5),
        lambda o: lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=10),
        lambda o: lr_scheduler.SequentialLR(
            o,
            [lr_scheduler.ConstantLR(o, factor=0.5, total_iters=2), lr_scheduler.ExponentialLR(o, 0.9)],
            milestones=[2],
        ),
    ],
)
def test_lr_schedulers_drive_the_base_optimizer(make_scheduler) -> None:  # noqa: ANN001
    net, opt = fresh(base="sgd")
    scheduler = make_scheduler(opt)
    lrs = []
    for step in range(4):
        opt.zero_grad()
        opt.step(net.losses(*make_batch(step)))
        scheduler.step()
        lrs.append(opt.optimizer.param_groups[0]["lr"])
    assert len(set(lrs)) > 1
    assert opt.param_groups[0]["lr"] == lrs[-1]


def test_reduce_lr_on_plateau() -> None:
    net, opt = fresh(base="sgd")
    scheduler = lr_scheduler.ReduceLROnPlateau(opt, patience=0, factor=0.5)
    lr0 = opt.optimizer.param_groups[0]["lr"]
    for step in range(3):
        opt.zero_grad()
        opt.step(net.losses(*make_batch(step)))
        scheduler.step(1.0)  # never improves
    assert opt.optimizer.param_groups[0]["lr"] < lr0


def test_scheduler_sees_eager_scale_group() -> None:
    torch.manual_seed(0)
    net = Net()
    base = torch.optim.SGD(net.parameters(), lr=0.1)
    opt = MultiTaskOptimizer(base, weighting=IMTLL(n_tasks=3))
    assert len(opt.param_groups) == 2  # created at construction: schedulers see it
    scheduler = lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    opt.zero_grad()
    opt.step(net.losses(*make_batch(0)))
    scheduler.step()
    assert opt.param_groups[1]["lr"] == pytest.approx(0.05)


def test_step_hooks_fire() -> None:
    net, opt = fresh()
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append("post"))
    opt.step(net.losses(*make_batch(0)))
    assert calls == ["pre", "post"]


def test_global_step_hooks_and_argument_replacement() -> None:
    net, opt = fresh()
    calls = []
    replacement = net.losses(*make_batch(1))

    def pre(o, args, kwargs):  # noqa: ANN001, ANN202
        calls.append(("pre", o is opt))
        return (args[0], replacement), kwargs

    handles = [
        register_optimizer_step_pre_hook(lambda o, a, k: calls.append("g")),
        opt.register_step_pre_hook(pre),
        register_optimizer_step_post_hook(
            lambda o, a, k: calls.append(("g-post", a[1:] == (replacement,)))
        ),
    ]
    try:
        opt.step(net.losses(*make_batch(0)))
    finally:
        for handle in handles:
            handle.remove()
    # Global pre-hooks run first; the base optimizer's own step fires the global hooks too;
    # the post-hooks see the arguments the pre-hook put in.
    assert calls[:3] == ["g", ("pre", True), "g"]
    assert calls[-1] == ("g-post", True)


def test_step_hook_with_a_bad_return_value_raises() -> None:
    net, opt = fresh()
    opt.register_step_pre_hook(lambda o, args, kwargs: "oops")
    with pytest.raises(RuntimeError, match="must return None or a tuple"):
        opt.step(net.losses(*make_batch(0)))


def _record_ranges(monkeypatch) -> list[str]:
    """The names of the record_function ranges opened from now on."""
    opened: list[str] = []
    real = torch.autograd.profiler.record_function

    def recording(name, *args):
        opened.append(name)
        return real(name, *args)

    monkeypatch.setattr(torch.autograd.profiler, "record_function", recording)
    return opened


def test_step_and_zero_grad_open_no_profiler_range_without_a_profiler(monkeypatch) -> None:
    net, opt = fresh()
    opened = _record_ranges(monkeypatch)
    opt.step(net.losses(*make_batch(0)))
    assert opt.optimizer.param_groups[0]["params"][0].grad is not None
    opt.zero_grad()
    assert opened == []  # neither ours nor the base optimizer's step and zero_grad ranges
    assert all(p.grad is None for group in opt.param_groups for p in group["params"])


def test_step_and_zero_grad_open_their_profiler_ranges_while_profiling() -> None:
    net, opt = fresh()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        opt.step(net.losses(*make_batch(0)))
        opt.zero_grad()
    names = {event.name for event in prof.events()}
    base = type(opt.optimizer).__name__
    assert "Optimizer.step#MultiTaskOptimizer.step" in names
    assert f"Optimizer.step#{base}.step" in names
    assert f"Optimizer.zero_grad#{base}.zero_grad" in names


def test_base_optimizer_step_hooks_fire_once_per_step() -> None:
    net, opt = fresh()
    calls = []
    opt.optimizer.register_step_pre_hook(lambda o, args, kwargs: calls.append(("pre", args)))
    opt.optimizer.register_step_post_hook(lambda o, args, kwargs: calls.append(("post", args)))
    for step in range(2):
        opt.zero_grad()
        opt.step(net.losses(*make_batch(step)))
    assert calls == [("pre", (opt.optimizer,)), ("post", (opt.optimizer,))] * 2


def test_base_optimizer_pre_hook_replacing_arguments_reaches_its_step() -> None:
    """A pre-hook of the base optimizer may hand its step a closure, as under torch's wrapper."""
    net, opt = fresh(base="sgd")
    seen = []

    def closure() -> None:
        seen.append("closure")

    opt.optimizer.register_step_pre_hook(lambda o, args, kwargs: ((o,), {"closure": closure}))
    opt.step(net.losses(*make_batch(0)))
    assert seen == ["closure"]


def test_base_optimizers_own_step_and_zero_grad_are_called_as_they_are() -> None:
    """A base optimizer that overrides zero_grad, or a step set on the instance (as some
    training frameworks patch it), runs its own code."""
    torch.manual_seed(0)
    net = Net()
    calls = []

    class CountingSGD(torch.optim.SGD):
        def zero_grad(self, set_to_none: bool = True) -> None:
            calls.append(("zero_grad", set_to_none))
            super().zero_grad(set_to_none)

    base = CountingSGD(net.parameters(), lr=0.1)
    real_step = base.step
    base.step = lambda *args, **kwargs: calls.append("step") or real_step(*args, **kwargs)
    opt = MultiTaskOptimizer(base, weighting=Mean())
    opt.zero_grad()
    opt.step(net.losses(*make_batch(0)))
    assert calls == [("zero_grad", True), "step"]


def test_zero_grad_keeping_tensors_zeroes_them() -> None:
    net, opt = fresh()
    opt.step(net.losses(*make_batch(0)))
    grads = [p.grad for group in opt.param_groups for p in group["params"] if p.grad is not None]
    opt.zero_grad(set_to_none=False)
    after = [p.grad for group in opt.param_groups for p in group["params"] if p.grad is not None]
    assert len(after) == len(grads) > 0
    assert all(a is g and not a.any() for a, g in zip(after, grads))


def test_state_dict_hooks_fire() -> None:
    net, opt = fresh()
    calls = []
    opt.register_state_dict_pre_hook(lambda o: calls.append("pre"))
    opt.register_state_dict_post_hook(lambda o, s: calls.append("post"))
    opt.register_load_state_dict_pre_hook(lambda o, s: calls.append("load-pre"))
    opt.register_load_state_dict_post_hook(lambda o: calls.append("load-post"))
    opt.load_state_dict(opt.state_dict())
    assert calls == ["pre", "post", "load-pre", "load-post"]


def test_add_param_group_gets_own_weighting() -> None:
    torch.manual_seed(0)
    net = Net()
    opt = MultiTaskOptimizer(torch.optim.SGD(net.encoder.parameters(), lr=0.1), weighting=GradVac())
    opt.add_param_group({"params": net.heads.parameters(), "lr": 0.01})
    assert len(opt.optimizer.param_groups) == 2
    assert isinstance(opt.param_groups[1]["weighting"], GradVac)
    assert opt.param_groups[1]["weighting"] is not opt.param_groups[0]["weighting"]
    opt.add_param_group({"params": net.unused.parameters(), "weighting": IMTLG()})
    assert isinstance(opt.param_groups[2]["weighting"], IMTLG)
    opt.step(net.losses(*make_batch(0)))
    with pytest.raises(ValueError, match="already serves"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))], "weighting": opt.param_groups[2]["weighting"]})


def test_pickle_and_deepcopy_continue_identically() -> None:
    net, opt = fresh()
    opt.step(net.losses(*make_batch(0)))
    bundle = copy.deepcopy((net, opt))
    bundle2 = pickle.loads(pickle.dumps((net, opt)))
    for copy_net, copy_opt in (bundle, bundle2):
        assert copy_opt.param_groups is copy_opt.optimizer.param_groups
        copy_opt.zero_grad()
        copy_opt.step(copy_net.losses(*make_batch(1)))
    opt.zero_grad()
    opt.step(net.losses(*make_batch(1)))
    for p, q, r in zip(net.parameters(), bundle[0].parameters(), bundle2[0].parameters()):
        assert torch.equal(p, q) and torch.equal(p, r)


def test_seeding_makes_runs_reproducible() -> None:
    def run() -> list[torch.Tensor]:
        net, opt = fresh(None)  # fresh() seeds torch before building GradVac
        for step in range(3):
            opt.zero_grad()
            opt.step(net.losses(*make_batch(step)))
        return [p.detach().clone() for p in net.parameters()]

    for a, b in zip(run(), run()):
        assert torch.equal(a, b)


def test_last_step_records_weights() -> None:
    net, opt = fresh(IMTLG())
    opt.step(net.losses(*make_batch(0)))
    weights = opt.last_step[0].weights
    assert weights.shape == (3,)
    assert float(weights.sum()) == pytest.approx(1.0)
    assert opt.last_step[1].weights is None  # heads only: no weighting involved


def test_repr_reads_like_constructor() -> None:
    assert repr(GradVac(beta=0.1)) == "GradVac(beta=0.1, eps=1e-08, seed=None)"
    net, opt = fresh()
    assert "GradVac" in repr(opt)


def test_chunk_size_gives_same_result() -> None:
    torch.manual_seed(0)
    net_a = Net()
    net_b = copy.deepcopy(net_a)
    opt_a = MultiTaskOptimizer(torch.optim.SGD(net_a.parameters(), lr=0.1), weighting=IMTLG())
    opt_b = MultiTaskOptimizer(torch.optim.SGD(net_b.parameters(), lr=0.1), weighting=IMTLG(), chunk_size=1)
    opt_a.step(net_a.losses(*make_batch(0)))
    opt_b.step(net_b.losses(*make_batch(0)))
    for p, q in zip(net_a.parameters(), net_b.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


class _HostRoundTrip(torch.autograd.Function):
    """Identity whose backward reads a value on the host: vmap cannot batch it."""

    @staticmethod
    def forward(ctx, x):  # noqa: ANN001, ANN205
        return x.clone()

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        return grad * (1.0 + 0.0 * grad.sum().item())


def test_fallback_through_the_optimizer_matches_loop_and_warns_once() -> None:
    torch.manual_seed(0)
    net_a = Net()
    net_b = copy.deepcopy(net_a)
    opt_a = MultiTaskOptimizer(torch.optim.SGD(net_a.parameters(), lr=0.1), weighting=IMTLG())
    opt_b = MultiTaskOptimizer(torch.optim.SGD(net_b.parameters(), lr=0.1), weighting=IMTLG(), jacobian="loop")

    def losses(net: Net, seed: int) -> list[torch.Tensor]:
        x, y = make_batch(seed)
        z = _HostRoundTrip.apply(net.encoder(x))
        return [((h(z).squeeze(-1) - y[:, t]) ** 2).mean() for t, h in enumerate(net.heads)]

    with pytest.warns(RuntimeWarning, match="loop of 3 backward passes") as record:
        opt_a.step(losses(net_a, 0))
    assert len([w for w in record if issubclass(w.category, RuntimeWarning)]) == 1
    opt_b.step(losses(net_b, 0))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        opt_a.zero_grad()
        opt_a.step(losses(net_a, 1))  # no second warning
    opt_b.zero_grad()
    opt_b.step(losses(net_b, 1))
    for p, q in zip(net_a.parameters(), net_b.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


def test_step_stats_hook_sees_weights_norms_and_cosines() -> None:
    net, opt = fresh(IMTLG())
    seen = []
    handle = opt.register_step_stats_hook(lambda o, stats: seen.append(stats))
    losses = net.losses(*make_batch(0))
    params = list(net.encoder.parameters())
    rows = [
        torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params, retain_graph=True)])
        for loss in losses
    ]
    opt.step(losses)
    handle.remove()
    opt.step(net.losses(*make_batch(1)))
    assert len(seen) == 1
    stats = seen[0][0]
    expected_norms = torch.stack([r.norm() for r in rows]).double()
    torch.testing.assert_close(stats.grad_norms, expected_norms, rtol=1e-5, atol=1e-8)
    cos01 = torch.nn.functional.cosine_similarity(rows[0], rows[1], dim=0).double()
    torch.testing.assert_close(stats.cosines[0, 1], cos01, rtol=1e-5, atol=1e-6)
    assert stats.weights.shape == (3,)
    assert seen[0][1].gramian is None  # the heads group reads no Gramian


@pytest.mark.parametrize(
    ("make_base", "warns"),
    [
        (lambda p: torch.optim.SGD(p, lr=0.1), False),
        (lambda p: torch.optim.SGD(p, lr=0.1, weight_decay=1e-2), False),
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), True),
        (lambda p: torch.optim.Adam(p, lr=0.1), True),
    ],
)
def test_adatask_warns_unless_base_is_plain_sgd(make_base, warns: bool) -> None:  # noqa: ANN001
    import warnings

    from mtlopt.weighting.adatask import AdaTask

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        MultiTaskOptimizer(make_base(Net().parameters()), weighting=AdaTask())
    assert any("finished (Adam-like) step" in str(w.message) for w in caught) == warns
