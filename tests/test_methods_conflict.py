"""PCGrad, CAGrad, IMGrad, Nash-MTL and FairGrad against independent references.

The references work on explicit per-task gradient vectors: PCGrad as the paper's plain loop
(with the same random orders), CAGrad through its primal problem and IMGrad through the
paper's objective, both solved by ``scipy.optimize.minimize``, Nash-MTL and FairGrad through
``scipy.optimize.root`` / ``least_squares`` on their positive fixed-point systems.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mtlopt.solvers.bargaining as bargaining_module
import mtlopt.solvers.bargaining_host as bargaining_host_module
from mtlopt import MultiTaskOptimizer
from mtlopt.solvers import host_linalg
from mtlopt.solvers.bargaining import bargaining_weights
from mtlopt.weighting.base import Weighting
from mtlopt.weighting.cagrad import CAGrad, IMGrad
from mtlopt.weighting.fairgrad import FairGrad
from mtlopt.weighting.nash_mtl import NashMTL
from mtlopt.weighting.pcgrad import PCGrad
from tests.conftest import Net, make_batch
from tests.references import simplex_minimum

scipy_optimize = pytest.importorskip("scipy.optimize")

# ======================================================================================
# Helpers
# ======================================================================================


def gramian_of(jacobian: torch.Tensor) -> torch.Tensor:
    flat = jacobian.reshape(jacobian.shape[0], -1).to(torch.float64)
    return flat @ flat.T


def losses_for(m: int) -> torch.Tensor:
    return torch.ones(m, dtype=torch.float64)


def update(weighting: Weighting, jacobian: torch.Tensor) -> torch.Tensor:
    weights = weighting.weights_from_gramian(gramian_of(jacobian), losses_for(jacobian.shape[0]))
    assert weights.dtype == torch.float64 and weights.shape == (jacobian.shape[0],)
    return weights @ jacobian.to(torch.float64)


def random_jacobian(seed: int, m: int, n: int, spread: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scales = torch.exp(spread * torch.randn(m, 1, generator=g, dtype=torch.float64))
    return torch.randn(m, n, generator=g, dtype=torch.float64) * scales


def assert_close_update(ours: torch.Tensor, reference: np.ndarray, rtol: float = 1e-6) -> None:
    reference_t = torch.as_tensor(reference, dtype=torch.float64)
    error = (ours - reference_t).norm()
    assert error <= rtol * reference_t.norm() + 1e-12, (ours, reference_t)


# ======================================================================================
# PCGrad
# ======================================================================================


def draw_orders(generator: torch.Generator, m: int) -> list[list[int]]:
    """The random orders, drawn as documented: uniform keys per (i, j), self excluded."""
    keys = torch.rand(m, m, generator=generator, dtype=torch.float64).tolist()
    return [sorted((j for j in range(m) if j != i), key=lambda j: keys[i][j]) for i in range(m)]


def copy_generator(weighting: PCGrad) -> torch.Generator:
    generator = torch.Generator()
    generator.set_state(weighting._generator.get_state())
    return generator


def pcgrad_reference(rows: list[list[float]], orders: list[list[int]]) -> list[float]:
    """Yu et al. 2020, Algorithm 1, over explicit vectors: d = sum_i g_i^PC."""

    def dot(a: list[float], b: list[float]) -> float:
        return sum(x * y for x, y in zip(a, b))

    d = [0.0] * len(rows[0])
    for i, row in enumerate(rows):
        projected = list(row)
        for j in orders[i]:
            inner = dot(projected, rows[j])
            if inner < 0:
                factor = inner / dot(rows[j], rows[j])
                projected = [a - factor * b for a, b in zip(projected, rows[j])]
        d = [a + b for a, b in zip(d, projected)]
    return d


@pytest.mark.parametrize("seed,m,n", [(0, 2, 3), (1, 3, 5), (2, 5, 4), (3, 7, 9), (4, 4, 2)])
def test_pcgrad_matches_plain_loop_over_steps(seed: int, m: int, n: int) -> None:
    weighting = PCGrad(seed=seed)
    generator = copy_generator(weighting)
    for step in range(4):
        jacobian = random_jacobian(10 * seed + step, m, n)
        reference = pcgrad_reference(jacobian.tolist(), draw_orders(generator, m))
        torch.testing.assert_close(
            update(weighting, jacobian),
            torch.tensor(reference, dtype=torch.float64),
            rtol=1e-10,
            atol=1e-12,
        )


def test_pcgrad_torchjd_pinned_value() -> None:
    jacobian = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(
        update(PCGrad(seed=0), jacobian),
        torch.tensor([0.5848, 3.8012, 3.8012], dtype=torch.float64),
        atol=1e-4,
        rtol=0,
    )


def test_pcgrad_without_conflict_is_the_sum() -> None:
    jacobian = torch.tensor(
        [[1.0, 0.5, 0.0], [0.2, 1.0, 0.3], [0.0, 0.1, 2.0]], dtype=torch.float64
    )
    weights = PCGrad(seed=1).weights_from_gramian(gramian_of(jacobian), losses_for(3))
    torch.testing.assert_close(weights, torch.ones(3, dtype=torch.float64))


@pytest.mark.parametrize(
    "rows",
    [
        [[0.0, 0.0], [1.0, -1.0], [-1.0, 0.5]],
        [[0.0, 0.0], [0.0, 0.0]],
        [[2.0, 1.0]],
        [[1.0, 1.0], [-1.0, -1.0]],
    ],
)
def test_pcgrad_degenerate_rows(rows: list[list[float]]) -> None:
    jacobian = torch.tensor(rows, dtype=torch.float64)
    weighting = PCGrad(seed=2)
    generator = copy_generator(weighting)
    ours = update(weighting, jacobian)
    m = len(rows)
    # A zero g_j has g_i^PC . g_j = 0: never a conflict, never a division by ||g_j||^2 = 0.
    reference = pcgrad_reference(rows, draw_orders(generator, m))
    torch.testing.assert_close(ours, torch.tensor(reference, dtype=torch.float64))
    if m == 2 and rows[0] == [1.0, 1.0]:
        assert torch.equal(ours, torch.zeros(2, dtype=torch.float64))  # exactly opposite


def test_pcgrad_state_round_trip(tmp_path: Path) -> None:
    weighting = PCGrad(seed=5)
    jacobians = [random_jacobian(50 + k, 5, 6) for k in range(6)]
    for jacobian in jacobians[:2]:
        update(weighting, jacobian)
    torch.save(weighting.state_dict(), tmp_path / "pcgrad.pt")
    restored = PCGrad(seed=99)
    restored.load_state_dict(torch.load(tmp_path / "pcgrad.pt", weights_only=True))
    for jacobian in jacobians[2:]:
        assert torch.equal(update(weighting, jacobian), update(restored, jacobian))


def test_pcgrad_seeding_and_spawn() -> None:
    torch.manual_seed(11)
    first = PCGrad()
    torch.manual_seed(11)
    second = PCGrad()
    assert torch.equal(first._generator.get_state(), second._generator.get_state())
    parent = PCGrad(seed=3)
    children = [parent.spawn(), parent.spawn()]
    states = [w._generator.get_state() for w in [parent, *children]]
    assert not torch.equal(states[0], states[1]) and not torch.equal(states[1], states[2])
    assert torch.equal(PCGrad(seed=3).spawn()._generator.get_state(), states[1])


def test_pcgrad_invalid_seed() -> None:
    with pytest.raises(ValueError, match="seed"):
        PCGrad(seed=-1)


# ======================================================================================
# CAGrad
# ======================================================================================


def cagrad_primal_reference(jacobian: np.ndarray, c: float) -> np.ndarray:
    """``argmax_d min_i g_i^T d`` over ``||d - g_0|| <= c ||g_0||`` (Liu et al. 2021, Sec. 3.1),
    solved directly by SLSQP in ``(d, t)``: maximise ``t`` with ``g_i^T d >= t``."""
    m, n = jacobian.shape
    g0 = jacobian.mean(0)
    radius = c * np.linalg.norm(g0)
    constraints = [
        {
            "type": "ineq",
            "fun": lambda z: jacobian @ z[:n] - z[n],
            "jac": lambda z: np.hstack([jacobian, -np.ones((m, 1))]),
        },
        {
            "type": "ineq",
            "fun": lambda z: radius**2 - np.sum((z[:n] - g0) ** 2),
            "jac": lambda z: np.hstack([-2.0 * (z[:n] - g0), [0.0]]),
        },
    ]
    start = np.hstack([g0, (jacobian @ g0).min()])
    result = scipy_optimize.minimize(
        lambda z: -z[n],
        start,
        jac=lambda z: np.hstack([np.zeros(n), [-1.0]]),
        method="SLSQP",
        constraints=constraints,
        options={"ftol": 1e-15, "maxiter": 2000},
    )
    return result.x[:n]


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("c", [0.1, 0.4, 0.8])
def test_cagrad_matches_primal_reference(seed: int, c: float) -> None:
    m = 2 + seed % 4
    jacobian = random_jacobian(200 + seed, m, m + 2 + seed % 3, spread=1.0)
    reference = cagrad_primal_reference(jacobian.numpy(), c) / (1.0 + c**2)
    assert_close_update(update(CAGrad(c=c), jacobian), reference)


def test_cagrad_rescale_options_and_pinned_value() -> None:
    jacobian = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]], dtype=torch.float64)
    plain = update(CAGrad(c=0.5, rescale=0), jacobian)
    # torchjd's CAGrad(c=0.5) applies no rescaling.
    torch.testing.assert_close(
        plain, torch.tensor([0.1835, 1.2041, 1.2041], dtype=torch.float64), atol=1e-4, rtol=0
    )
    torch.testing.assert_close(update(CAGrad(c=0.5, rescale=1), jacobian), plain / 1.25)
    torch.testing.assert_close(update(CAGrad(c=0.5, rescale=2), jacobian), plain / 1.5)


def test_cagrad_zero_c_is_the_mean() -> None:
    jacobian = random_jacobian(3, 4, 5)
    torch.testing.assert_close(update(CAGrad(c=0.0), jacobian), jacobian.mean(0))


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("c", [0.3, 0.9, 1.0, 2.5])
def test_cagrad_worst_improvement_and_conflict(seed: int, c: float) -> None:
    """Strong duality: the worst task improvement of the unscaled update equals the dual
    minimum; with c >= 1 the ball holds d = 0, so no task is ever hurt."""
    m = 2 + seed % 4
    jacobian = random_jacobian(300 + seed, m, 4)
    jacobian[0] = -0.9 * jacobian[1] + 0.1 * jacobian[0]  # a strong conflict
    d = update(CAGrad(c=c, rescale=0), jacobian)
    g0 = jacobian.mean(0)
    assert (d - g0).norm() <= c * g0.norm() * (1 + 1e-9)
    rows = jacobian.numpy()
    weights = simplex_minimum(
        lambda w: float(w @ rows @ g0.numpy() + c * g0.norm().item() * np.linalg.norm(rows.T @ w)),
        None,
        m,
    )
    dual = float(
        weights @ rows @ g0.numpy() + c * g0.norm().item() * np.linalg.norm(rows.T @ weights)
    )
    scale = jacobian.norm(dim=1).max().item() ** 2
    assert abs((jacobian @ d).min().item() - dual) <= 1e-6 * scale
    if c >= 1:
        assert (jacobian @ d >= -1e-9 * scale).all()


def test_cagrad_pareto_stationary_gives_the_mean() -> None:
    """g_w* = 0 (zero in the hull and c >= 1): the direction is undefined, d = g_0 / divisor."""
    jacobian = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(update(CAGrad(c=2.0), jacobian), jacobian.mean(0) / 5.0)


@pytest.mark.parametrize("c", [-0.1, float("nan"), float("inf"), "0.4", True])
def test_cagrad_invalid_c(c: object) -> None:
    with pytest.raises((TypeError, ValueError), match="c:"):
        CAGrad(c=c)


@pytest.mark.parametrize("rescale", [3, -1, 1.0, True, "1"])
def test_cagrad_invalid_rescale(rescale: object) -> None:
    with pytest.raises(ValueError, match="rescale"):
        CAGrad(rescale=rescale)


# ======================================================================================
# IMGrad
# ======================================================================================


def imgrad_reference(jacobian: np.ndarray, alpha: float) -> np.ndarray:
    """Zhou et al. 2025 as in the authors' ``imgrad``, every sub-problem solved by scipy."""
    m = jacobian.shape[0]
    gramian = jacobian @ jacobian.T
    g0 = jacobian.mean(0)
    mgda = simplex_minimum(lambda w: float(w @ gramian @ w), lambda w: 2.0 * gramian @ w, m)
    g_m = jacobian.T @ mgda
    rho = float(g0 @ g_m / (np.linalg.norm(g0) * np.linalg.norm(g_m)))
    c = alpha * np.linalg.norm(g0)

    def value(w: np.ndarray) -> float:
        return float(
            (1.5 - rho) * (w @ gramian @ np.full(m, 1.0 / m)) + rho * c * np.sqrt(w @ gramian @ w)
        )

    def gradient(w: np.ndarray) -> np.ndarray:
        return (1.5 - rho) * gramian.mean(1) + rho * c * (gramian @ w) / np.sqrt(w @ gramian @ w)

    weights = simplex_minimum(value, gradient, m)
    g_w = jacobian.T @ weights
    return (g0 + c / np.linalg.norm(g_w) * g_w) / (1.0 + alpha**2)


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("alpha", [0.3, 0.8])
def test_imgrad_matches_reference(seed: int, alpha: float) -> None:
    m = 2 + seed % 4
    jacobian = random_jacobian(400 + seed, m, m + 2)
    reference = imgrad_reference(jacobian.numpy(), alpha)
    assert_close_update(update(IMGrad(alpha=alpha), jacobian), reference)


