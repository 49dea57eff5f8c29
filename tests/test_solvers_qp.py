"""The min-norm and dual-cone QP solvers against scipy, exact enumeration and KKT certificates.

References are independent of the library: scipy.optimize's generic constrained solvers, an
exhaustive enumeration of supports (exact for small m), the primal form of the dual-cone
projection (a projection in the gradients' own space), and the optimality conditions.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mtlopt.solvers.min_norm as min_norm_module
from mtlopt.solvers import host_linalg
from mtlopt.solvers.dual_cone import dual_cone_weights
from mtlopt.solvers.min_norm import min_norm_weights, nonnegative_qp

scipy_optimize = pytest.importorskip("scipy.optimize")

# ======================================================================================
# Test problems
# ======================================================================================

DEGENERACIES = ("none", "duplicate", "zero", "opposite", "rank1", "collinear")


def make_jacobian(seed: int, m: int, n: int, degeneracy: str = "none", spread: float = 2.0):
    """A random m x n Jacobian with row norms spread over ``exp(+-spread)``, made degenerate."""
    rng = np.random.default_rng(seed)
    jac = rng.normal(size=(m, n)) * np.exp(rng.normal(size=(m, 1)) * spread)
    if degeneracy == "duplicate" and m > 1:
        jac[1] = jac[0]
    elif degeneracy == "zero":
        jac[0] = 0.0
    elif degeneracy == "opposite" and m > 1:
        jac[1] = -0.3 * jac[0]
    elif degeneracy == "rank1":
        jac = np.outer(rng.normal(size=m), rng.normal(size=n))
    elif degeneracy == "collinear" and m > 2:
        jac[2] = 0.5 * jac[0] + 0.5 * jac[1]
    return jac


def problems():
    """(seed, m, n, degeneracy) covering wide, tall, square and every degeneracy."""
    cases = []
    for seed in range(5):
        for degeneracy in DEGENERACIES:
            m = 1 + (seed * 3 + len(degeneracy)) % 7
            n = 1 + (seed * 5 + 2 * len(degeneracy)) % 9
            cases.append((seed, m, n, degeneracy))
    return cases


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Thousands of tiny batched LUs: OpenMP threads only add contention on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


PATHS = ["enumeration", "pivoting", "interior_point"]


def use_path(patch: pytest.MonkeyPatch, name: str) -> None:
    """Make :func:`nonnegative_qp` take one of its three exact methods whatever the size."""
    enumerate_all = 2**62 if name == "enumeration" else 0
    patch.setattr(min_norm_module, "ENUMERATION_LIMIT", enumerate_all)
    patch.setattr(min_norm_module, "CPU_ENUMERATION_LIMIT", enumerate_all)
    patch.setattr(min_norm_module, "PIVOT_ON_CPU", name == "pivoting")


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    """Run a test through each exact method (face enumeration, pivoting, interior point)."""
    use_path(monkeypatch, request.param)
    return request.param


# ======================================================================================
# References
# ======================================================================================


def scipy_min_norm(gram: np.ndarray) -> np.ndarray:
    m = gram.shape[0]
    scale = max(gram.diagonal().max(), 1e-300)
    g = gram / scale
    result = scipy_optimize.minimize(
        lambda w: w @ g @ w,
        np.full(m, 1.0 / m),
        jac=lambda w: 2 * g @ w,
        bounds=[(0, None)] * m,
        constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1, "jac": lambda w: np.ones(m)}],
        method="SLSQP",
        options={"ftol": 1e-16, "maxiter": 2000},
    )
    return result.x


def enumerated_min_norm(gram: np.ndarray) -> float:
    """The exact minimum of w^T G w on the simplex: best feasible stationary point of every face."""
    m = gram.shape[0]
    best = np.inf
    for k in range(1, m + 1):
        for support in itertools.combinations(range(m), k):
            idx = list(support)
            kkt = np.zeros((k + 1, k + 1))
            kkt[:k, :k] = gram[np.ix_(idx, idx)]
            kkt[:k, k] = kkt[k, :k] = 1.0
            rhs = np.zeros(k + 1)
            rhs[k] = 1.0
            sol = np.linalg.lstsq(kkt, rhs, rcond=None)[0][:k]
            if sol.min() >= -1e-12:
                w = np.zeros(m)
                w[idx] = np.clip(sol, 0, None)
                w /= w.sum()
                best = min(best, w @ gram @ w)
    return best


def scipy_dual_cone_primal(jac: np.ndarray, u: np.ndarray) -> np.ndarray:
    """The projection of J^T u onto {d : J d >= 0}, solved in the gradients' space."""
    target = jac.T @ u
    scale = max(np.abs(jac).max(), 1e-300)
    rows = jac / scale
    result = scipy_optimize.minimize(
        lambda d: 0.5 * np.sum((d - target) ** 2),
        target.copy(),
        jac=lambda d: d - target,
        constraints=[{"type": "ineq", "fun": lambda d: rows @ d, "jac": lambda d: rows}],
        method="SLSQP",
        options={"ftol": 1e-16, "maxiter": 2000},
    )
    return result.x


