"""Constant, Random (RLW), GLS, DWA and STCH against references written from the papers.

References are plain Python (math, float64 lists) or finite differences of the scalarised
objective for the methods whose loss weights are an exact gradient; they never call the
library. End-to-end tests compare the optimizer's gradients with loops of autograd calls.
"""

from __future__ import annotations

import io
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mtlopt import MultiTaskOptimizer
from mtlopt.weighting.loss_balancing import DWA, GLS, STCH, Constant, Random

from .conftest import Net
from .references import batch64, double_net, encoder_params, flat_grad, head_params, task_gradients

F64 = torch.float64


def t64(values) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


def roundtrip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def assert_states_equal(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for key, value in a.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, b[key]), key
        else:
            assert value == b[key], key


def softmax_reference(values: list[float]) -> list[float]:
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    return [e / sum(exps) for e in exps]


def loss_sequence(seed: int, m: int, steps: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-2, 2, m, dtype=F64)
    return [scales * (0.5 + torch.rand(m, generator=gen, dtype=F64)) for _ in range(steps)]


# ---------------------------------------------------------------------------- end to end helpers












def check_step_gradients(net: Net, losses, factors: list[float], rtol: float = 1e-9) -> None:
    """After ``opt.backward(losses)``: the encoder has sum_i c_i g_i, head t has c_t g_t."""
    expected = sum(c * g for c, g in zip(factors, task_gradients(losses, encoder_params(net))))
    torch.testing.assert_close(flat_grad(encoder_params(net)), expected, rtol=rtol, atol=1e-12)
    for t in range(len(losses)):
        own = task_gradients([losses[t]], head_params(net, t))[0]
        torch.testing.assert_close(
            flat_grad(head_params(net, t)), factors[t] * own, rtol=rtol, atol=1e-12
        )


def run_end_to_end(weighting, reference_factors, steps: int = 4, rtol: float = 1e-9) -> None:
    """Train with SGD; before every step compute the expected factors from the loss history."""
    net = double_net(1)
    # The group names the weighting itself (a default weighting would be spawned per group).
    base = torch.optim.SGD([{"params": net.parameters(), "weighting": weighting}], lr=0.05)
    opt = MultiTaskOptimizer(base)
    assert opt.weightings()[0] is weighting
    history: list[list[float]] = []
    for step in range(steps):
        opt.zero_grad()
        losses = net.losses(*batch64(step))
        values = [float(l.detach()) for l in losses]
        factors = reference_factors(history, values)
        opt.backward(losses, retain_graph=True)
        check_step_gradients(net, losses, factors, rtol)
        opt.step()
        history.append(values)


# ============================================================================ Constant
def test_constant_weights_and_end_to_end():
    c = [0.5, 2.0, 0.1]
    w = Constant(c)
    torch.testing.assert_close(w.loss_weights(t64([1.0, 2.0, 3.0])), t64(c))
    run_end_to_end(Constant(c), lambda history, values: c, steps=2)


def test_constant_accepts_a_tensor_and_returns_fresh_tensors():
    w = Constant(torch.tensor([1.0, 3.0]))
    first = w.loss_weights(t64([1.0, 1.0]))
    first.mul_(0)  # the caller may modify it: the next call is unaffected
    torch.testing.assert_close(w.loss_weights(t64([1.0, 1.0])), t64([1.0, 3.0]))
    assert w.hyperparameters() == {"weights": [1.0, 3.0]}


def test_constant_length_is_checked():
    with pytest.raises(ValueError, match="2 weights, got 3 losses"):
        Constant([1.0, 2.0]).loss_weights(t64([1.0, 1.0, 1.0]))


@pytest.mark.parametrize(
    "bad",
    [[], [1.0, float("nan")], [float("inf")], "ab", 3.0, [1.0, "a"], torch.ones(2, 2), [True]],
)
def test_constant_bad_weights(bad):
    with pytest.raises((TypeError, ValueError), match="weights"):
        Constant(bad)