def test_imgrad_aligned_tasks() -> None:
    """Aligned gradients: g_m is the shortest one and rho = cos(g_0, g_m) is close to 1."""
    jacobian = torch.tensor([[1.0, 0.1], [2.0, 0.0], [3.0, 0.3]], dtype=torch.float64)
    reference = imgrad_reference(jacobian.numpy(), 0.8)
    assert_close_update(update(IMGrad(), jacobian), reference)


@pytest.mark.parametrize("alpha", [-1.0, float("nan"), "x"])
def test_imgrad_invalid_alpha(alpha: object) -> None:
    with pytest.raises((TypeError, ValueError), match="alpha"):
        IMGrad(alpha=alpha)


# ======================================================================================
# Nash-MTL and FairGrad
# ======================================================================================


def positive_root(gramian: np.ndarray, power: float) -> np.ndarray:
    """``G w = w^(-power)``, ``w > 0``, by ``scipy.optimize.root`` in ``y = log w``.

    The residual is scaled by ``|G| w + w^(-power)`` (a backward error), which keeps the
    equations well scaled when the weights span orders of magnitude.
    """
    start = -np.log(np.diag(gramian)) / (1.0 + power)  # the solution for orthogonal rows

    def residual(y: np.ndarray) -> np.ndarray:
        w = np.exp(y)
        return (gramian @ w - w ** (-power)) / (np.abs(gramian) @ w + w ** (-power))

    result = scipy_optimize.root(residual, start, method="hybr", options={"xtol": 1e-15})
    assert np.abs(residual(result.x)).max() < 1e-12, "the reference did not converge"
    return np.exp(result.x)