def scipy_dual_cone(gram: np.ndarray, u: np.ndarray) -> np.ndarray:
    """min v^T G v s.t. v >= u with trust-constr, polished by SLSQP."""
    m = gram.shape[0]
    result = scipy_optimize.minimize(
        lambda v: v @ gram @ v,
        np.maximum(u, 0) + 1.0,
        jac=lambda v: 2 * gram @ v,
        bounds=[(ui, None) for ui in u],
        method="SLSQP",
        options={"ftol": 1e-16, "maxiter": 2000},
    )
    assert result.success or m == 0, result.message
    return result.x


def min_norm_np(gram: np.ndarray) -> np.ndarray:
    return min_norm_weights(torch.tensor(gram)).numpy()


# ======================================================================================
# min_norm_weights
# ======================================================================================


@pytest.mark.parametrize("seed, m, n, degeneracy", problems())
def test_min_norm_matches_enumeration_and_scipy(path, seed, m, n, degeneracy):
    jac = make_jacobian(seed, m, n, degeneracy)
    gram = jac @ jac.T
    w = min_norm_np(gram)
    scale = max(gram.diagonal().max(), 1e-300)
    assert w.shape == (m,) and np.all(np.isfinite(w))
    assert w.min() >= 0 and abs(w.sum() - 1) < 1e-12
    # The exact minimum over every face, and scipy's generic solver.
    assert (w @ gram @ w - enumerated_min_norm(gram)) / scale <= 1e-12
    ref = scipy_min_norm(gram)
    assert (w @ gram @ w - ref @ gram @ ref) / scale <= 1e-12
    # The min-norm point itself is unique (even when w is not): compare it.
    d, d_ref = w @ jac, ref @ jac
    np.testing.assert_allclose(d, d_ref, rtol=0, atol=1e-6 * np.sqrt(scale))


@settings(max_examples=25, deadline=None)
@given(
    st.integers(0, 10_000),
    st.integers(1, 10),
    st.integers(1, 12),
    st.sampled_from(DEGENERACIES),
    st.floats(0.0, 4.0),
)
@pytest.mark.parametrize("method", PATHS)
def test_min_norm_kkt_certificate(method, seed, m, n, degeneracy, spread):
    """w is optimal iff it is feasible and (G w)_i >= w^T G w for every i (first-order KKT)."""
    jac = make_jacobian(seed, m, n, degeneracy, spread)
    gram = jac @ jac.T
    with pytest.MonkeyPatch.context() as patch:
        use_path(patch, method)
        w = min_norm_np(gram)
    scale = max(gram.diagonal().max(), 1e-300)
    assert w.min() >= 0 and abs(w.sum() - 1) < 1e-12
    value = w @ gram @ w
    # Round-off: with gradient scales spread over 1e4, G spans 1e8, so float64 solves of
    # rank-deficient supports carry relative errors around 1e-11 of the largest entry.
    assert (gram @ w).min() >= value - 1e-10 * scale


@pytest.mark.parametrize("scale", [1e-20, 1e-10, 1.0, 1e15, 1e30])
def test_min_norm_scale_invariant(path, scale):
    jac = make_jacobian(3, 5, 7)
    gram = jac @ jac.T
    np.testing.assert_allclose(min_norm_np(gram * scale), min_norm_np(gram), atol=1e-10)


