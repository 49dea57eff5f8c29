"""The shared property kit, applied to every registered weighting.

Degenerate Jacobians give finite updates of the right shape; non-conflicting methods never
conflict; order-free methods are permutation-equivariant. Values are pinned per method in its
own test file against an independent reference.
"""

from __future__ import annotations

import pytest
import torch

import mtlopt.weighting as weighting_module
from mtlopt.weighting.base import REGISTRY

from .method_kit import FACTORIES, FIXED_TASKS, NON_CONFLICTING, ORDER_FREE, direction


def _jacobians(m: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(m)
    base = torch.randn(m, 7, generator=g, dtype=torch.float64)
    row = torch.randn(1, 7, generator=g, dtype=torch.float64)
    cases = {
        "random": base,
        "zero": torch.zeros(m, 7, dtype=torch.float64),
        "duplicate": row.repeat(m, 1),
        "rank1": torch.linspace(0.5, 2.0, m, dtype=torch.float64)[:, None] * row,
        "one zero row": torch.cat([base[:-1], torch.zeros(1, 7, dtype=torch.float64)]),
        "tiny": base * 1e-10,
        "huge": base * 1e15,
        "mixed scales": base * torch.logspace(-6, 6, m, dtype=torch.float64)[:, None],
    }
    if m >= 2:
        cases["opposite"] = torch.cat([row, -row, base[2:]])
    return cases


CASES = [(m, case) for m in (1, 2, 3, 5) for case in _jacobians(m)]


def test_every_registered_weighting_is_in_the_kit() -> None:
    assert set(REGISTRY) - set(FACTORIES) == set()


def test_available_lists_every_weighting_with_its_needs() -> None:
    listed = weighting_module.available()
    assert set(listed) == set(REGISTRY)
    for name, info in listed.items():
        assert info["needs"] in {"losses", "gramian", "jacobian"}
        assert info["summary"], f"{name} has no docstring summary"


def _names() -> list[str]:
    return sorted(name for name in FACTORIES if name in REGISTRY)


@pytest.mark.parametrize("name", _names())
@pytest.mark.parametrize(("m", "case"), CASES, ids=[f"m{m}-{c}" for m, c in CASES])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_degenerate_jacobians_give_finite_updates(name: str, m: int, case: str, dtype: torch.dtype) -> None:
    if FIXED_TASKS.get(name, m) != m:
        pytest.skip(f"{name} is built for {FIXED_TASKS[name]} tasks")
    jacobian = _jacobians(m)[case]
    if dtype == torch.float32 and case == "huge":
        jacobian = jacobian * 1e-15 * 1e10  # keep the Gramian inside float32's range
    jacobian = jacobian.to(dtype)
    losses = torch.linspace(0.5, 2.0, m, dtype=torch.float64)
    torch.manual_seed(0)
    weighting = FACTORIES[name]()
    for _ in range(3):  # stateful methods: the state must stay finite too
        update = direction(weighting, jacobian, losses)
        assert update.shape == (7,)
        assert torch.isfinite(update).all(), f"{name} on {case}: {update}"


@pytest.mark.parametrize("name", sorted(set(NON_CONFLICTING) & set(REGISTRY)))
@pytest.mark.parametrize("seed", range(5))
def test_non_conflicting(name: str, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    m = 2 + seed % 4
    jacobian = torch.randn(m, 6, generator=g, dtype=torch.float64)
    jacobian[0] = -jacobian[1] + 0.1 * torch.randn(6, generator=g, dtype=torch.float64)
    update = direction(NON_CONFLICTING[name](), jacobian, torch.ones(m, dtype=torch.float64))
    products = jacobian @ update
    assert (products >= -1e-6 * jacobian.norm() * update.norm()).all(), products


@pytest.mark.parametrize("name", sorted(ORDER_FREE & set(REGISTRY)))
@pytest.mark.parametrize("seed", range(3))
def test_permutation_equivariance(name: str, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    m = 4
    jacobian = torch.randn(m, 6, generator=g, dtype=torch.float64) * torch.tensor([1.0, 3.0, 0.2, 1.5])[:, None]
    losses = torch.tensor([0.7, 1.3, 2.0, 0.4], dtype=torch.float64)
    order = torch.randperm(m, generator=g)
    first = direction(FACTORIES[name](), jacobian, losses)
    permuted = direction(FACTORIES[name](), jacobian[order], losses[order])
    torch.testing.assert_close(permuted, first, rtol=1e-6, atol=1e-9)