def test_constant_checkpoint_through_optimizer():
    net = double_net(0)
    opt = MultiTaskOptimizer(
        torch.optim.SGD(net.parameters(), lr=0.05), weighting=Constant([1, 2, 3])
    )
    opt.step(net.losses(*batch64(0)))
    state = roundtrip(opt.state_dict())
    other = MultiTaskOptimizer(
        torch.optim.SGD(double_net(0).parameters(), lr=0.05), weighting=Constant([1, 2, 3])
    )
    other.load_state_dict(state)
    wrong = MultiTaskOptimizer(
        torch.optim.SGD(double_net(0).parameters(), lr=0.05), weighting=Constant([1, 2, 4])
    )
    with pytest.raises(ValueError, match="Constant"):
        wrong.load_state_dict(state)


# ============================================================================ Random (RLW)
def rlw_reference(seed: int, m: int, steps: int) -> list[list[float]]:
    """softmax of a standard normal sample per step, from a generator seeded with ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    return [
        softmax_reference(torch.randn(m, generator=gen, dtype=F64).tolist()) for _ in range(steps)
    ]


@pytest.mark.parametrize("m", [1, 2, 5])
def test_random_matches_reference_and_is_pure(m):
    w = Random(seed=11)
    losses = torch.ones(m, dtype=F64)
    for expected in rlw_reference(11, m, 5):
        first = w.loss_weights(losses)
        before = w.state_dict()
        again = w.loss_weights(losses)
        assert torch.equal(first, again)  # same draw until the step commits
        assert_states_equal(before, w.state_dict())
        torch.testing.assert_close(first, t64(expected), rtol=1e-12, atol=1e-15)
        assert float(first.sum()) == pytest.approx(1.0, abs=1e-12)
        w.observe(losses, after_step=True)  # post-step losses do not advance the stream
        assert torch.equal(w.loss_weights(losses), first)
        w.observe(losses, after_step=False)


def test_random_seed_none_follows_torch_manual_seed():
    torch.manual_seed(5)
    a = Random()
    torch.manual_seed(5)
    b = Random()
    losses = torch.ones(4, dtype=F64)
    assert torch.equal(a.loss_weights(losses), b.loss_weights(losses))


def test_random_spawn_streams_differ_and_are_deterministic():
    parent = Random(seed=3)
    first, second = parent.spawn(), parent.spawn()
    losses = torch.ones(6, dtype=F64)
    draws = [w.loss_weights(losses) for w in (parent, first, second)]
    assert not torch.allclose(draws[0], draws[1])
    assert not torch.allclose(draws[1], draws[2])
    again = Random(seed=3).spawn()
    assert torch.equal(again.loss_weights(losses), draws[1])


def test_random_checkpoint_roundtrip_continues_identically():
    a = Random(seed=21)
    losses = torch.ones(3, dtype=F64)
    for _ in range(3):
        a.loss_weights(losses)
        a.observe(losses, after_step=False)
    b = Random(seed=999)
    b.load_state_dict(roundtrip(a.state_dict()))
    for _ in range(4):
        assert torch.equal(a.loss_weights(losses), b.loss_weights(losses))
        a.observe(losses, after_step=False)
        b.observe(losses, after_step=False)


def test_random_refuses_another_number_of_tasks():
    w = Random(seed=0)
    w.observe(torch.ones(3, dtype=F64), after_step=False)
    with pytest.raises(ValueError, match="3 tasks"):
        w.loss_weights(torch.ones(2, dtype=F64))


@pytest.mark.parametrize("seed", [-1, 1.5, "a"])
def test_random_bad_seed(seed):
    with pytest.raises((TypeError, ValueError), match="seed"):
        Random(seed=seed)


def test_random_end_to_end():
    draws = rlw_reference(7, 3, 4)
    run_end_to_end(Random(seed=7), lambda history, values: draws[len(history)])


# ============================================================================ GLS
def geometric_mean(values: list[float]) -> float:
    return math.prod(values) ** (1.0 / len(values))


def central_difference(function, values: list[float], index: int) -> float:
    h = 1e-5 * abs(values[index])
    up, down = list(values), list(values)
    up[index] += h
    down[index] -= h
    return (function(up) - function(down)) / (2 * h)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(min_value=1e-3, max_value=1e3), min_size=1, max_size=6))
def test_gls_is_the_gradient_of_the_geometric_mean(values):
    c = GLS().loss_weights(t64(values))
    expected = [central_difference(geometric_mean, values, i) for i in range(len(values))]
    torch.testing.assert_close(c, t64(expected), rtol=1e-6, atol=0)
    # Closed form, coded plainly: GM / (m L_i).
    closed = [geometric_mean(values) / (len(values) * v) for v in values]
    torch.testing.assert_close(c, t64(closed), rtol=1e-10, atol=0)


def test_gls_extreme_scales_are_finite_and_exact():
    values = [1e-10, 1.0, 1e15, 3e-7]
    c = GLS().loss_weights(t64(values))
    log_gm = sum(math.log(v) for v in values) / len(values)
    expected = [math.exp(log_gm - math.log(v)) / len(values) for v in values]
    assert torch.isfinite(c).all()
    torch.testing.assert_close(c, t64(expected), rtol=1e-12, atol=0)
    # The product of the losses overflows float64; the weights do not.
    huge = [1e300, 1e300, 1e300, 1e-10]
    c = GLS().loss_weights(t64(huge))
    log_gm = sum(math.log(v) for v in huge) / len(huge)
    expected = [math.exp(log_gm - math.log(v)) / len(huge) for v in huge]
    torch.testing.assert_close(c, t64(expected), rtol=1e-10, atol=0)


def test_gls_permutation_equivariant_and_single_task():
    values = t64([0.3, 4.0, 1.7])
    perm = torch.tensor([2, 0, 1])
    torch.testing.assert_close(GLS().loss_weights(values[perm]), GLS().loss_weights(values)[perm])
    torch.testing.assert_close(GLS().loss_weights(t64([5.0])), t64([1.0]))


@pytest.mark.parametrize("values", [[1.0, 0.0, 2.0], [1.0, -0.5]])
def test_gls_needs_positive_losses(values):
    with pytest.raises(ValueError, match=r"losses: GLS needs positive losses.*task\(s\) \[1\]"):
        GLS().loss_weights(t64(values))


def test_gls_end_to_end_equals_autograd_of_geometric_mean():
    net = double_net(2)
    opt = MultiTaskOptimizer(torch.optim.SGD(net.parameters(), lr=0.05), weighting=GLS())
    losses = net.losses(*batch64(0))
    opt.backward(losses, retain_graph=True)
    gm = torch.stack(losses).prod() ** (1.0 / len(losses))
    expected = torch.autograd.grad(gm, list(net.parameters()), allow_unused=True)
    for p, g in zip(net.parameters(), expected):
        if g is None:
            assert p.grad is None
        else:
            torch.testing.assert_close(p.grad, g, rtol=1e-9, atol=1e-12)


# ============================================================================ DWA
class DWAReference:
    """DWA (Liu et al. 2019, Eq. 7) with period averages kept in plain lists."""

    def __init__(self, m: int, temperature: float, period: int) -> None:
        self.m, self.temperature, self.period = m, temperature, period
        self.current: list[list[float]] = []
        self.averages: list[list[float]] = []

    def weights(self) -> list[float]:
        if len(self.averages) < 2:
            return [1.0] * self.m
        last, before = self.averages[-1], self.averages[-2]
        ratios = [a / b for a, b in zip(last, before)]
        exps = [math.exp(r / self.temperature) for r in ratios]
        return [self.m * e / sum(exps) for e in exps]

    def observe(self, losses: list[float]) -> None:
        self.current.append(losses)
        if len(self.current) == self.period:
            self.averages.append([sum(col) / self.period for col in zip(*self.current)])
            self.current = []


@pytest.mark.parametrize("period", [1, 3])
@pytest.mark.parametrize("temperature", [2.0, 0.5])
@pytest.mark.parametrize("m", [1, 2, 4])
def test_dwa_matches_reference(period, temperature, m):
    w = DWA(temperature=temperature, period=period)
    ref = DWAReference(m, temperature, period)
    for step, losses in enumerate(loss_sequence(period + m, m, 4 * period + 2)):
        before = w.state_dict()
        c = w.loss_weights(losses)
        assert_states_equal(before, w.state_dict())  # pure
        torch.testing.assert_close(c, t64(ref.weights()), rtol=1e-12, atol=1e-14)
        assert float(c.sum()) == pytest.approx(m, rel=1e-12)
        if step < 2 * period:
            assert torch.equal(c, torch.ones(m, dtype=F64))
        w.observe(losses, after_step=True)  # ignored
        w.observe(losses, after_step=False)
        ref.observe(losses.tolist())


def test_dwa_weights_move_towards_slow_tasks():
    w = DWA()
    for losses in ([1.0, 1.0], [0.5, 1.0]):  # task 0 halved, task 1 stalled
        w.observe(t64(losses), after_step=False)
    c = w.loss_weights(t64([1.0, 1.0]))
    assert c[1] > c[0]


def test_dwa_checkpoint_roundtrip_mid_period():
    a = DWA(period=2)
    sequence = loss_sequence(1, 3, 12)
    for losses in sequence[:5]:
        a.observe(losses, after_step=False)
    b = DWA(period=2)
    b.load_state_dict(roundtrip(a.state_dict()))
    for losses in sequence[5:]:
        assert torch.equal(a.loss_weights(losses), b.loss_weights(losses))
        a.observe(losses, after_step=False)
        b.observe(losses, after_step=False)


@pytest.mark.parametrize(
    "history", [[[0.0, 1.0], [2.0, 1.0]], [[1e-300, 1.0], [1e300, 1.0]], [[0.0, 0.0], [0.0, 0.0]]]
)
def test_dwa_degenerate_histories_give_finite_weights(history):
    w = DWA(temperature=0.5)
    for losses in history:
        w.observe(t64(losses), after_step=False)
    c = w.loss_weights(t64([1.0, 1.0]))
    assert c.shape == (2,) and torch.isfinite(c).all()


@pytest.mark.parametrize(
    "kwargs", [{"temperature": 0}, {"temperature": -1.0}, {"temperature": "a"}]
)
def test_dwa_bad_temperature(kwargs):
    with pytest.raises((TypeError, ValueError), match="temperature"):
        DWA(**kwargs)


@pytest.mark.parametrize("period", [0, 1.5, True])
def test_dwa_bad_period(period):
    with pytest.raises((TypeError, ValueError), match="period"):
        DWA(period=period)


def test_dwa_end_to_end():
    def factors(history, values):
        ref = DWAReference(3, 2.0, 1)
        for losses in history:
            ref.observe(losses)
        return ref.weights()

    run_end_to_end(DWA(), factors, steps=5)


# ============================================================================ STCH
EPS20 = 1e-20


def stch_objective(values: list[float], nadir: list[float], mu: float) -> float:
    """m mu log sum exp(log(L_i / nadir_i + 1e-20) / mu), as in the authors' code."""
    u = [math.log(v / n + EPS20) / mu for v, n in zip(values, nadir)]
    top = max(u)
    return len(values) * mu * (top + math.log(sum(math.exp(x - top) for x in u)))


