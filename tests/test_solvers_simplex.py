"""project_simplex against scipy's generic constrained solver and brute-force KKT checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mtlopt.solvers import project_simplex

scipy_optimize = pytest.importorskip("scipy.optimize")


def scipy_projection(point: np.ndarray, total: float) -> np.ndarray:
    m = point.shape[0]
    result = scipy_optimize.minimize(
        lambda w: 0.5 * np.sum((w - point) ** 2),
        np.full(m, total / m),
        jac=lambda w: w - point,
        bounds=[(0, None)] * m,
        constraints=[{"type": "eq", "fun": lambda w: w.sum() - total, "jac": lambda w: np.ones(m)}],
        method="SLSQP",
        options={"ftol": 1e-15, "maxiter": 1000},
    )
    return result.x


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(-1e3, 1e3), min_size=1, max_size=12),
    st.sampled_from([1.0, 2.5]),
)
def test_matches_generic_solver(values: list[float], total: float) -> None:
    point = torch.tensor(values, dtype=torch.float64)
    ours = project_simplex(point, total)
    reference = scipy_projection(point.numpy(), total)
    assert ours.min() >= 0
    assert ours.sum().item() == pytest.approx(total, rel=1e-12)
    # Optimality: the objective is strictly convex, so values must agree closely.
    np.testing.assert_allclose(ours.numpy(), reference, atol=1e-6 * max(1.0, np.abs(values).max()))


def test_batched_rows_match_single_calls() -> None:
    points = torch.randn(7, 5, dtype=torch.float64) * 3
    batched = project_simplex(points)
    for row, expected in zip(points, batched):
        assert torch.equal(project_simplex(row), expected)


@pytest.mark.parametrize(
    ("point", "expected"),
    [
        ([0.2, 0.3, 0.5], [0.2, 0.3, 0.5]),  # already on the simplex
        ([5.0, 0.0, 0.0], [1.0, 0.0, 0.0]),  # a vertex
        ([1.0, 1.0], [0.5, 0.5]),  # ties
        ([-3.0], [1.0]),  # one task
    ],
)
def test_known_projections(point: list[float], expected: list[float]) -> None:
    result = project_simplex(torch.tensor(point, dtype=torch.float64))
    torch.testing.assert_close(result, torch.tensor(expected, dtype=torch.float64))


@pytest.mark.parametrize("magnitude", [1e11, 1e20, -1e20])
def test_huge_inputs_stay_on_the_simplex(magnitude: float) -> None:
    point = torch.tensor([magnitude, magnitude, magnitude * (1 - 1e-3)], dtype=torch.float64)
    result = project_simplex(point)
    assert result.sum().item() == pytest.approx(1.0, abs=1e-12)
    expected = [0.5, 0.5, 0.0] if magnitude > 0 else [0.0, 0.0, 1.0]
    torch.testing.assert_close(result, torch.tensor(expected, dtype=torch.float64))
