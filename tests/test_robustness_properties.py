"""Hypothesis: every weighting gives finite updates of the right shape on hard Jacobians.

Zero, identical, opposite, collinear and rank-deficient Jacobians, one task up to 64, scales
from 1e-10 to 1e15, float32 and float64, over several calls (stateful methods keep state).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from mtlopt.weighting.base import REGISTRY

from .method_kit import FACTORIES, FIXED_TASKS, direction

STRUCTURES = ["random", "zero", "identical", "opposite", "collinear", "rank2", "one-hot rows"]
#: Examples run per method (the count goes into the README's robustness report).
EXAMPLES = 12


def hard_jacobian(structure: str, m: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(m, n, generator=g, dtype=torch.float64)
    row = torch.randn(1, n, generator=g, dtype=torch.float64)
    if structure == "zero":
        return torch.zeros(m, n, dtype=torch.float64)
    if structure == "identical":
        return row.repeat(m, 1)
    if structure == "opposite":
        signs = torch.tensor([(-1.0) ** i for i in range(m)], dtype=torch.float64)
        return signs[:, None] * row
    if structure == "collinear":
        return torch.rand(m, 1, generator=g, dtype=torch.float64) * 3 * row
    if structure == "rank2":
        basis = torch.randn(2, n, generator=g, dtype=torch.float64)
        return torch.randn(m, 2, generator=g, dtype=torch.float64) @ basis
    if structure == "one-hot rows":
        return torch.eye(m, n, dtype=torch.float64)
    return base


@pytest.mark.parametrize("name", sorted(name for name in FACTORIES if name in REGISTRY))
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    structure=st.sampled_from(STRUCTURES),
    m=st.sampled_from([1, 2, 3, 7, 16, 64]),
    n=st.integers(1, 24),
    exponent=st.integers(-10, 15),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**16),
)
# Opposite 1-D gradients whose float32 Gramian is slightly indefinite (once NaN in NashMTL).
@example(structure="random", m=2, n=1, exponent=0, dtype=torch.float32, seed=0)
def test_finite_updates_on_hard_jacobians(
    name: str, structure: str, m: int, n: int, exponent: int, dtype: torch.dtype, seed: int
) -> None:
    m = FIXED_TASKS.get(name, m)
    if dtype == torch.float32:
        exponent = min(exponent, 8)  # squared norms must stay inside float32's range
    jacobian = (hard_jacobian(structure, m, n, seed) * 10.0**exponent).to(dtype)
    losses = torch.rand(m, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + 0.1
    torch.manual_seed(seed)
    weighting = FACTORIES[name]()
    for _ in range(2):
        update = direction(weighting, jacobian, losses)
        assert update.shape == (n,)
        assert torch.isfinite(update).all(), (name, structure, m, exponent, update)