@pytest.mark.parametrize("seed", range(10))
def test_nash_mtl_solves_the_bargaining_system(seed: int) -> None:
    m = 2 + seed % 5
    jacobian = random_jacobian(500 + seed, m, m + 1 + seed % 3, spread=1.5)
    gramian = gramian_of(jacobian)
    weights = NashMTL(max_norm=0.0).weights_from_gramian(gramian, losses_for(m))
    reference = positive_root(gramian.numpy(), 1.0)
    np.testing.assert_allclose(weights.numpy(), reference, rtol=1e-6)
    residual = gramian @ weights - 1.0 / weights
    assert (residual.abs() <= 1e-7 / weights).all()
    # Every task improves, each by exactly 1 / a_i.
    torch.testing.assert_close(jacobian @ (weights @ jacobian), 1.0 / weights, rtol=1e-7, atol=0)


def test_nash_mtl_clipping_and_pinned_value() -> None:
    jacobian = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]], dtype=torch.float64)
    d = update(NashMTL(), jacobian)
    torch.testing.assert_close(
        d, torch.tensor([0.0542, 0.7061, 0.7061], dtype=torch.float64), atol=1e-4, rtol=0
    )
    torch.testing.assert_close(d.norm(), torch.tensor(1.0, dtype=torch.float64))
    unclipped = update(NashMTL(max_norm=0), jacobian)
    torch.testing.assert_close(unclipped.norm() ** 2, torch.tensor(2.0, dtype=torch.float64))  # = m
    torch.testing.assert_close(update(NashMTL(max_norm=5.0), jacobian), unclipped)
    torch.testing.assert_close(
        update(NashMTL(max_norm=0.5), jacobian), unclipped / unclipped.norm() * 0.5
    )


