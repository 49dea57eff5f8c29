"""AlignedMTL, ConFIG and ConicGrad against independent references.

References work on explicit per-task gradient vectors (numpy, float64): Aligned-MTL through
the SVD of ``J``, ConFIG through ``numpy.linalg.pinv`` of the unit rows, ConicGrad through
``scipy.optimize`` over the update ``d`` itself. The library sees only the Gramian.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import minimize

from mtlopt import MultiTaskOptimizer
from mtlopt.solvers.conic import Cone
from mtlopt.weighting.aligned_mtl import AlignedMTL
from mtlopt.weighting.config import ConFIG
from mtlopt.weighting.conicgrad import ConicGrad
from tests.conftest import Net, make_batch

# ======================================================================================
# Helpers
# ======================================================================================


def random_jacobian(
    seed: int, m: int, n: int, shift: float = 0.0, spread: float = 1.0
) -> np.ndarray:
    rng = np.random.default_rng(seed)
    scales = np.logspace(-spread / 2, spread / 2, m)[:, None] if spread else 1.0
    return (rng.normal(size=(m, n)) + shift) * scales


def update(weighting, jacobian: np.ndarray) -> np.ndarray:
    """``d = w^T J`` with the weights the library computes from the Gramian only."""
    J = torch.tensor(jacobian, dtype=torch.float64)
    m = J.shape[0]
    w = weighting.weights_from_gramian(J @ J.T, torch.ones(m, dtype=torch.float64))
    assert w.dtype == torch.float64 and w.shape == (m,)
    return (w @ J).numpy()


def weights_of(weighting, jacobian: np.ndarray) -> torch.Tensor:
    J = torch.tensor(jacobian, dtype=torch.float64)
    return weighting.weights_from_gramian(J @ J.T, torch.ones(J.shape[0], dtype=torch.float64))


DEGENERATE = {
    "zero rows": [[0.0, 0.0, 0.0, 0.0], [1.0, 2.0, 0.0, -1.0], [0.0, 0.0, 0.0, 0.0]],
    "all zero": [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]],
    "duplicate": [[1.0, 2.0, 0.0, -1.0], [1.0, 2.0, 0.0, -1.0], [0.5, -1.0, 3.0, 0.0]],
    "opposite": [[1.0, 2.0, -1.0], [-1.0, -2.0, 1.0]],
    "opposite and more": [[1.0, 2.0, -1.0], [-1.0, -2.0, 1.0], [0.3, 0.1, 0.2]],
    "rank one": [[1.0, 2.0, 3.0], [2.0, 4.0, 6.0], [-0.5, -1.0, -1.5]],
    "single task": [[1.0, -2.0, 0.5]],
    "more tasks than dims": [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 2.0]],
}
SCALES = [1e-10, 1e-3, 1.0, 1e6, 1e15]
ALL = [AlignedMTL, lambda: AlignedMTL("median"), lambda: AlignedMTL("rmse"), ConFIG, ConicGrad]
ALL_IDS = ["aligned-min", "aligned-median", "aligned-rmse", "config", "conicgrad"]


@pytest.mark.parametrize("make", ALL, ids=ALL_IDS)
@pytest.mark.parametrize("name", sorted(DEGENERATE))
@pytest.mark.parametrize("scale", SCALES)
def test_degenerate_inputs_are_finite(make, name: str, scale: float) -> None:
    J = np.array(DEGENERATE[name]) * scale
    w = weights_of(make(), J)
    assert w.shape == (J.shape[0],) and torch.isfinite(w).all(), w
    assert np.isfinite(w.numpy() @ J).all()


@pytest.mark.parametrize("make", ALL, ids=ALL_IDS)
def test_weights_are_scale_free(make) -> None:
    J = random_jacobian(7, 4, 6, shift=0.5)
    reference = weights_of(make(), J)
    for scale in SCALES:
        torch.testing.assert_close(weights_of(make(), J * scale), reference, rtol=1e-7, atol=1e-12)


@pytest.mark.parametrize("make", ALL, ids=ALL_IDS)
@pytest.mark.parametrize("seed", range(3))
def test_permutation_equivariance(make, seed: int) -> None:
    J = random_jacobian(seed, 5, 7, shift=0.7, spread=2.0)
    order = np.random.default_rng(100 + seed).permutation(5)
    first, permuted = weights_of(make(), J), weights_of(make(), J[order])
    torch.testing.assert_close(permuted, first[torch.as_tensor(order)], rtol=1e-7, atol=1e-12)


# ======================================================================================
# Aligned-MTL
# ======================================================================================


def aligned_reference(J: np.ndarray, mode: str, rtol: float = 1e-10) -> np.ndarray:
    """Aligned-MTL from the SVD ``J = U S V^T``: ``J_hat = s_R U V^T``, ``d = J_hat^T 1``."""
    U, S, Vt = np.linalg.svd(J, full_matrices=False)
    keep = S**2 > rtol * S[0] ** 2
    U, S, Vt = U[:, keep], S[keep], Vt[keep]
    if mode == "min":
        reference = S.min()
    elif mode == "median":
        reference = np.sort(S)[(len(S) - 1) // 2]  # lower median, as torch.median
    else:
        reference = math.sqrt(np.mean(S**2))
    aligned = reference * U @ Vt
    return aligned.sum(0)


@pytest.mark.parametrize("mode", ["min", "median", "rmse"])
@pytest.mark.parametrize("seed,m,n", [(0, 2, 5), (1, 3, 3), (2, 4, 9), (3, 5, 6), (4, 6, 10)])
def test_aligned_mtl_matches_svd_reference(mode: str, seed: int, m: int, n: int) -> None:
    J = random_jacobian(seed, m, n, shift=0.3, spread=2.0)
    np.testing.assert_allclose(update(AlignedMTL(mode), J), aligned_reference(J, mode), rtol=1e-8)


@pytest.mark.parametrize("mode", ["min", "median", "rmse"])
def test_aligned_mtl_rank_deficient_drops_null_directions(mode: str) -> None:
    J = np.array(DEGENERATE["duplicate"]) + np.array([[0.0], [0.0], [0.0]])
    np.testing.assert_allclose(update(AlignedMTL(mode), J), aligned_reference(J, mode), rtol=1e-8)
    J = np.array(DEGENERATE["rank one"])
    np.testing.assert_allclose(update(AlignedMTL(mode), J), aligned_reference(J, mode), rtol=1e-8)
    J = np.array(DEGENERATE["zero rows"])
    np.testing.assert_allclose(update(AlignedMTL(mode), J), aligned_reference(J, mode), rtol=1e-8)


def test_aligned_mtl_zero_and_single_task() -> None:
    assert torch.equal(
        weights_of(AlignedMTL(), np.zeros((3, 4))), torch.zeros(3, dtype=torch.float64)
    )
    torch.testing.assert_close(
        weights_of(AlignedMTL(), np.array([[3.0, 4.0]])), torch.ones(1, dtype=torch.float64)
    )


def test_aligned_mtl_median_of_even_count_is_lower_median() -> None:
    # Orthogonal rows with norms 1, 2, 3, 4: singular values are the norms.
    J = np.diag([1.0, 2.0, 3.0, 4.0])
    w = weights_of(AlignedMTL("median"), J)
    torch.testing.assert_close(w, torch.tensor([2.0, 1.0, 2 / 3, 0.5], dtype=torch.float64))
    w = weights_of(AlignedMTL("min"), J)
    torch.testing.assert_close(w, torch.tensor([1.0, 0.5, 1 / 3, 0.25], dtype=torch.float64))


@pytest.mark.parametrize("mode", ["max", "", None, 1])
def test_aligned_mtl_invalid_scale_mode(mode) -> None:
    with pytest.raises(ValueError, match="scale_mode"):
        AlignedMTL(mode)


# ======================================================================================
# ConFIG
# ======================================================================================


def config_reference(J: np.ndarray, preference: np.ndarray | None = None) -> np.ndarray:
    """ConFIG (Liu et al. 2025, Eq. 2): ``g_u = pinv(U) p``, ``d = (sum_i g_i^T g_u) g_u``."""
    norms = np.linalg.norm(J, axis=1, keepdims=True)
    units = np.divide(J, norms, out=np.zeros_like(J), where=norms > 0)
    p = np.ones(J.shape[0]) if preference is None else preference
    direction = np.linalg.pinv(units, rcond=1e-10) @ p
    unit = direction / np.linalg.norm(direction)
    return (J @ unit).sum() * unit


@pytest.mark.parametrize(
    "seed,m,n", [(0, 2, 4), (1, 3, 3), (2, 4, 7), (3, 5, 5), (4, 6, 12), (5, 7, 4)]
)
def test_config_matches_pinv_reference(seed: int, m: int, n: int) -> None:
    J = random_jacobian(seed, m, n, shift=0.2, spread=3.0)
    np.testing.assert_allclose(update(ConFIG(), J), config_reference(J), rtol=1e-8)


def test_config_with_preferences() -> None:
    J = random_jacobian(9, 3, 6, spread=1.0)
    pref = [1.0, 2.0, 0.5]
    np.testing.assert_allclose(
        update(ConFIG(pref_vector=pref), J), config_reference(J, np.array(pref)), rtol=1e-8
    )
    # A tensor is accepted too; the solver choice changes nothing.
    np.testing.assert_allclose(
        update(ConFIG(torch.tensor(pref), use_least_square=False), J),
        config_reference(J, np.array(pref)),
        rtol=1e-8,
    )


@pytest.mark.parametrize("seed", range(6))
def test_config_is_conflict_free_with_equal_cosines(seed: int) -> None:
    m = 2 + seed % 4
    J = random_jacobian(seed, m, 8, spread=0.0)
    J[0] = -J[1] + 0.3 * J[0]  # a strong conflict
    J = J * np.logspace(-1, 1, m)[:, None]
    d = update(ConFIG(), J)
    cosines = J @ d / (np.linalg.norm(J, axis=1) * np.linalg.norm(d))
    assert (cosines > 0).all()
    np.testing.assert_allclose(cosines, np.full(m, cosines.mean()), rtol=1e-9)


def test_config_zero_row_gets_no_weight() -> None:
    J = np.array(DEGENERATE["zero rows"] + [[0.5, -1.0, 3.0, 0.0]])
    w = weights_of(ConFIG(), J)
    assert w[0] == 0 and w[2] == 0
    np.testing.assert_allclose(w.numpy() @ J, config_reference(J), rtol=1e-8)


def test_config_opposite_pair_gives_zero() -> None:
    J = np.array(DEGENERATE["opposite"])
    assert torch.equal(weights_of(ConFIG(), J), torch.zeros(2, dtype=torch.float64))


def test_config_bad_hyperparameters() -> None:
    for bad in ([1.0, -1.0], [0.0], [float("nan")], [], "abc", [[1.0]], [True]):
        with pytest.raises((TypeError, ValueError), match="pref_vector"):
            ConFIG(pref_vector=bad)
    with pytest.raises(TypeError, match="use_least_square"):
        ConFIG(use_least_square=1)
    with pytest.raises(ValueError, match="pref_vector"):
        weights_of(ConFIG(pref_vector=[1.0, 2.0]), np.eye(3))


# ======================================================================================
# ConicGrad
# ======================================================================================


def conic_reference(J: np.ndarray, c: float, starts: int = 5) -> tuple[np.ndarray, float]:
    """``max_{||d|| <= 1} min_i g_i^T d`` s.t. ``g0^T d >= c ||g0|| ||d||``, by SLSQP over
    ``(d, t)`` from several starts (the problem as stated, nothing of the library's dual)."""
    m, n = J.shape
    g0 = J.mean(0)
    g0_norm = np.linalg.norm(g0)

    def norm(z: np.ndarray) -> float:
        return math.sqrt(z[:n] @ z[:n] + 1e-300)

    def cone(z: np.ndarray) -> float:
        return g0 @ z[:n] - c * g0_norm * norm(z)

    def cone_jac(z: np.ndarray) -> np.ndarray:
        return np.concatenate([g0 - c * g0_norm * z[:n] / norm(z), [0.0]])

    def ball_jac(z: np.ndarray) -> np.ndarray:
        return np.concatenate([-2.0 * z[:n], [0.0]])

    improvement_jac = np.hstack([J, -np.ones((m, 1))])
    constraints = [
        {"type": "ineq", "fun": lambda z: J @ z[:n] - z[n], "jac": lambda z: improvement_jac},
        {"type": "ineq", "fun": lambda z: 1.0 - z[:n] @ z[:n], "jac": ball_jac},
        {"type": "ineq", "fun": cone, "jac": cone_jac},
    ]
    best = None
    for start in range(starts):
        rng = np.random.default_rng(start)
        d0 = g0 / g0_norm if start == 0 else rng.normal(size=n)
        d0 = 0.5 * d0 / np.linalg.norm(d0)
        z0 = np.concatenate([d0, [(J @ d0).min()]])
        result = minimize(
            lambda z: -z[n],
            z0,
            jac=lambda z: np.concatenate([np.zeros(n), [-1.0]]),
            constraints=constraints,
            method="SLSQP",
            options={"ftol": 1e-15, "maxiter": 2000},
        )
        feasible = all(np.all(con["fun"](result.x) >= -1e-10) for con in constraints)
        if feasible and (best is None or result.x[n] > best[n]):
            best = result.x
    assert best is not None
    return best[:n], float(best[n])


CONIC_CASES = [(seed, m, c) for seed, (m, c) in enumerate(
    [(2, 0.5), (3, 0.5), (4, 0.5), (5, 0.5), (3, 0.0), (4, 0.3), (3, 0.8), (5, 0.95), (6, 0.7),
     (2, 0.9), (4, 0.8), (3, 0.2)]
)]  # fmt: skip


@pytest.mark.parametrize("seed,m,c", CONIC_CASES)
def test_conicgrad_is_optimal_against_scipy(seed: int, m: int, c: float) -> None:
    J = random_jacobian(seed, m, m + 2, shift=0.6, spread=1.0)
    J = J / np.linalg.norm(J, axis=1).max()  # SLSQP's tolerances are absolute
    d_ref, t_ref = conic_reference(J, c)
    assert t_ref > 1e-3  # the cases are chosen with a real improving direction
    d = update(ConicGrad(c), J)
    g0 = J.mean(0)
    # Rescaled to the mean gradient's norm; the cone constraint holds.
    np.testing.assert_allclose(np.linalg.norm(d), np.linalg.norm(g0), rtol=1e-10)
    assert g0 @ d >= c * np.linalg.norm(g0) * np.linalg.norm(d) - 1e-12
    unit = d / np.linalg.norm(d)
    # Optimal: the worst task improvement equals the generic solver's (which cannot beat it).
    worst = (J @ unit).min()
    assert worst >= t_ref - 1e-8
    assert worst == pytest.approx(t_ref, rel=1e-6)
    np.testing.assert_allclose(unit, d_ref / np.linalg.norm(d_ref), atol=1e-6)


@pytest.mark.parametrize("spread", [4, 8, 12, 16])
@pytest.mark.parametrize("seed", range(2))
def test_conicgrad_extreme_norm_imbalance(spread: int, seed: int) -> None:
    """Gradient norms spanning up to 1e16: the worst task is the smallest one."""
    J = random_jacobian(seed, 4, 7, shift=0.7, spread=spread)
    d = update(ConicGrad(), J)
    small = J / np.linalg.norm(J, axis=1).min()  # t* <= 1 in these units, as SLSQP needs
    d_ref, t_ref = conic_reference(small, 0.5)
    unit = d / np.linalg.norm(d)
    assert (small @ unit).min() == pytest.approx(t_ref, rel=1e-6)
    np.testing.assert_allclose(unit, d_ref / np.linalg.norm(d_ref), atol=1e-6)


def min_norm_reference(J: np.ndarray) -> np.ndarray:
    """MGDA's min-norm point of the convex hull of the rows, by SLSQP over the simplex."""
    m = J.shape[0]
    result = minimize(
        lambda w: (w @ J) @ (w @ J), np.full(m, 1 / m), jac=lambda w: 2 * J @ (w @ J),
        bounds=[(0, 1)] * m, constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1}],
        method="SLSQP", options={"ftol": 1e-16, "maxiter": 1000},
    )  # fmt: skip
    return result.x @ J