def test_min_norm_special_cases(path):
    # m = 1, all zero, one zero row (the min-norm point is 0), opposite rows.
    assert min_norm_np(np.array([[4.0]])).tolist() == [1.0]
    np.testing.assert_allclose(min_norm_np(np.zeros((3, 3))), np.full(3, 1 / 3))
    jac = make_jacobian(0, 4, 5, "zero")
    w = min_norm_np(jac @ jac.T)
    # Degenerate (not strictly complementary): exact up to the purification ridge's 1e-14.
    assert np.linalg.norm(w @ jac) < 1e-9 * np.abs(jac).max()
    jac = np.array([[1.0, 2.0], [-2.0, -4.0]])
    w = min_norm_np(jac @ jac.T)
    np.testing.assert_allclose(w, [2 / 3, 1 / 3], atol=1e-12)
    # Duplicates: the symmetric answer splits their weight.
    jac = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    w = min_norm_np(jac @ jac.T)
    np.testing.assert_allclose(w @ jac, [0.5, 0.5], atol=1e-12)


def test_min_norm_two_tasks_closed_form():
    """m = 2: a = clip((g2 - g1) . g2 / ||g1 - g2||^2, 0, 1) on g1 (Sener and Koltun, Alg. 1)."""
    rng = np.random.default_rng(7)
    for _ in range(20):
        g1, g2 = rng.normal(size=(2, 4)) * np.exp(rng.normal(size=(2, 1)))
        a = np.clip((g2 - g1) @ g2 / np.sum((g1 - g2) ** 2), 0, 1)
        jac = np.stack([g1, g2])
        np.testing.assert_allclose(min_norm_np(jac @ jac.T), [a, 1 - a], atol=1e-10)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.integers(2, 8), st.integers(1, 10))
def test_min_norm_permutation_equivariant(seed, m, n):
    jac = make_jacobian(seed, m, n)
    perm = np.random.default_rng(seed).permutation(m)
    w = min_norm_np(jac @ jac.T)
    w_perm = min_norm_np(jac[perm] @ jac[perm].T)
    # The point is unique; the weights too when J has full row rank.
    np.testing.assert_allclose(w_perm @ jac[perm], w @ jac, atol=1e-7 * np.abs(jac).max())
    if n >= m:
        np.testing.assert_allclose(w_perm, w[perm], atol=1e-8)


def test_min_norm_dtype_device_and_input_validation():
    gram = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float32)
    w = min_norm_weights(gram)
    assert w.dtype == torch.float64 and w.device == gram.device
    with pytest.raises(ValueError, match="gramian"):
        min_norm_weights(torch.ones(2, 3))


def test_min_norm_many_tasks():
    jac = make_jacobian(11, 40, 25, spread=1.0)
    gram = jac @ jac.T
    w = min_norm_np(gram)
    assert (gram @ w).min() >= w @ gram @ w - 1e-11 * gram.diagonal().max()


@pytest.mark.parametrize("on_host", [True, False], ids=["host", "tensors"])
@pytest.mark.parametrize("seed", range(6))
def test_full_face_shortcut_solves_interior_optima_and_declines_the_rest(
    seed, on_host, monkeypatch
):
    """On the CPU the simplex's first face (every weight free) is solved directly, on
    Python floats up to 16 tasks, else in torch: where the optimum is interior
    (near-orthogonal rows) that answer is the exact one, taken without pivoting; where it
    is not (correlated rows, an optimum on a smaller face) the shortcut declines and
    pivoting finds the enumeration's optimum."""
    use_path(monkeypatch, "pivoting")
    monkeypatch.setattr(host_linalg, "HOST_MAX_TASKS", 16 if on_host else 0)
    rng = np.random.default_rng(seed)
    m = 6 + seed
    pivots = []
    pivoting = min_norm_module._principal_pivoting
    monkeypatch.setattr(
        min_norm_module, "_principal_pivoting", lambda *a: pivots.append(1) or pivoting(*a)
    )
    near_orthogonal = rng.normal(size=(m, 400)) * np.exp(rng.normal(size=(m, 1)) * 0.5)
    correlated = rng.normal(size=(m, 3 * m)) + 2.0 * rng.normal(size=(1, 3 * m))
    correlated[0] *= 5.0  # a long row gets weight 0 at the min-norm point
    for jac, interior in [(near_orthogonal, True), (correlated, False)]:
        gram = jac @ jac.T
        pivots.clear()
        w = min_norm_np(gram)
        assert bool(w.min() > 0) == interior
        assert bool(pivots) != interior
        assert w.min() >= 0 and abs(w.sum() - 1) < 1e-12
        scale = gram.diagonal().max()
        assert (w @ gram @ w - enumerated_min_norm(gram)) / scale <= 1e-12
        # KKT: every task's slope is at least the min-norm point's squared norm.
        assert (gram @ w).min() >= w @ gram @ w - 1e-12 * scale