def test_nash_mtl_update_every_and_warm_start() -> None:
    jacobians = [random_jacobian(600 + k, 3, 5) for k in range(7)]
    weighting = NashMTL(update_weights_every=3, max_norm=0.0)
    seen = []
    for jacobian in jacobians:
        seen.append(weighting.weights_from_gramian(gramian_of(jacobian), losses_for(3)))
    assert weighting.step == 7
    for k, weights in enumerate(seen):
        source = jacobians[3 * (k // 3)]
        fresh = NashMTL(max_norm=0.0).weights_from_gramian(gramian_of(source), losses_for(3))
        # Recomputed at steps 0, 3, 6 (warm-started: the same solution as a cold start) ...
        torch.testing.assert_close(weights, fresh, rtol=1e-10, atol=0)
        if k % 3:
            assert torch.equal(weights, seen[k - 1])  # ... and reused in between


def test_nash_mtl_state_round_trip(tmp_path: Path) -> None:
    weighting = NashMTL(update_weights_every=2)
    jacobians = [random_jacobian(700 + k, 4, 6) for k in range(7)]
    for jacobian in jacobians[:3]:
        update(weighting, jacobian)
    torch.save(weighting.state_dict(), tmp_path / "nash.pt")
    restored = NashMTL(update_weights_every=2)
    restored.load_state_dict(torch.load(tmp_path / "nash.pt", weights_only=True))
    assert restored.n_tasks == 4 and restored.step == 3
    for jacobian in jacobians[3:]:
        assert torch.equal(update(weighting, jacobian), update(restored, jacobian))
    with pytest.raises(ValueError, match="4 tasks"):
        restored.check_n_tasks(3)


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"update_weights_every": 0}, "update_weights_every"),
        ({"update_weights_every": 1.5}, "update_weights_every"),
        ({"optim_niter": 0}, "optim_niter"),
        ({"max_norm": -1.0}, "max_norm"),
        ({"max_norm": float("nan")}, "max_norm"),
    ],
)
def test_nash_mtl_invalid_hyperparameters(kwargs: dict, name: str) -> None:
    with pytest.raises((TypeError, ValueError), match=name):
        NashMTL(**kwargs)