def log_objective(values: list[float]) -> float:
    return sum(math.log(v + EPS20) for v in values)


class STCHReference:
    def __init__(self, m: int, mu: float, warmup: int, nadir_steps: int) -> None:
        self.m, self.mu, self.warmup, self.nadir_steps = m, mu, warmup, nadir_steps
        self.seen: list[list[float]] = []
        self.nadir: list[float] | None = None

    def weights(self, values: list[float]) -> list[float]:
        if self.nadir is None:
            return [central_difference(log_objective, values, i) for i in range(self.m)]
        nadir = self.nadir
        return [
            central_difference(lambda v: stch_objective(v, nadir, self.mu), values, i)
            for i in range(self.m)
        ]

    def observe(self, values: list[float]) -> None:
        self.seen.append(values)
        if self.nadir is None and len(self.seen) == self.warmup + self.nadir_steps:
            window = self.seen[self.warmup :]
            self.nadir = [sum(col) / len(window) for col in zip(*window)]


@pytest.mark.parametrize(
    "mu,warmup,nadir_steps,m", [(1.0, 0, 1, 3), (0.5, 2, 2, 2), (3.0, 1, 3, 4), (1.0, 0, 1, 1)]
)
def test_stch_matches_finite_differences_through_its_phases(mu, warmup, nadir_steps, m):
    w = STCH(mu=mu, warmup_steps=warmup, nadir_steps=nadir_steps)
    ref = STCHReference(m, mu, warmup, nadir_steps)
    for losses in loss_sequence(m + warmup, m, warmup + nadir_steps + 4):
        before = w.state_dict()
        c = w.loss_weights(losses)
        assert_states_equal(before, w.state_dict())
        torch.testing.assert_close(c, t64(ref.weights(losses.tolist())), rtol=1e-6, atol=0)
        w.observe(losses, after_step=True)  # ignored
        w.observe(losses, after_step=False)
        ref.observe(losses.tolist())
    assert w.nadir is not None
    torch.testing.assert_close(w.nadir, t64(ref.nadir), rtol=1e-12, atol=0)