@pytest.mark.parametrize("seed", range(4))
def test_conicgrad_wide_cone_is_mgda_narrow_cone_is_active(seed: int) -> None:
    """A cone wide enough to contain MGDA's direction changes nothing (``c = 0`` here); a
    narrow one (``c = 0.9``) binds: the update lies on its boundary."""
    J = random_jacobian(seed, 4, 6, shift=0.6, spread=1.0)
    g0 = J.mean(0)
    mgda = min_norm_reference(J)
    assert g0 @ mgda > 0
    d = update(ConicGrad(0.0), J)
    np.testing.assert_allclose(d / np.linalg.norm(d), mgda / np.linalg.norm(mgda), atol=1e-6)
    d = update(ConicGrad(0.9), J)
    cosine = g0 @ d / (np.linalg.norm(g0) * np.linalg.norm(d))
    assert cosine == pytest.approx(0.9, abs=1e-12)
    assert g0 @ mgda / (np.linalg.norm(g0) * np.linalg.norm(mgda)) < 0.9


def cone_projection_reference(v: np.ndarray, u: np.ndarray, c: float) -> np.ndarray:
    """Projection onto ``{d : u^T d >= c ||d||}`` by the textbook formula for a second-order
    cone ``{(x, t) : ||x|| <= alpha t}`` (``t = u^T d``, ``x = d - t u``, ``alpha = s / c``;
    e.g. Fukushima, Luo and Tseng, SIAM J. Optim. 2002), written independently of the
    library's boundary-ray form."""
    t = u @ v
    x = v - t * u
    x_norm = np.linalg.norm(x)
    if c == 0.0:  # a half-space
        return x + max(t, 0.0) * u
    alpha = math.sqrt(1.0 - c * c) / c
    if x_norm <= alpha * t:
        return v
    if alpha * x_norm <= -t:
        return np.zeros_like(v)
    beta = (alpha * x_norm + t) / (alpha * alpha + 1.0)
    return beta * u + alpha * beta * x / x_norm