def fairgrad_reference(gramian: np.ndarray, alpha: float) -> np.ndarray:
    """The official code's least-squares formulation from ``w = 1/m``, with tight tolerances."""
    m = gramian.shape[0]
    result = scipy_optimize.least_squares(
        lambda w: gramian @ w - np.power(1.0 / w, 1.0 / alpha),
        np.full(m, 1.0 / m),
        bounds=(0.0, np.inf),
        xtol=1e-15,
        ftol=1e-15,
        gtol=1e-15,
        max_nfev=20000,
    )
    return result.x


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0, 5.0])
def test_fairgrad_matches_least_squares(seed: int, alpha: float) -> None:
    m = 2 + seed % 4
    jacobian = random_jacobian(800 + seed, m, m + 2, spread=0.5)
    gramian = gramian_of(jacobian)
    weights = FairGrad(alpha=alpha).weights_from_gramian(gramian, losses_for(m))
    reference = fairgrad_reference(gramian.numpy(), alpha)
    assert np.abs(gramian.numpy() @ reference - reference ** (-1.0 / alpha)).max() < 1e-8
    np.testing.assert_allclose(weights.numpy(), reference, rtol=1e-6)
    # Every task improves: J d = G w = w^(-1/alpha) > 0.
    torch.testing.assert_close(
        jacobian @ (weights @ jacobian), weights ** (-1.0 / alpha), rtol=1e-7, atol=0
    )


@pytest.mark.parametrize("alpha", [0.1, 10.0])
def test_fairgrad_extreme_alpha_with_unequal_scales(alpha: float) -> None:
    jacobian = random_jacobian(900, 4, 6) * torch.logspace(-1, 1, 4, dtype=torch.float64)[:, None]
    gramian = gramian_of(jacobian)
    weights = FairGrad(alpha=alpha).weights_from_gramian(gramian, losses_for(4))
    reference = positive_root(gramian.numpy(), 1.0 / alpha)
    np.testing.assert_allclose(weights.numpy(), reference, rtol=1e-6)
    assert_close_update(weights @ jacobian, reference @ jacobian.numpy(), rtol=1e-8)


def test_fairgrad_alpha_one_is_unclipped_nash() -> None:
    gramian = gramian_of(random_jacobian(901, 4, 5))
    torch.testing.assert_close(
        FairGrad(alpha=1.0).weights_from_gramian(gramian, losses_for(4)),
        NashMTL(max_norm=0.0).weights_from_gramian(gramian, losses_for(4)),
        rtol=1e-12,
        atol=0,
    )


@pytest.mark.parametrize("alpha", [0.0, -1.0, float("inf"), "1"])
def test_fairgrad_invalid_alpha(alpha: object) -> None:
    with pytest.raises((TypeError, ValueError), match="alpha"):
        FairGrad(alpha=alpha)


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    m=st.integers(1, 6),
    extra=st.integers(0, 3),
    alpha=st.sampled_from([0.5, 1.0, 2.0, 4.0]),
)
def test_fairgrad_property_solves_the_system(seed: int, m: int, extra: int, alpha: float) -> None:
    jacobian = random_jacobian(seed, m, m + extra, spread=1.0)
    gramian = gramian_of(jacobian)
    weights = FairGrad(alpha=alpha).weights_from_gramian(gramian, losses_for(m))
    np.testing.assert_allclose(
        weights.numpy(), positive_root(gramian.numpy(), 1.0 / alpha), rtol=1e-6
    )


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("name", ["NashMTL", "FairGrad"])
def test_nearly_opposite_tasks_still_both_improve(seed: int, name: str) -> None:
    jacobian = random_jacobian(950 + seed, 2, 5)
    jacobian[0] = -jacobian[1] + 0.2 * jacobian[0]  # cos(g_1, g_2) close to -1
    weighting = NashMTL(max_norm=0.0) if name == "NashMTL" else FairGrad(alpha=2.0)
    d = update(weighting, jacobian)
    assert (jacobian @ d > 0).all()
    power = 1.0 if name == "NashMTL" else 0.5
    weights = positive_root(gramian_of(jacobian).numpy(), power)
    assert_close_update(d, weights @ jacobian.numpy())