def test_stch_weights_favour_the_worst_normalised_task():
    w = STCH(mu=0.1)
    w.observe(t64([2.0, 2.0]), after_step=False)  # nadir (2, 2)
    c = w.loss_weights(t64([1.0, 1.9]))
    # Almost all weight on task 1 (largest L / nadir), scaled by 1 / L_1.
    assert c[1] == pytest.approx(2.0 / 1.9, rel=1e-2)
    assert c[0] < c[1] / 100


def test_stch_permutation_equivariant_after_warmup():
    losses = t64([0.2, 3.0, 1.1])
    perm = torch.tensor([1, 2, 0])
    a, b = STCH(), STCH()
    a.observe(t64([1.0, 2.0, 0.5]), after_step=False)
    b.observe(t64([1.0, 2.0, 0.5])[perm], after_step=False)
    torch.testing.assert_close(b.loss_weights(losses[perm]), a.loss_weights(losses)[perm])


@pytest.mark.parametrize(
    "nadir,losses",
    [([0.0, 1.0], [0.0, 2.0]), ([1e-10, 1e15], [1e15, 1e-10]), ([1.0, 1.0], [0.0, 0.0])],
)
def test_stch_degenerate_inputs_give_finite_weights(nadir, losses):
    w = STCH(mu=0.5)
    assert torch.isfinite(w.loss_weights(t64(losses))).all()
    w.observe(t64(nadir), after_step=False)
    c = w.loss_weights(t64(losses))
    assert c.shape == (2,) and torch.isfinite(c).all()