def test_nonnegative_qp_batch_matches_single_rows(path):
    jac = make_jacobian(2, 5, 6)
    gram = torch.tensor(jac @ jac.T / (jac @ jac.T).diagonal().max())
    linear = torch.tensor(np.random.default_rng(0).normal(size=(4, 5)))
    batched = nonnegative_qp(gram, linear)
    for row, expected in zip(linear, batched):
        torch.testing.assert_close(nonnegative_qp(gram, row), expected, rtol=0, atol=1e-12)


# ======================================================================================
# dual_cone_weights
# ======================================================================================


def assert_dual_cone_kkt(gram, u, v, tol):
    """v solves min v^T G v s.t. v >= u iff v >= u, G v >= 0 and (v - u) . G v = 0."""
    gv = gram @ v
    assert (v - u).min() >= -tol
    assert gv.min() >= -tol
    assert np.abs((v - u) * gv).max() <= tol


@pytest.mark.parametrize("seed, m, n, degeneracy", problems())
def test_dual_cone_matches_primal_projection(path, seed, m, n, degeneracy):
    jac = make_jacobian(seed, m, n, degeneracy, spread=1.0)
    gram = jac @ jac.T
    u = np.random.default_rng(seed + 100).normal(size=m)
    v = dual_cone_weights(torch.tensor(gram), torch.tensor(u)).numpy()
    assert np.all(np.isfinite(v)) and (v - u).min() >= 0
    # J^T v is the projection of J^T u onto the dual cone (computed without the Gramian).
    d_ref = scipy_dual_cone_primal(jac, u)
    scale = np.abs(jac).max() * np.abs(u).max()
    np.testing.assert_allclose(v @ jac, d_ref, rtol=0, atol=1e-6 * scale)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 8), st.floats(1e-6, 1.0))
@pytest.mark.parametrize("method", PATHS)
def test_dual_cone_regularised_matches_scipy(method, seed, m, reg):
    """With G positive definite (as UPGrad conditions it) the solution v is unique."""
    jac = make_jacobian(seed, m, m + 2, spread=1.0)
    gram = jac @ jac.T
    gram = gram / np.trace(gram) + reg * np.eye(m)
    u = np.random.default_rng(seed).normal(size=m)
    with pytest.MonkeyPatch.context() as patch:
        use_path(patch, method)
        v = dual_cone_weights(torch.tensor(gram), torch.tensor(u)).numpy()
    assert_dual_cone_kkt(gram, u, v, 1e-12 * max(1.0, np.abs(v).max()))
    ref = scipy_dual_cone(gram, u)
    np.testing.assert_allclose(v, ref, rtol=1e-6, atol=1e-6 * np.abs(u).max())


@pytest.mark.parametrize("degeneracy", DEGENERACIES)
def test_dual_cone_kkt_on_degenerate_gramians(path, degeneracy):
    jac = make_jacobian(5, 5, 3, degeneracy, spread=1.0)
    gram = jac @ jac.T
    rng = np.random.default_rng(1)
    us = rng.normal(size=(6, 5))
    vs = dual_cone_weights(torch.tensor(gram), torch.tensor(us)).numpy()
    for u, v in zip(us, vs):
        tol = 1e-9 * gram.diagonal().max() * max(1.0, np.abs(v).max())
        assert_dual_cone_kkt(gram, u, v, tol)


def test_dual_cone_batch_matches_single_rows_and_scales(path):
    jac = make_jacobian(4, 5, 8)
    gram = torch.tensor(jac @ jac.T)
    us = torch.tensor(np.random.default_rng(4).normal(size=(5, 5)))
    batched = dual_cone_weights(gram, us)
    for u, expected in zip(us, batched):
        torch.testing.assert_close(dual_cone_weights(gram, u), expected, rtol=1e-10, atol=1e-12)
    # Invariant to the Gramian's scale, linear in u's scale.
    for factor in (1e-20, 1e-10, 1e15, 1e30):
        torch.testing.assert_close(
            dual_cone_weights(gram * factor, us), batched, rtol=1e-8, atol=1e-10
        )
    torch.testing.assert_close(
        dual_cone_weights(gram, 1e-8 * us), 1e-8 * batched, rtol=1e-8, atol=0
    )