@pytest.mark.parametrize("c", [0.0, 0.5, 0.9])
@pytest.mark.parametrize("seed", range(4))
def test_cone_projection_closed_form(c: float, seed: int) -> None:
    """Step 3 of the derivation: the inner maximiser is the projection onto the cone."""
    J = random_jacobian(seed, 3, 5, shift=0.3, spread=0.0)
    G = torch.tensor(J @ J.T)
    cone = Cone(G, c)
    u = J.mean(0) / np.linalg.norm(J.mean(0))
    rng = np.random.default_rng(50 + seed)
    # g0 (inside), -g0 (polar cone: projects to 0), then any combinations (mostly between).
    points = [np.full(3, 1 / 3), np.full(3, -1 / 3)] + [rng.normal(size=3) for _ in range(6)]
    regions = set()
    for w in points:
        coefficients, value, _ = cone.project(torch.tensor(w))
        got = coefficients.numpy() @ J
        v = w @ J
        expected = cone_projection_reference(v, u, c)
        np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)
        assert value.item() == pytest.approx(0.5 * expected @ expected, rel=1e-10, abs=1e-14)
        zero = np.linalg.norm(expected) <= 1e-12 * np.linalg.norm(v)
        regions.add("inside" if np.allclose(expected, v) else "polar" if zero else "rim")
    assert regions == {"inside", "polar", "rim"}