def test_stch_negative_loss_raises():
    with pytest.raises(ValueError, match=r"losses: STCH needs non-negative losses"):
        STCH().loss_weights(t64([1.0, -0.1]))


def test_stch_checkpoint_roundtrip_during_nadir_window():
    a = STCH(mu=0.7, warmup_steps=1, nadir_steps=3)
    sequence = loss_sequence(4, 3, 9)
    for losses in sequence[:3]:
        a.observe(losses, after_step=False)
    b = STCH(mu=0.7, warmup_steps=1, nadir_steps=3)
    b.load_state_dict(roundtrip(a.state_dict()))
    for losses in sequence[3:]:
        assert torch.equal(a.loss_weights(losses), b.loss_weights(losses))
        a.observe(losses, after_step=False)
        b.observe(losses, after_step=False)
    assert torch.equal(a.nadir, b.nadir)


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"mu": 0.0}, "mu"),
        ({"mu": -1.0}, "mu"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"warmup_steps": 2.0}, "warmup_steps"),
        ({"nadir_steps": 0}, "nadir_steps"),
    ],
)
def test_stch_bad_hyperparameters(kwargs, name):
    with pytest.raises((TypeError, ValueError), match=name):
        STCH(**kwargs)


def test_stch_end_to_end():
    def factors(history, values):
        ref = STCHReference(3, 1.0, 1, 1)
        for losses in history:
            ref.observe(losses)
        return ref.weights(values)

    # The reference factors are finite differences (about 1e-8 relative error).
    run_end_to_end(STCH(warmup_steps=1, nadir_steps=1), factors, steps=4, rtol=1e-6)


def test_observe_is_wired_in_the_optimizer():
    """The stateful loss methods above learn through ``observe``: the optimizer calls it."""
    net = double_net(3)
    w = DWA()
    opt = MultiTaskOptimizer(torch.optim.SGD(net.parameters(), lr=0.05), weighting=w)
    for step in range(3):
        opt.zero_grad()
        opt.step(net.losses(*batch64(step)))
    assert opt.weightings()[0].last_average is not None
