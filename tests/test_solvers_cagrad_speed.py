"""CAGrad's inner solver on CPU (early exits, active set, exact reductions) against
independent references, at the sizes and structures of real multi-task problems.

References: scipy's SLSQP over the simplex (``tests.references.simplex_minimum``) and the
duality certificate computed from the Jacobian in numpy: for ``d = g_0 + r g_w / ||g_w||``
(inside CAGrad's ball), ``min_i g_i^T d`` is a lower bound on the minimum. The fixed-count
path (``early_exit=False``, what other devices run) is compared where the minimiser is
unique.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mtlopt.solvers.cagrad import conflict_averse_weights
from tests.references import simplex_minimum

pytest.importorskip("scipy.optimize")

KINDS = ["independent", "correlated", "shared", "conflicting", "scales", "duplicates", "lowrank"]


def jacobian_of(kind: str, m: int, seed: int, n: int = 300) -> np.ndarray:
    """Task gradients shaped like real ones: near-orthogonal, a few correlated or
    conflicting, a shared component, spread norms, duplicates, low rank."""
    rng = np.random.default_rng(seed)
    jacobian = rng.normal(size=(m, n))
    if kind == "correlated":
        jacobian[1:4] += 2.0 * jacobian[0]
    elif kind == "shared":
        jacobian += 0.5 * rng.normal(size=(1, n))
    elif kind == "conflicting":
        jacobian[1::2] -= 0.8 * jacobian[0]
    elif kind == "scales":
        jacobian *= np.exp(rng.normal(size=(m, 1)))
    elif kind == "duplicates":
        jacobian[1] = jacobian[0]
        jacobian[3] = jacobian[2]
    elif kind == "lowrank":
        jacobian = rng.normal(size=(m, 3)) @ rng.normal(size=(3, n))
    return jacobian


def objective(jacobian: np.ndarray, weights: np.ndarray, radius: float) -> float:
    g_w = jacobian.T @ weights
    return float(g_w @ jacobian.mean(0) + radius * np.linalg.norm(g_w))


def scale_of(jacobian: np.ndarray, radius: float) -> float:
    largest = float(np.sqrt((jacobian**2).sum(1).max()))
    return largest**2 * (1.0 + radius / largest) if largest > 0 else 1.0


def scipy_minimum(jacobian: np.ndarray, radius: float) -> np.ndarray:
    gramian = jacobian @ jacobian.T
    linear = gramian.mean(1)

    def value(w: np.ndarray) -> float:
        return float(w @ linear + radius * np.sqrt(max(w @ gramian @ w, 0.0)))

    def gradient(w: np.ndarray) -> np.ndarray:
        return linear + radius * (gramian @ w) / np.sqrt(max(w @ gramian @ w, 1e-300))

    return simplex_minimum(value, gradient, gramian.shape[0])


def solve(jacobian: np.ndarray, radius: float, early_exit: bool | None = None) -> np.ndarray:
    gramian = torch.from_numpy(jacobian @ jacobian.T)
    weights = conflict_averse_weights(gramian, radius, early_exit=early_exit)
    assert weights.dtype == torch.float64 and weights.shape == (jacobian.shape[0],)
    weights = weights.numpy()
    assert np.isfinite(weights).all() and weights.min() >= 0
    assert abs(weights.sum() - 1.0) < 1e-12
    return weights


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("m", [10, 40])
@pytest.mark.parametrize("c", [0.2, 0.4, 0.8])
def test_duality_certificate_at_realistic_sizes(kind: str, m: int, c: float) -> None:
    jacobian = jacobian_of(kind, m, seed=m + int(10 * c))
    radius = c * float(np.linalg.norm(jacobian.mean(0)))
    weights = solve(jacobian, radius)
    g_w = jacobian.T @ weights
    scale = scale_of(jacobian, radius)
    if np.linalg.norm(g_w) <= 1e-6 * np.sqrt((jacobian**2).sum(1).max()):
        pytest.skip("g_w = 0: the direction of the certificate is undefined")
    d = jacobian.mean(0) + radius * g_w / np.linalg.norm(g_w)
    lower = float((jacobian @ d).min())
    assert objective(jacobian, weights, radius) - lower <= 1e-11 * scale


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("c", [0.4, 1.5])
def test_objective_matches_scipy_at_moderate_sizes(kind: str, c: float) -> None:
    jacobian = jacobian_of(kind, 12, seed=7)
    radius = c * float(np.linalg.norm(jacobian.mean(0)))
    ours = solve(jacobian, radius)
    reference = scipy_minimum(jacobian, radius)
    gap = objective(jacobian, ours, radius) - objective(jacobian, reference, radius)
    scale = scale_of(jacobian, radius)
    assert gap <= 1e-10 * scale
    assert gap >= -1e-6 * scale


@pytest.mark.parametrize("seed", range(12))
def test_early_exit_matches_the_fixed_path_where_unique(seed: int) -> None:
    """Full row rank and 0 < c < 1: one minimiser, which both paths must find."""
    rng = np.random.default_rng(300 + seed)
    m = int(rng.integers(2, 9))
    jacobian = rng.normal(size=(m, m + 4)) * np.exp(0.5 * rng.normal(size=(m, 1)))
    if seed % 2:
        jacobian += rng.normal(size=(1, m + 4))
    radius = [0.1, 0.4, 0.7][seed % 3] * float(np.linalg.norm(jacobian.mean(0)))
    early = solve(jacobian, radius, early_exit=True)
    fixed = solve(jacobian, radius, early_exit=False)
    np.testing.assert_allclose(early, fixed, atol=1e-7)
    scale = scale_of(jacobian, radius)
    assert objective(jacobian, early, radius) <= objective(jacobian, fixed, radius) + 1e-13 * scale


def test_cpu_default_is_the_early_exit_path() -> None:
    jacobian = jacobian_of("correlated", 10, seed=1)
    gramian = torch.from_numpy(jacobian @ jacobian.T)
    assert torch.equal(
        conflict_averse_weights(gramian, 0.3),
        conflict_averse_weights(gramian, 0.3, early_exit=True),
    )


@pytest.mark.parametrize("kind", ["correlated", "scales", "shared"])
def test_permutation_and_scale_at_m_20(kind: str) -> None:
    jacobian = jacobian_of(kind, 20, seed=5)
    radius = 0.4 * float(np.linalg.norm(jacobian.mean(0)))
    base = solve(jacobian, radius)
    order = np.random.default_rng(0).permutation(20)
    np.testing.assert_allclose(solve(jacobian[order], radius), base[order], atol=1e-9)
    for scale in [1e-8, 1e6]:
        np.testing.assert_allclose(solve(jacobian * scale, radius * scale), base, atol=1e-9)


@pytest.mark.parametrize("c", [0.0, 0.3, 0.9, 3.0])
@pytest.mark.parametrize("zeros", [1, 3])
def test_zero_gradient_tasks(c: float, zeros: int) -> None:
    """Tasks with zero gradients (e.g. no labels in the batch) are set aside exactly."""
    rng = np.random.default_rng(zeros)
    jacobian = rng.normal(size=(8, 12))
    jacobian[-zeros:] = 0.0
    radius = c * float(np.linalg.norm(jacobian.mean(0)))
    ours = solve(jacobian, radius)
    reference = scipy_minimum(jacobian, radius)
    scale = scale_of(jacobian, radius)
    assert (
        objective(jacobian, ours, radius) <= objective(jacobian, reference, radius) + 1e-10 * scale
    )


@pytest.mark.parametrize("c", [1.0, 2.5])
def test_zero_in_the_hull_with_wide_ball(c: float) -> None:
    """c >= 1 and 0 in the convex hull: the minimum is 0, at g_w = 0."""
    rng = np.random.default_rng(11)
    jacobian = rng.normal(size=(6, 9))
    jacobian[5] = -(jacobian[0] + 2.0 * jacobian[1]) / 3.0  # 0 = (g_0 + 2 g_1 + 3 g_5) / 6
    radius = c * float(np.linalg.norm(jacobian.mean(0)))
    ours = solve(jacobian, radius)
    scale = scale_of(jacobian, radius)
    assert abs(objective(jacobian, ours, radius)) <= 1e-9 * scale
    reference = scipy_minimum(jacobian, radius)
    assert (
        objective(jacobian, ours, radius) <= objective(jacobian, reference, radius) + 1e-9 * scale
    )


@pytest.mark.parametrize(
    "rows",
    [
        [[0.0, 0.0]] * 12,
        [[1.0, 2.0]] * 12,
        [[1.0, 2.0], [-1.0, -2.0]] * 6,
        [[1.0, 0.0], [0.0, 0.0], [0.0, 1.0], [2.0, 0.0], [0.0, 0.0], [-1.0, 1.0]],
        [[3.0, 4.0]],
    ],
)
@pytest.mark.parametrize("c", [0.0, 0.4, 3.0])
@pytest.mark.parametrize("scale", [1e-10, 1.0, 1e15])
def test_degenerate_inputs(rows: list[list[float]], c: float, scale: float) -> None:
    jacobian = np.array(rows) * scale
    radius = c * float(np.linalg.norm(jacobian.mean(0)))
    weights = solve(jacobian, radius)
    if np.abs(jacobian).sum() > 0:
        reference = scipy_minimum(jacobian, radius)
        assert objective(jacobian, weights, radius) <= objective(
            jacobian, reference, radius
        ) + 1e-9 * scale_of(jacobian, radius)


@pytest.mark.parametrize("kind", ["correlated", "shared", "conflicting", "scales"])
def test_fixed_path_keeps_up_with_the_barrier_path_at_forty_tasks(kind: str) -> None:
    """The synchronisation-free path of the other devices, at m = 40, is as good as SLSQP
    (with four Newton steps per stage it was up to 1e-3 worse)."""
    jacobian = jacobian_of(kind, 40, seed=5)
    radius = 0.5 * float(np.linalg.norm(jacobian.mean(0)))
    fixed = solve(jacobian, radius, early_exit=False)
    reference = scipy_minimum(jacobian, radius)
    scale = scale_of(jacobian, radius)
    assert (
        objective(jacobian, fixed, radius) <= objective(jacobian, reference, radius) + 1e-8 * scale
    )