@pytest.mark.parametrize("seed", range(5))
def test_conicgrad_never_conflicts(seed: int) -> None:
    m = 2 + seed % 4
    J = random_jacobian(seed, m, 6, spread=0.0)
    J[0] = -J[1] + 0.1 * J[0]
    J = J * np.logspace(-1, 1, m)[:, None]
    for c in (0.0, 0.5, 0.9):
        d = update(ConicGrad(c), J)
        assert (J @ d >= -1e-12 * np.linalg.norm(J) * np.linalg.norm(d)).all()


@st.composite
def jacobians(draw: st.DrawFn) -> np.ndarray:
    m = draw(st.integers(1, 5))
    n = draw(st.integers(1, 6))
    entries = st.one_of(st.just(0.0), st.floats(-10, 10, allow_nan=False, allow_infinity=False))
    J = np.array(draw(st.lists(st.lists(entries, min_size=n, max_size=n), min_size=m, max_size=m)))
    return J * 10.0 ** draw(st.integers(-8, 12))


@settings(max_examples=60, deadline=None)
@given(J=jacobians(), c=st.sampled_from([0.0, 0.3, 0.5, 0.9, 1.0]))
def test_conicgrad_invariants(J: np.ndarray, c: float) -> None:
    """Zero, or: the norm of g0, inside the cone, and no task made worse."""
    d = update(ConicGrad(c), J)
    assert np.isfinite(d).all()
    if not d.any():
        return
    g0 = J.mean(0)
    size = np.linalg.norm(J) * np.linalg.norm(d)
    assert np.linalg.norm(d) == pytest.approx(np.linalg.norm(g0), rel=1e-6)
    assert g0 @ d >= c * np.linalg.norm(g0) * np.linalg.norm(d) - 1e-9 * size
    assert (J @ d >= -1e-9 * size).all()