def count_newton_steps(monkeypatch, solver: str) -> list:
    """Make ``bargaining_weights`` use one solver (``"tensor"`` or ``"host"``) and record
    each Newton step it takes (the tensor loop on the CPU tries a full step first)."""
    if solver == "tensor":
        monkeypatch.setattr(host_linalg, "HOST_MAX_TASKS", 0)
    module, names = (
        (bargaining_module, ("_newton_step", "_full_newton_step"))
        if solver == "tensor"
        else (bargaining_host_module, ("_newton_step",))
    )
    steps = []
    for name in names:
        step = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, step=step: steps.append(1) or step(*a))
    return steps


@pytest.mark.parametrize("solver", ["tensor", "host"])
@pytest.mark.parametrize("seed", range(6))
def test_bargaining_stops_at_a_settled_decrement_within_round_off(
    seed, solver, monkeypatch
) -> None:
    """Nash-MTL's solve (p = 1) ends once the Newton decrement proves the step just taken
    landed within round-off: fewer Newton steps than running until a step moves nothing,
    and the same weights to 1e-13 relative (warm-started from a nearby solution, as in
    training)."""
    m = 3 + seed
    jacobian = random_jacobian(700 + seed, m, m + 4, spread=1.0)
    previous = bargaining_weights(gramian_of(jacobian), 1.0, 40)
    moved = jacobian + 0.02 * random_jacobian(800 + seed, m, m + 4)
    gramian = gramian_of(moved)
    steps = count_newton_steps(monkeypatch, solver)
    settled = bargaining_weights(gramian, 1.0, 40, initial=previous)
    settled_steps = len(steps)
    monkeypatch.setattr(bargaining_module, "SETTLED_DECREMENT", 0.0)
    steps.clear()
    confirmed = bargaining_weights(gramian, 1.0, 40, initial=previous)
    assert 0 < settled_steps < len(steps)
    torch.testing.assert_close(settled, confirmed, rtol=1e-13, atol=0)
    np.testing.assert_allclose(settled.numpy(), positive_root(gramian.numpy(), 1.0), rtol=1e-9)


@pytest.mark.parametrize("power", [0.25, 0.5, 1.0, 2.0, 4.0])
@pytest.mark.parametrize("kind", ["random", "zero", "opposite", "spread", "warm"])
def test_bargaining_host_solve_matches_the_tensor_loop(power, kind, monkeypatch) -> None:
    """On the CPU with few tasks the system is solved on Python floats first: the same
    weights as the tensor loop to round-off (1e-10 relative), on well-posed, zero-gradient,
    opposite-gradient, badly scaled and warm-started problems; where the host's plain
    Newton iteration gives up, the tensor loop's answer is returned."""
    for seed in range(4):
        m = 2 + 3 * seed
        jacobian = random_jacobian(1200 + seed, m, m + 3, spread=3.0 if kind == "spread" else 1.0)
        if kind == "zero":
            jacobian[1] = 0.0
        elif kind == "opposite":
            jacobian[1] = -jacobian[0]
        gramian = gramian_of(jacobian)
        initial = None
        if kind == "warm":
            initial = bargaining_weights(gramian_of(jacobian + 0.05), power, 40)
        host_calls = count_newton_steps(monkeypatch, "host")
        host = bargaining_weights(gramian, power, 40, initial=initial)
        monkeypatch.setattr(host_linalg, "HOST_MAX_TASKS", 0)
        tensor = bargaining_weights(gramian, power, 40, initial=initial)
        monkeypatch.undo()
        assert host_calls, "the host solver should have been tried"
        # Opposite gradients: only the 1e-10 ridge bounds the weights, whose condition
        # number is then about 1e10: round-off moves them by 1e-6 relative.
        rtol = 1e-6 if kind == "opposite" else 1e-10
        torch.testing.assert_close(host, tensor, rtol=rtol, atol=1e-300)
        if kind == "zero":
            assert host[1] == 0.0


def test_bargaining_host_hands_hard_problems_to_the_tensor_loop(monkeypatch) -> None:
    """Without iterations enough for the host's Newton method the tensor loop decides."""
    jacobian = random_jacobian(1300, 6, 9, spread=3.0)
    gramian = gramian_of(jacobian)
    monkeypatch.setattr(host_linalg, "HOST_MAX_TASKS", 0)
    expected = bargaining_weights(gramian, 0.5, 40)
    monkeypatch.undo()
    tensor_steps = count_newton_steps(monkeypatch, "tensor")
    monkeypatch.setattr(host_linalg, "HOST_MAX_TASKS", 16)  # the host path goes first
    host_steps = []
    host_step = bargaining_host_module._newton_step
    monkeypatch.setattr(
        bargaining_host_module, "_newton_step", lambda *a: host_steps.append(1) or host_step(*a)
    )
    monkeypatch.setattr(bargaining_host_module, "HALVINGS", 0)  # no step is ever accepted
    result = bargaining_weights(gramian, 0.5, 40)
    assert host_steps and tensor_steps
    torch.testing.assert_close(result, expected, rtol=0, atol=0)