def test_dual_cone_special_cases(path):
    gram = torch.tensor([[1.0, 0.2], [0.2, 3.0]], dtype=torch.float64)
    u = torch.tensor([0.7, -0.4], dtype=torch.float64)
    # Zero Gramian: the least-norm feasible point max(u, 0).
    torch.testing.assert_close(dual_cone_weights(torch.zeros(2, 2), u), u.clamp(min=0))
    # u = 0: the projection of 0 is 0.
    torch.testing.assert_close(
        dual_cone_weights(gram, torch.zeros(2)), torch.zeros(2, dtype=torch.float64)
    )
    # Already in the cone: nothing moves (non-negative u with a non-negative G).
    torch.testing.assert_close(dual_cone_weights(gram, u.abs()), u.abs(), rtol=1e-12, atol=1e-14)
    # m = 1.
    torch.testing.assert_close(
        dual_cone_weights(torch.tensor([[2.0]]), torch.tensor([-3.0])),
        torch.tensor([0.0], dtype=torch.float64),
        rtol=0,
        atol=1e-12,
    )
    with pytest.raises(ValueError, match="u"):
        dual_cone_weights(gram, torch.ones(3))


@pytest.mark.parametrize("other", ["pivoting", "interior_point"])
@pytest.mark.parametrize("on_simplex", [True, False])
def test_exact_methods_agree(on_simplex, other, monkeypatch):
    """The exact methods reach the same optimum on random and degenerate problems."""
    for seed, m, n, degeneracy in problems():
        jac = make_jacobian(seed, m, n, degeneracy, spread=1.0)
        gram = jac @ jac.T
        quadratic = torch.tensor(gram / max(gram.diagonal().max(), 1e-300))
        linear = torch.zeros(1, m, dtype=torch.float64)
        if not on_simplex:
            linear = torch.tensor(np.random.default_rng(seed).normal(size=(3, m))) @ quadratic
        use_path(monkeypatch, "enumeration")
        exact = nonnegative_qp(quadratic, linear, on_simplex)
        use_path(monkeypatch, other)
        interior = nonnegative_qp(quadratic, linear, on_simplex)
        monkeypatch.undo()
        torch.testing.assert_close(
            qp_objective(quadratic, linear, interior),
            qp_objective(quadratic, linear, exact),
            rtol=0,
            atol=1e-11,
        )


def qp_objective(quadratic, linear, x):
    return 0.5 * ((x @ quadratic) * x).sum(-1) + (linear * x).sum(-1)


@pytest.mark.parametrize("on_simplex", [True, False])
def test_pivoting_hands_unsolved_problems_to_the_interior_point(on_simplex, monkeypatch):
    """With no swaps allowed, pivoting solves only the problems its first face answers; the
    interior point finishes the rest, and the optimum is the enumeration's."""
    rng = np.random.default_rng(3)
    jac = rng.normal(size=(6, 10)) + 1.0  # correlated rows: the optimum is on a small face
    quadratic = torch.tensor(jac @ jac.T / np.max(np.diag(jac @ jac.T)))
    linear = torch.tensor(rng.normal(size=(5, 6)))
    if on_simplex:
        linear = torch.zeros(5, 6, dtype=torch.float64)
    use_path(monkeypatch, "enumeration")
    exact = nonnegative_qp(quadratic, linear, on_simplex)
    use_path(monkeypatch, "pivoting")
    monkeypatch.setattr(min_norm_module, "PIVOT_LIMIT", 0)
    calls = []
    interior = min_norm_module._interior_point
    monkeypatch.setattr(
        min_norm_module, "_interior_point", lambda *a: calls.append(1) or interior(*a)
    )
    pivoted = nonnegative_qp(quadratic, linear, on_simplex)
    assert calls, "the interior point should have finished the unsolved problems"
    torch.testing.assert_close(
        qp_objective(quadratic, linear, pivoted),
        qp_objective(quadratic, linear, exact),
        rtol=0,
        atol=1e-11,
    )