@settings(max_examples=40, deadline=None)
@given(J=jacobians())
def test_alignment_methods_finite_on_anything(J: np.ndarray) -> None:
    for make in ALL:
        w = weights_of(make(), J)
        assert torch.isfinite(w).all() and np.isfinite(w.numpy() @ J).all()


@pytest.mark.parametrize(
    "name,c",
    [("zero rows", 0.5), ("opposite", 0.5), ("opposite and more", 0.5), ("all zero", 0.0)],
)
def test_conicgrad_zero_when_no_direction_helps_every_task(name: str, c: float) -> None:
    J = np.array(DEGENERATE[name])
    assert torch.equal(weights_of(ConicGrad(c), J), torch.zeros(J.shape[0], dtype=torch.float64))


def test_conicgrad_special_cones() -> None:
    # One task: d = g.
    torch.testing.assert_close(
        weights_of(ConicGrad(), np.array([[1.0, -2.0]])), torch.ones(1, dtype=torch.float64)
    )
    # c = 1: only the direction of g0 is allowed; fine when it helps every task ...
    J = np.array([[1.0, 0.2, 0.0], [1.0, -0.3, 0.5], [0.8, 0.0, -0.4]])
    w = weights_of(ConicGrad(1.0), J)
    torch.testing.assert_close(w, torch.full((3,), 1 / 3, dtype=torch.float64))
    # ... and zero when a task is opposed to g0.
    J[2] = [-1.0, 0.5, 0.0]
    assert torch.equal(weights_of(ConicGrad(1.0), J), torch.zeros(3, dtype=torch.float64))


