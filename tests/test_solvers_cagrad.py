"""CAGrad's inner solver against scipy's generic constrained solver and a duality certificate.

The problem is ``min_{w in simplex} w^T G 1/m + r sqrt(w^T G w)``. The references are
``scipy.optimize.minimize`` (SLSQP, several starts, the result projected back onto the
simplex so its objective is a true upper bound) and weak duality: for any ``d`` with
``||d - g_0|| <= r``, ``min_i g_i^T d`` is a lower bound on the minimum.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mtlopt.solvers import cagrad_cpu, host_linalg
from mtlopt.solvers.cagrad import conflict_averse_weights
from tests.references import simplex_minimum

scipy_optimize = pytest.importorskip("scipy.optimize")


def objective(jacobian: np.ndarray, weights: np.ndarray, radius: float) -> float:
    g_w = jacobian.T @ weights
    return float(g_w @ jacobian.mean(0) + radius * np.linalg.norm(g_w))


def scipy_minimum(jacobian: np.ndarray, radius: float) -> np.ndarray:
    """SLSQP from the uniform point and near every vertex; the best feasible result."""
    gramian = jacobian @ jacobian.T
    m = gramian.shape[0]
    linear = gramian.mean(1)

    def value(w: np.ndarray) -> float:
        return float(w @ linear + radius * np.sqrt(max(w @ gramian @ w, 0.0)))

    def gradient(w: np.ndarray) -> np.ndarray:
        return linear + radius * (gramian @ w) / np.sqrt(max(w @ gramian @ w, 1e-300))

    return simplex_minimum(value, gradient, m)


def random_problem(seed: int, square_or_wide: bool = True) -> tuple[np.ndarray, float]:
    rng = np.random.default_rng(seed)
    m = int(rng.integers(2, 7))
    n = int(rng.integers(m, m + 5)) if square_or_wide else int(rng.integers(1, m))
    jacobian = rng.normal(size=(m, n)) * np.exp(rng.normal(size=(m, 1)))
    if seed % 3 == 0:
        jacobian += 2.0 * rng.normal(size=(1, n))  # a shared component
    c = [0.0, 0.1, 0.4, 0.7, 0.9, 2.0, 10.0][seed % 7]
    return jacobian, c * float(np.linalg.norm(jacobian.mean(0)))


def solve(jacobian: np.ndarray, radius: float) -> np.ndarray:
    gramian = torch.from_numpy(jacobian @ jacobian.T)
    return conflict_averse_weights(gramian, radius).numpy()


@pytest.mark.parametrize("seed", range(24))
@pytest.mark.parametrize("square_or_wide", [True, False], ids=["m<=n", "m>n"])
def test_objective_matches_scipy(seed: int, square_or_wide: bool) -> None:
    jacobian, radius = random_problem(seed, square_or_wide)
    ours = solve(jacobian, radius)
    assert ours.min() >= 0 and abs(ours.sum() - 1.0) < 1e-12
    reference = scipy_minimum(jacobian, radius)
    scale = (jacobian**2).sum(1).max() * (1.0 + radius / np.linalg.norm(jacobian, axis=1).max())
    gap = objective(jacobian, ours, radius) - objective(jacobian, reference, radius)
    assert gap <= 1e-10 * scale  # never worse than the generic solver
    assert gap >= -1e-6 * scale  # and not much better (scipy is near-optimal too)


@pytest.mark.parametrize("seed", range(16))
def test_weights_match_scipy_where_unique(seed: int) -> None:
    """Full row rank and 0 < c < 1: strictly convex on the simplex, one minimiser."""
    rng = np.random.default_rng(100 + seed)
    m = int(rng.integers(2, 6))
    jacobian = rng.normal(size=(m, m + 3)) * np.exp(rng.normal(size=(m, 1)))
    radius = [0.1, 0.4, 0.7][seed % 3] * float(np.linalg.norm(jacobian.mean(0)))
    np.testing.assert_allclose(solve(jacobian, radius), scipy_minimum(jacobian, radius), atol=1e-6)


@pytest.mark.parametrize("seed", range(24))
def test_duality_certificate(seed: int) -> None:
    """``d = g_0 + r g_w / ||g_w||`` is feasible for the primal and closes the gap."""
    jacobian, radius = random_problem(seed)
    weights = solve(jacobian, radius)
    g_w = jacobian.T @ weights
    if radius == 0 or np.linalg.norm(g_w) <= 1e-6 * np.linalg.norm(jacobian, axis=1).max():
        pytest.skip("the direction g_w / ||g_w|| is undefined here")
    d = jacobian.mean(0) + radius * g_w / np.linalg.norm(g_w)
    lower = float((jacobian @ d).min())
    upper = objective(jacobian, weights, radius)
    assert upper - lower <= 1e-9 * (jacobian**2).sum(1).max() * (1.0 + radius)


def test_zero_radius_is_the_best_vertex() -> None:
    jacobian = np.array([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [-0.5, -0.1, 1.0]])
    weights = solve(jacobian, 0.0)
    linear = (jacobian @ jacobian.T).mean(1)
    np.testing.assert_allclose(weights, np.eye(3)[np.argmin(linear)], atol=1e-9)


def test_large_radius_tends_to_the_min_norm_point() -> None:
    """As r grows the problem becomes ``min ||g_w||`` (MGDA), checked against scipy."""
    rng = np.random.default_rng(7)
    jacobian = rng.normal(size=(4, 6))
    gramian = jacobian @ jacobian.T
    result = scipy_optimize.minimize(
        lambda w: w @ gramian @ w,
        np.full(4, 0.25),
        jac=lambda w: 2.0 * gramian @ w,
        method="SLSQP",
        bounds=[(0.0, None)] * 4,
        constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1.0}],
        options={"ftol": 1e-16, "maxiter": 1000},
    )
    np.testing.assert_allclose(solve(jacobian, 1e6), result.x, atol=1e-5)


@pytest.mark.parametrize("scale", [1e-10, 1e-3, 1.0, 1e7, 1e15])
def test_scale_free(scale: float) -> None:
    rng = np.random.default_rng(3)
    jacobian = rng.normal(size=(4, 5))
    radius = 0.5 * float(np.linalg.norm(jacobian.mean(0)))
    base = solve(jacobian, radius)
    gramian = torch.from_numpy(jacobian @ jacobian.T) * scale**2
    scaled = conflict_averse_weights(gramian, radius * scale).numpy()
    np.testing.assert_allclose(scaled, base, atol=1e-10)


@pytest.mark.parametrize(
    "rows",
    [
        [[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]],  # all zero
        [[1.0, 2.0], [1.0, 2.0], [1.0, 2.0]],  # duplicates
        [[1.0, 2.0], [-1.0, -2.0], [0.5, 0.1]],  # opposite pair
        [[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]],  # a zero row
        [[3.0, 4.0]],  # one task
    ],
)
@pytest.mark.parametrize("c", [0.0, 0.5, 3.0])
def test_degenerate_inputs_stay_on_the_simplex(rows: list[list[float]], c: float) -> None:
    jacobian = np.array(rows)
    radius = c * float(np.linalg.norm(jacobian.mean(0)))
    weights = solve(jacobian, radius)
    assert weights.shape == (len(rows),)
    assert np.isfinite(weights).all() and weights.min() >= 0
    assert abs(weights.sum() - 1.0) < 1e-12
    if np.abs(jacobian).sum() > 0:
        reference = scipy_minimum(jacobian, radius)
        scale = (jacobian**2).sum(1).max() * (1.0 + c)
        assert (
            objective(jacobian, weights, radius)
            <= objective(jacobian, reference, radius) + 1e-9 * scale
        )


@pytest.mark.parametrize("seed", range(24))
def test_host_active_set_matches_the_tensor_one(seed: int, monkeypatch) -> None:
    """On the CPU with few tasks the first active-set attempt runs on Python floats: where
    it returns, it is certified and equals the tensor method's answer (the same steps on
    the same face) to 1e-12; where it gives up, the tensor solver answers, as it would
    have without it."""
    jacobian, radius = random_problem(seed)
    gramian = torch.from_numpy(jacobian @ jacobian.T)
    answers = []
    host = cagrad_cpu.active_set_on_host
    monkeypatch.setattr(
        cagrad_cpu, "active_set_on_host", lambda *a: answers.append(host(*a)) or answers[-1]
    )
    with_host = conflict_averse_weights(gramian, radius)
    monkeypatch.setattr(host_linalg, "HOST_MAX_TASKS", 0)
    without = conflict_averse_weights(gramian, radius)
    torch.testing.assert_close(with_host, without, rtol=0, atol=1e-12)
    if answers and answers[0] is not None:
        # Certified: weak duality bounds the objective within the solver's tolerance.
        g_w = jacobian.T @ with_host.numpy()
        bound = min(jacobian @ (jacobian.mean(0) + radius * g_w / np.linalg.norm(g_w)))
        gap = objective(jacobian, with_host.numpy(), radius) - bound
        assert gap <= 1e-9 * (1.0 + np.abs(jacobian).max() ** 2)


def test_host_active_set_is_used_and_leaves_dependent_tasks_to_the_tensor_solver(monkeypatch):
    """Independent tasks: the host answers. Duplicate tasks (a singular face): it declines
    and the tensor solver's answer is returned."""
    rng = np.random.default_rng(5)
    independent = rng.normal(size=(6, 40))
    duplicated = np.concatenate([independent[:3], independent[:3]])
    answers = []
    host = cagrad_cpu.active_set_on_host
    monkeypatch.setattr(
        cagrad_cpu, "active_set_on_host", lambda *a: answers.append(host(*a)) or answers[-1]
    )
    for jacobian, used in [(independent, True), (duplicated, False)]:
        answers.clear()
        radius = 0.4 * float(np.linalg.norm(jacobian.mean(0)))
        weights = solve(jacobian, radius)
        assert len(answers) == 1 and (answers[0] is not None) == used
        assert (
            objective(jacobian, weights, radius)
            <= objective(jacobian, scipy_minimum(jacobian, radius), radius) + 1e-9
        )
