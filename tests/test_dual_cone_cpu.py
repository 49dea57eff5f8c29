"""UPGrad's and DualProj's CPU shortcut (``mtlopt.solvers.dual_cone_cpu``) against scipy.

The shortcut fuses the two normalisations, solves every problem's first pivoting face in
one batched LU and certifies it on the host; where a face is not optimal it pivots on from
there. Both branches are checked against a generic solver on the conditioned Gramian, with
preferences that are positive, negative and zero.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mtlopt.weighting as W
from mtlopt.solvers import dual_cone_cpu, min_norm

from .test_solvers_qp import scipy_dual_cone


def conditioned(gram: np.ndarray, reg_eps: float = 1e-4) -> np.ndarray:
    return gram / np.trace(gram) + reg_eps * np.eye(gram.shape[0])


def gramian(seed: int, m: int, shared: float) -> np.ndarray:
    """Random gradients; ``shared`` adds a common component (tasks that mostly agree, whose
    optima the first face holds) to independent ones (which often need more faces)."""
    rng = np.random.default_rng(seed)
    jac = rng.normal(size=(m, m + 6)) * np.exp(rng.normal(size=(m, 1)))
    jac += shared * np.abs(jac).mean() * rng.normal(size=(1, m + 6))
    return jac @ jac.T


def count_fallbacks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    pivoted = dual_cone_cpu._pivoted
    monkeypatch.setattr(dual_cone_cpu, "_pivoted", lambda *a: calls.append(1) or pivoted(*a))
    return calls


@pytest.mark.parametrize("m", [2, 3, 6, 10, 16])
@pytest.mark.parametrize("shared", [0.0, 3.0])
@pytest.mark.parametrize("preference", ["mean", "signed"])
def test_upgrad_and_dualproj_match_scipy(m, shared, preference, monkeypatch) -> None:
    fallbacks = count_fallbacks(monkeypatch)
    for seed in range(4):
        gram = gramian(100 * m + seed, m, shared)
        if preference == "mean":
            p = np.full(m, 1.0 / m)
        else:  # negative, zero and positive entries
            p = np.random.default_rng(seed).normal(size=m)
            p[0] = 0.0
        q = conditioned(gram)
        expected_up = sum(scipy_dual_cone(q, p[i] * np.eye(m)[i]) for i in range(m))
        expected_dual = scipy_dual_cone(q, p)
        pref = None if preference == "mean" else p.tolist()
        g = torch.tensor(gram)
        for weighting, expected in [
            (W.UPGrad(pref), expected_up),
            (W.DualProj(pref), expected_dual),
        ]:
            weights = weighting.weights_from_gramian(g, torch.ones(m, dtype=torch.float64))
            # The updates J^T w agree (through the conditioned Gramian).
            difference = weights.numpy() - expected
            error = np.sqrt(max(difference @ q @ difference, 0.0))
            assert error <= 1e-6 * (np.sqrt(expected @ q @ expected) + 1.0), (weights, expected)
    if shared and m > 2:
        assert len(fallbacks) < 8  # agreeing tasks: the first face is (nearly) always it


def test_both_branches_run_and_agree_with_the_general_path(monkeypatch) -> None:
    """First face certified (correlated tasks) and pivoting on (independent ones): the same
    weights as the general tensor path (the interior point, PIVOT_ON_CPU off) to 1e-9."""
    fallbacks = count_fallbacks(monkeypatch)
    branches = set()
    for seed in range(12):
        gram = torch.tensor(gramian(seed, 10, 3.0 if seed % 2 else 0.0))
        before = len(fallbacks)
        fast = W.UPGrad().weights_from_gramian(gram, torch.ones(10, dtype=torch.float64))
        branches.add(len(fallbacks) > before)
        with monkeypatch.context() as patch:
            patch.setattr(min_norm, "PIVOT_ON_CPU", False)
            reference = W.UPGrad().weights_from_gramian(gram, torch.ones(10, dtype=torch.float64))
        torch.testing.assert_close(fast, reference, rtol=1e-9, atol=1e-12)
    assert branches == {False, True}


@pytest.mark.parametrize(
    "gram", [np.zeros((3, 3)), np.diag([1e-6, 0.0, 0.0]), np.full((2, 2), np.nan)]
)
def test_special_gramians_leave_the_shortcut(gram) -> None:
    """A trace below norm_eps (the general path's zero case) or not finite: no answer."""
    answer = dual_cone_cpu.preference_projections_on_cpu(
        torch.tensor(gram), [0.5] * len(gram), True, 1e-4, 1e-4
    )
    assert answer is None