def test_conicgrad_duplicates_share_the_update() -> None:
    J = np.array(DEGENERATE["duplicate"])
    d = update(ConicGrad(), J)
    d_ref, _ = conic_reference(J / np.linalg.norm(J, axis=1).max(), 0.5)
    np.testing.assert_allclose(d / np.linalg.norm(d), d_ref / np.linalg.norm(d_ref), atol=1e-5)


@pytest.mark.parametrize("c", [-0.1, 1.5, "a", None])
def test_conicgrad_invalid_c(c) -> None:
    with pytest.raises((TypeError, ValueError), match="c"):
        ConicGrad(c)


# ======================================================================================
# End to end through the optimizer
# ======================================================================================


def _per_task_grads(losses: list[torch.Tensor], params: list[torch.Tensor]) -> np.ndarray:
    rows = []
    for loss in losses:
        grads = torch.autograd.grad(loss, params, retain_graph=True)
        rows.append(torch.cat([g.flatten() for g in grads]))
    return torch.stack(rows).numpy()


def _conic_end_to_end_reference(J: np.ndarray) -> np.ndarray:
    scale = np.linalg.norm(J, axis=1).max()
    d_ref, _ = conic_reference(J / scale, 0.5, starts=1)
    return np.linalg.norm(J.mean(0)) * d_ref / np.linalg.norm(d_ref)


END_TO_END = {
    "AlignedMTL": (lambda: AlignedMTL("rmse"), lambda J: aligned_reference(J, "rmse"), 1e-8),
    "ConFIG": (ConFIG, config_reference, 1e-8),
    "ConicGrad": (ConicGrad, _conic_end_to_end_reference, 1e-6),
}


@pytest.mark.parametrize("name", sorted(END_TO_END))
def test_end_to_end_through_the_optimizer(name: str) -> None:
    make, reference, tolerance = END_TO_END[name]
    torch.manual_seed(0)
    net = Net().double()
    opt = MultiTaskOptimizer(torch.optim.SGD(net.parameters(), lr=0.05), weighting=make())
    shared = list(net.encoder.parameters())
    for step in range(2):
        x, y = (t.double() for t in make_batch(step))
        opt.zero_grad()
        losses = net.losses(x, y)
        J = _per_task_grads(losses, shared)
        heads = [_per_task_grads([losses[t]], list(net.heads[t].parameters()))[0] for t in range(3)]
        opt.backward(losses)
        got = torch.cat([p.grad.flatten() for p in shared]).numpy()
        np.testing.assert_allclose(
            got, reference(J), rtol=tolerance, atol=tolerance * np.abs(J).max()
        )
        for t in range(3):  # task heads get their own gradient
            own = torch.cat([p.grad.flatten() for p in net.heads[t].parameters()]).numpy()
            np.testing.assert_allclose(own, heads[t], rtol=1e-12)
        opt.step()