@pytest.mark.parametrize("power", [0.5, 1.0, 2.0])
def test_bargaining_full_newton_steps_reach_the_line_searched_solution(power, monkeypatch) -> None:
    """The CPU's tensor loop takes the full Newton step in ``w`` once it is safe (small
    decrement, weights positive, ``f`` decreasing) instead of searching two directions: the
    same solution as the line-searched iterations alone, to 1e-12 relative, and fewer of
    those."""
    monkeypatch.setattr(host_linalg, "HOST_MAX_TASKS", 0)
    searched = []
    newton_step = bargaining_module._newton_step
    monkeypatch.setattr(
        bargaining_module, "_newton_step", lambda *a: searched.append(1) or newton_step(*a)
    )
    for seed in range(8):
        m = 2 + seed
        gramian = gramian_of(random_jacobian(650 + seed, m, m + 2, spread=1.5))
        searched.clear()
        fast = bargaining_weights(gramian, power, 40)
        fast_searches = len(searched)
        with monkeypatch.context() as patch:
            patch.setattr(bargaining_module, "FULL_STEP", -1.0)  # never: search every step
            searched.clear()
            reference = bargaining_weights(gramian, power, 40)
        assert fast_searches < len(searched)
        torch.testing.assert_close(fast, reference, rtol=1e-12, atol=0)


@pytest.mark.parametrize("power", [0.5, 1.0, 2.0])
def test_bargaining_zero_gradient_task_is_left_out(power: float) -> None:
    """A task whose gradient is zero takes no part: weight 0, the others solved without it."""
    jacobian = random_jacobian(902, 3, 4)
    with_zero = torch.cat([jacobian[:1], torch.zeros(1, 4, dtype=torch.float64), jacobian[1:]])
    weights = bargaining_weights(gramian_of(with_zero), power, 40)
    alone = bargaining_weights(gramian_of(jacobian), power, 40)
    assert weights[1] == 0
    torch.testing.assert_close(weights[[0, 2, 3]], alone, rtol=1e-8, atol=0)


@pytest.mark.parametrize("power", [0.5, 1.0, 2.0])
def test_bargaining_without_common_descent_stays_finite_and_small(power: float) -> None:
    """No direction improves both opposite tasks: finite weights, an update near zero."""
    row = torch.tensor([[1.0, -2.0, 0.5]], dtype=torch.float64)
    for jacobian in [torch.cat([row, -row]), torch.cat([row, -row, 0.3 * row])]:
        weights = bargaining_weights(gramian_of(jacobian), power, 40)
        assert torch.isfinite(weights).all() and (weights > 0).all()
        assert (weights @ jacobian).norm() <= 1e-3 * (weights.abs() @ jacobian.norm(dim=1))


@pytest.mark.parametrize("scale", [1e-10, 1e-3, 1e6, 1e15])
@pytest.mark.parametrize("power", [0.5, 1.0])
def test_bargaining_scale_covariant(scale: float, power: float) -> None:
    gramian = gramian_of(random_jacobian(903, 4, 6))
    base = bargaining_weights(gramian, power, 40)
    scaled = bargaining_weights(gramian * scale, power, 40)
    torch.testing.assert_close(scaled * scale ** (1.0 / (1.0 + power)), base, rtol=1e-10, atol=0)


# ======================================================================================
# Shared properties
# ======================================================================================

ORDER_FREE = {
    "CAGrad": lambda: CAGrad(c=0.6),
    "IMGrad": lambda: IMGrad(alpha=0.5),
    "NashMTL": lambda: NashMTL(),
    "FairGrad": lambda: FairGrad(alpha=2.0),
}


@pytest.mark.parametrize("name", sorted(ORDER_FREE))
def test_permutation_equivariance(name: str) -> None:
    jacobian = random_jacobian(1000, 5, 7, spread=1.0)
    order = torch.tensor([3, 0, 4, 1, 2])
    gramian = gramian_of(jacobian)
    weights = ORDER_FREE[name]().weights_from_gramian(gramian, losses_for(5))
    permuted = ORDER_FREE[name]().weights_from_gramian(gramian[order][:, order], losses_for(5))
    torch.testing.assert_close(permuted, weights[order], rtol=1e-7, atol=1e-12)


FACTORIES = {**ORDER_FREE, "PCGrad": lambda: PCGrad(seed=0)}


def _degenerate_jacobians() -> dict[str, torch.Tensor]:
    row = torch.tensor([[0.3, -1.0, 2.0, 0.5]], dtype=torch.float64)
    base = random_jacobian(1100, 3, 4)
    return {
        "zero": torch.zeros(3, 4, dtype=torch.float64),
        "one zero row": torch.cat([base[:2], torch.zeros(1, 4, dtype=torch.float64)]),
        "duplicate": row.repeat(3, 1),
        "opposite": torch.cat([row, -row, base[:1]]),
        "rank 1": torch.tensor([[0.5], [1.0], [-2.0]], dtype=torch.float64) * row,
        "single": row,
        "tiny": base * 1e-10,
        "huge": base * 1e15,
        "unequal": base * torch.tensor([[1e-6], [1.0], [1e6]], dtype=torch.float64),
    }


@pytest.mark.parametrize("name", sorted(FACTORIES))
@pytest.mark.parametrize("case", sorted(_degenerate_jacobians()))
def test_degenerate_inputs_give_finite_weights(name: str, case: str) -> None:
    jacobian = _degenerate_jacobians()[case]
    weighting = FACTORIES[name]()
    for _ in range(2):
        weights = weighting.weights_from_gramian(
            gramian_of(jacobian), losses_for(jacobian.shape[0])
        )
        assert weights.shape == (jacobian.shape[0],) and weights.dtype == torch.float64
        assert torch.isfinite(weights).all(), (name, case, weights)
        assert torch.isfinite(weights @ jacobian).all()


# ======================================================================================
# End to end through MultiTaskOptimizer
# ======================================================================================


def encoder_jacobian(net: Net, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-task gradients of the shared encoder, one plain autograd.grad call per task."""
    params = list(net.encoder.parameters())
    rows = []
    for loss in net.losses(x, y):
        grads = torch.autograd.grad(loss, params, retain_graph=True)
        rows.append(torch.cat([g.flatten() for g in grads]))
    return torch.stack(rows).to(torch.float64)


def reference_weights(
    name: str, jacobian: torch.Tensor, generator: torch.Generator | None
) -> np.ndarray:
    rows = jacobian.numpy()
    if name == "PCGrad":
        assert generator is not None
        d = pcgrad_reference(jacobian.tolist(), draw_orders(generator, rows.shape[0]))
        return np.asarray(d)
    if name == "CAGrad":
        return cagrad_primal_reference(rows, 0.6) / (1.0 + 0.36)
    if name == "IMGrad":
        return imgrad_reference(rows, 0.5)
    gramian = rows @ rows.T
    if name == "NashMTL":
        weights = positive_root(gramian, 1.0)
        return weights @ rows / max(1.0, math.sqrt(weights @ gramian @ weights))
    return positive_root(gramian, 0.5) @ rows  # FairGrad(alpha=2)


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_end_to_end_encoder_gradient(name: str) -> None:
    torch.manual_seed(0)
    net = Net()
    opt = MultiTaskOptimizer(
        torch.optim.SGD(net.parameters(), lr=0.05), weighting=FACTORIES[name]()
    )
    weighting = opt.weightings()[0]
    for step in range(2):
        x, y = make_batch(step)
        jacobian = encoder_jacobian(net, x, y)
        generator = copy_generator(weighting) if name == "PCGrad" else None
        expected = reference_weights(name, jacobian, generator)
        head_grads = [
            torch.autograd.grad(loss, list(head.parameters()), retain_graph=True)
            for loss, head in zip(net.losses(x, y), net.heads)
        ]
        opt.zero_grad()
        opt.step(net.losses(x, y))
        got = torch.cat([p.grad.flatten() for p in net.encoder.parameters()]).to(torch.float64)
        # float32 gradients: the reference sees the same float32 Jacobian.
        assert_close_update(got, expected, rtol=2e-5)
        for head, grads in zip(net.heads, head_grads):
            for p, g in zip(head.parameters(), grads):
                torch.testing.assert_close(p.grad, g)


def _run(net: Net, opt: MultiTaskOptimizer, steps: range) -> None:
    for step in steps:
        opt.zero_grad()
        opt.step(net.losses(*make_batch(step)))


@pytest.mark.parametrize("name", ["PCGrad", "NashMTL"])
def test_optimizer_checkpoint_resumes_bit_identically(name: str, tmp_path: Path) -> None:
    def build(seed: int) -> tuple[Net, MultiTaskOptimizer]:
        torch.manual_seed(seed)
        net = Net()
        weighting = PCGrad() if name == "PCGrad" else NashMTL(update_weights_every=2)
        return net, MultiTaskOptimizer(
            torch.optim.Adam(net.parameters(), lr=0.01), weighting=weighting
        )

    net_a, opt_a = build(0)
    _run(net_a, opt_a, range(6))
    net_b, opt_b = build(0)
    _run(net_b, opt_b, range(3))
    torch.save({"model": net_b.state_dict(), "opt": opt_b.state_dict()}, tmp_path / "ckpt.pt")
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    net_c, opt_c = build(1234)  # other seeds: the checkpoint must win
    net_c.load_state_dict(saved["model"])
    opt_c.load_state_dict(saved["opt"])
    _run(net_c, opt_c, range(3, 6))
    for p, q in zip(net_a.parameters(), net_c.parameters()):
        assert torch.equal(p, q)
