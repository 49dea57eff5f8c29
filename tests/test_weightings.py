"""Each weighting against an independent reference written from the paper's formulas.

The references below work on explicit per-task gradient vectors (Python lists of floats, i.e.
float64) with plain loops; they never call library code. The library's weights are turned into
the update ``d = w^T J`` and compared with the reference update.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from mtlopt import MultiTaskOptimizer
from mtlopt.weighting import IMTL, IMTLG, IMTLL, ExcessMTL, GradVac, Mean, Sum

from .references import dot, head_params, norm, per_task_grads, rows_of, weighted_sum

# ======================================================================================
# Plain-Python helpers (float64 lists)
# ======================================================================================










def solve(matrix, rhs):
    """Solve ``matrix x = rhs`` by Gauss-Jordan elimination with partial pivoting."""
    size = len(rhs)
    a = [list(map(float, row)) + [float(b)] for row, b in zip(matrix, rhs)]
    for col in range(size):
        pivot = max(range(col, size), key=lambda r: abs(a[r][col]))
        a[col], a[pivot] = a[pivot], a[col]
        for r in range(size):
            if r != col:
                factor = a[r][col] / a[col][col]
                for c in range(col, size + 1):
                    a[r][c] -= factor * a[col][c]
    return [a[r][size] / a[r][r] for r in range(size)]


def gramian_of(jacobian: torch.Tensor) -> torch.Tensor:
    flat = jacobian.reshape(jacobian.shape[0], -1).to(torch.float64)
    return flat @ flat.T


def as_tensor(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


# ======================================================================================
# References
# ======================================================================================


def draw_orders(generator: torch.Generator, m: int) -> list[list[int]]:
    """The random visiting orders, drawn as the library does: uniform keys, self last."""
    keys = torch.rand(m, m, generator=generator, dtype=torch.float64).tolist()
    return [sorted((j for j in range(m) if j != i), key=lambda j: keys[i][j]) for i in range(m)]


def copy_generator(weighting: GradVac) -> torch.Generator:
    generator = torch.Generator()
    generator.set_state(weighting._generator.get_state())
    return generator


def gradvac_reference(rows, phi_hat, orders, beta, eps=1e-8, counter=None):
    """GradVac (Wang et al. 2021, Alg. 2): returns (d, new phi_hat)."""
    m, n = len(rows), len(rows[0])
    phi_hat = [list(r) for r in phi_hat]
    d = [0.0] * n
    for i in range(m):
        gi = list(rows[i])
        for j in orders[i]:
            gj = rows[j]
            ni, nj = norm(gi), norm(gj)
            phi = dot(gi, gj) / (ni * nj + eps)
            target = phi_hat[i][j]
            # A zero gradient has no direction to align with (the paper divides by ||g_j||):
            # no correction then, as the library documents.
            if phi < target and ni > 0 and nj > 0:
                coef = (
                    ni
                    * (target * math.sqrt(1 - phi**2) - phi * math.sqrt(1 - target**2))
                    / (nj * math.sqrt(1 - target**2))
                )
                gi = [a + coef * b for a, b in zip(gi, gj)]
                if counter is not None and target != 0.0:
                    counter["nonzero_target_corrections"] += 1
            phi_hat[i][j] = (1 - beta) * target + beta * phi
        d = [a + b for a, b in zip(d, gi)]
    return d, phi_hat


def pcgrad_reference(rows, orders):
    """PCGrad (Yu et al. 2020): project away conflicting components, in the given orders."""
    n = len(rows[0])
    d = [0.0] * n
    for i in range(len(rows)):
        gi = list(rows[i])
        for j in orders[i]:
            gj = rows[j]
            inner = dot(gi, gj)
            if inner < 0:
                gi = [a - inner / dot(gj, gj) * b for a, b in zip(gi, gj)]
        d = [a + b for a, b in zip(d, gi)]
    return d


class ExcessMTLReference:
    """ExcessMTL (He et al. 2024, Eqs. 6, 7, 9) with S kept as an explicit m x n table."""

    def __init__(self, m, n, eta, n_warmup):
        self.S = [[0.0] * n for _ in range(m)]
        self.w = [1.0 / m] * m
        self.eta = eta
        self.n_warmup = n_warmup
        self.r0 = None
        self.warmup_sum = [0.0] * m
        self.calls = 0

    def step(self, rows):
        m, n = len(rows), len(rows[0])
        for i in range(m):
            for k in range(n):
                self.S[i][k] += rows[i][k] ** 2
        e = [sum(rows[i][k] ** 2 / math.sqrt(self.S[i][k] + 1e-7) for k in range(n)) for i in range(m)]
        self.calls += 1
        if self.calls <= self.n_warmup:
            self.warmup_sum = [a + b for a, b in zip(self.warmup_sum, e)]
            return list(self.w)
        if self.r0 is None:
            if self.n_warmup == 0:
                self.r0 = e
                return list(self.w)
            self.r0 = [a / self.n_warmup for a in self.warmup_sum]
        relative = [e_i / (r_i + 1e-7) for e_i, r_i in zip(e, self.r0)]
        unnormalised = [w_i * math.exp(self.eta * r_i) for w_i, r_i in zip(self.w, relative)]
        total = sum(unnormalised)
        self.w = [u / total for u in unnormalised]
        return list(self.w)


def imtlg_reference(rows):
    """IMTL-G's closed form (Liu et al. 2021, Eq. 8): a_{2..m} = g_1 U^T (D U^T)^{-1}."""
    m = len(rows)
    units = [[x / norm(g) for x in g] for g in rows]
    D = [[a - b for a, b in zip(rows[0], rows[k])] for k in range(1, m)]
    U = [[a - b for a, b in zip(units[0], units[k])] for k in range(1, m)]
    r = [dot(rows[0], U[k]) for k in range(m - 1)]  # g_1 U^T
    M = [[dot(D[k], U[l]) for l in range(m - 1)] for k in range(m - 1)]  # D U^T
    # x^T = r^T M^{-1}  <=>  M^T x = r
    Mt = [[M[l][k] for l in range(m - 1)] for k in range(m - 1)]
    rest = solve(Mt, r)
    return [1.0 - sum(rest)] + rest


# ======================================================================================
# GradVac
# ======================================================================================


def _random_jacobians(seed, m, n, steps, correlated=True):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(m, n, generator=gen, dtype=torch.float64)
    out = []
    for _ in range(steps):
        noise = torch.randn(m, n, generator=gen, dtype=torch.float64)
        out.append(base + 0.8 * noise if correlated else noise)
    return out


# The library also puts eps in the denominator of the correction (methods.md: "eps 1e-8 in
# denominators"); the reference follows the paper there, which differs by ~1e-7 relative at the
# default eps. With a negligible eps both agree to rounding.
GRADVAC_TOLERANCES = {1e-8: dict(rtol=1e-6, atol=1e-8), 1e-30: dict(rtol=1e-11, atol=1e-13)}


@pytest.mark.parametrize("eps", sorted(GRADVAC_TOLERANCES))
@pytest.mark.parametrize("seed,m,n", [(0, 3, 5), (1, 4, 6), (2, 5, 8), (3, 2, 4)])
def test_gradvac_matches_reference_over_steps(seed, m, n, eps):
    beta = 0.3
    tolerance = GRADVAC_TOLERANCES[eps]
    w = GradVac(beta=beta, eps=eps, seed=100 + seed)
    generator = copy_generator(w)
    phi_hat = [[0.0] * m for _ in range(m)]
    counter = {"nonzero_target_corrections": 0}
    for J in _random_jacobians(seed, m, n, steps=8):
        weights = w.weights_from_gramian(gramian_of(J), torch.ones(m, dtype=torch.float64))
        d = weights @ J
        orders = draw_orders(generator, m)
        d_ref, phi_hat = gradvac_reference(rows_of(J), phi_hat, orders, beta, eps, counter=counter)
        torch.testing.assert_close(d, as_tensor(d_ref), **tolerance)
        torch.testing.assert_close(w.phi_hat, as_tensor(phi_hat), **tolerance)
    if m > 2:
        # The test exercises the vaccine correction with non-zero targets.
        assert counter["nonzero_target_corrections"] > 0


def test_gradvac_nonzero_targets_exercised_across_seeds():
    """Some configuration must hit phi < phi_hat != 0 (the GradVac-specific branch)."""
    total = 0
    for seed in range(4):
        m, n, beta = 4, 6, 0.3
        generator = torch.Generator().manual_seed(seed)
        phi_hat = [[0.0] * m for _ in range(m)]
        counter = {"nonzero_target_corrections": 0}
        for J in _random_jacobians(seed, m, n, steps=8):
            _, phi_hat = gradvac_reference(
                rows_of(J), phi_hat, draw_orders(generator, m), beta, counter=counter
            )
        total += counter["nonzero_target_corrections"]
    assert total > 0


def test_gradvac_torchjd_pinned_value():
    J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]], dtype=torch.float64)
    w = GradVac(seed=0)
    weights = w.weights_from_gramian(gramian_of(J), torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(
        weights @ J, as_tensor([0.5848, 3.8012, 3.8012]), atol=1e-4, rtol=0
    )


@pytest.mark.parametrize("seed,m,n", [(0, 3, 5), (1, 5, 7), (2, 6, 4)])
def test_gradvac_beta_zero_is_pcgrad(seed, m, n):
    w = GradVac(beta=0.0, seed=seed)
    generator = copy_generator(w)
    for J in _random_jacobians(seed, m, n, steps=4, correlated=False):
        weights = w.weights_from_gramian(gramian_of(J), torch.ones(m, dtype=torch.float64))
        d_ref = pcgrad_reference(rows_of(J), draw_orders(generator, m))
        torch.testing.assert_close(weights @ J, as_tensor(d_ref), rtol=1e-6, atol=1e-7)
        assert torch.equal(w.phi_hat, torch.zeros(m, m, dtype=torch.float64))


def test_gradvac_single_task():
    w = GradVac(seed=0)
    G = torch.tensor([[4.0]], dtype=torch.float64)
    for _ in range(2):
        weights = w.weights_from_gramian(G, torch.ones(1, dtype=torch.float64))
        torch.testing.assert_close(weights, torch.ones(1, dtype=torch.float64))


@pytest.mark.parametrize(
    "J",
    [
        [[0.0, 0.0, 0.0], [1.0, -2.0, 0.5], [-1.0, 1.0, 1.0]],
        [[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [-3.0, -1.0, 0.0]],
        [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]],
    ],
)
def test_gradvac_zero_rows_finite(J):
    J = torch.tensor(J, dtype=torch.float64)
    w = GradVac(beta=0.5, seed=0)
    for _ in range(3):  # later steps have non-zero targets
        weights = w.weights_from_gramian(gramian_of(J), torch.ones(3, dtype=torch.float64))
        assert torch.isfinite(weights).all()
        assert torch.isfinite(weights @ J).all()
        assert torch.isfinite(w.phi_hat).all()
    # Another step with non-zero rows after the targets moved: still finite.
    J2 = torch.randn(3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    weights = w.weights_from_gramian(gramian_of(J2), torch.ones(3, dtype=torch.float64))
    assert torch.isfinite(weights).all()


def test_gradvac_zero_row_after_positive_targets():
    """A gradient that vanishes once the targets are positive gets no correction either way."""
    m, beta = 3, 0.5
    gen = torch.Generator().manual_seed(3)
    base = torch.tensor(
        [[1.0, 0.2, 0.0, 0.1], [0.8, 0.0, 0.5, 0.0], [1.0, -0.3, 0.2, 0.4]], dtype=torch.float64
    )
    w = GradVac(beta=beta, seed=5)
    generator = copy_generator(w)
    phi_hat = [[0.0] * m for _ in range(m)]
    steps = [base + 0.1 * torch.randn(m, 4, generator=gen, dtype=torch.float64) for _ in range(3)]
    for zero in range(m):
        J = torch.randn(m, 4, generator=gen, dtype=torch.float64)
        J[zero] = 0.0
        steps.append(J)
    for J in steps:
        weights = w.weights_from_gramian(gramian_of(J), torch.ones(m, dtype=torch.float64))
        d_ref, phi_hat = gradvac_reference(rows_of(J), phi_hat, draw_orders(generator, m), beta)
        assert torch.isfinite(weights).all()
        assert weights.abs().max() < 10.0  # no huge coefficient on a zero gradient
        torch.testing.assert_close(weights @ J, as_tensor(d_ref), rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(w.phi_hat, as_tensor(phi_hat), rtol=1e-6, atol=1e-8)
    assert min(min(r) for r in phi_hat) < max(max(r) for r in phi_hat)


def test_gradvac_seed_none_follows_torch_manual_seed():
    torch.manual_seed(123)
    a = GradVac()
    torch.manual_seed(123)
    b = GradVac()
    assert torch.equal(a._generator.get_state(), b._generator.get_state())


@pytest.mark.parametrize("beta", [-0.1, 1.5, "a"])
def test_gradvac_invalid_beta(beta):
    with pytest.raises((TypeError, ValueError), match="beta"):
        GradVac(beta=beta)


@pytest.mark.parametrize("eps", [0, -1])
def test_gradvac_invalid_eps(eps):
    with pytest.raises((TypeError, ValueError), match="eps"):
        GradVac(eps=eps)


def test_gradvac_same_seed_same_results():
    a, b = GradVac(beta=0.3, seed=7), GradVac(beta=0.3, seed=7)
    for J in _random_jacobians(5, 5, 6, steps=4, correlated=False):
        G = gramian_of(J)
        losses = torch.ones(5, dtype=torch.float64)
        assert torch.equal(a.weights_from_gramian(G, losses), b.weights_from_gramian(G, losses))
        assert torch.equal(a.phi_hat, b.phi_hat)


def test_gradvac_spawn_has_its_own_stream():
    parent = GradVac(beta=0.3, seed=7)
    first, second = parent.spawn(), parent.spawn()
    m = 8
    orders = [draw_orders(copy_generator(w), m) for w in (parent, first, second)]
    assert orders[0] != orders[1]
    assert orders[0] != orders[2]
    assert orders[1] != orders[2]
    # ... and the weightings really use those streams: the updates differ too.
    J = torch.randn(m, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    G, losses = gramian_of(J), torch.ones(m, dtype=torch.float64)
    results = [w.weights_from_gramian(G, losses) for w in (parent, first, second)]
    assert not torch.allclose(results[0], results[1])
    assert not torch.allclose(results[1], results[2])
    # State is not shared.
    assert first.phi_hat is not parent.phi_hat and first.phi_hat is not second.phi_hat


def test_gradvac_spawn_is_deterministic_given_parent_seed():
    a, b = GradVac(seed=11).spawn(), GradVac(seed=11).spawn()
    assert torch.equal(a._generator.get_state(), b._generator.get_state())


# ======================================================================================
# ExcessMTL
# ======================================================================================


def _blocks_for_step(gen, m, step):
    # Tasks with very different and changing gradient scales so the weights move.
    scales = torch.tensor([1.0, 0.3, 2.0, 0.7][:m], dtype=torch.float64) * (1.0 + 0.3 * step)
    scales = scales.flip(0) if step % 3 == 2 else scales
    a = torch.randn(m, 3, 4, generator=gen, dtype=torch.float64) * scales.reshape(m, 1, 1)
    b = torch.randn(m, 5, generator=gen, dtype=torch.float64) * scales.reshape(m, 1)
    return [a, b]


@pytest.mark.parametrize("chunk", [None, 1, 5, 12, 40])
@pytest.mark.parametrize("n_warmup", [0, 2])
@pytest.mark.parametrize("eta", [0.5, 1.0])
@pytest.mark.parametrize("m", [2, 4])
def test_excessmtl_matches_reference(n_warmup, eta, m, chunk, monkeypatch):
    """Also with the blocks cut into chunks of pieces of rows, whole rows and several rows."""
    if chunk is not None:
        monkeypatch.setattr("mtlopt.weighting.excess_mtl._CPU_CHUNK_ELEMENTS", chunk)
    gen = torch.Generator().manual_seed(10 * m + n_warmup)
    w = ExcessMTL(robust_step_size=eta, n_warmup_steps=n_warmup)
    ref = ExcessMTLReference(m, 3 * 4 + 5, eta, n_warmup)
    history = []
    for step in range(6):
        blocks = _blocks_for_step(gen, m, step)
        flat = torch.cat([b.reshape(m, -1) for b in blocks], dim=1)
        expected = ref.step(rows_of(flat))
        weights = w.weights_from_jacobian([b.clone() for b in blocks], torch.ones(m, dtype=torch.float64))
        torch.testing.assert_close(weights, as_tensor(expected), rtol=1e-10, atol=1e-12)
        assert weights.sum().item() == pytest.approx(1.0, abs=1e-12)
        history.append(weights.clone())
    # Uniform during the warm-up calls (with no warm-up: on the baseline call); then they move.
    for k in range(max(n_warmup, 1)):
        torch.testing.assert_close(history[k], torch.full((m,), 1.0 / m, dtype=torch.float64))
    assert not torch.allclose(history[max(n_warmup, 1)], torch.full((m,), 1.0 / m, dtype=torch.float64))
    assert not torch.allclose(history[-1], torch.full((m,), 1.0 / m, dtype=torch.float64))


def test_excessmtl_does_not_modify_input_blocks():
    gen = torch.Generator().manual_seed(0)
    blocks = _blocks_for_step(gen, 3, 0)
    saved = [b.clone() for b in blocks]
    w = ExcessMTL()
    for _ in range(2):
        w.weights_from_jacobian(blocks, torch.ones(3, dtype=torch.float64))
    for b, s in zip(blocks, saved):
        assert torch.equal(b, s)


@pytest.mark.parametrize("value", [0, -1])
def test_excessmtl_invalid_step_size(value):
    with pytest.raises((TypeError, ValueError), match="robust_step_size"):
        ExcessMTL(robust_step_size=value)


@pytest.mark.parametrize("value", [-1, 1.5])
def test_excessmtl_invalid_warmup(value):
    with pytest.raises((TypeError, ValueError), match="n_warmup_steps"):
        ExcessMTL(n_warmup_steps=value)


# ======================================================================================
# IMTL-G
# ======================================================================================


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("m", [2, 3, 4, 5])
def test_imtlg_matches_closed_form(m, seed):
    gen = torch.Generator().manual_seed(1000 * m + seed)
    n = m + 3 + seed
    # Different gradient scales per task (IMTL-G is about scale imbalance).
    J = torch.randn(m, n, generator=gen, dtype=torch.float64)
    J = J * torch.logspace(-1, 1, m, dtype=torch.float64).reshape(m, 1)
    weights = IMTLG().weights_from_gramian(gramian_of(J), torch.ones(m, dtype=torch.float64))
    expected = imtlg_reference(rows_of(J))
    torch.testing.assert_close(weights, as_tensor(expected), rtol=1e-8, atol=1e-10)
    # The defining property: equal projections of d on all unit gradients, sum a = 1.
    d = rows_of((weights @ J).reshape(1, -1))[0]
    rows = rows_of(J)
    projections = [dot(d, g) / norm(g) for g in rows]
    assert max(projections) - min(projections) <= 1e-9 * max(abs(p) for p in projections)
    assert sum(weights.tolist()) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize(
    "J",
    [
        # duplicate rows
        [[1.0, 2.0, 0.0, -1.0], [1.0, 2.0, 0.0, -1.0], [0.5, -1.0, 3.0, 0.0]],
        # collinear rows, different lengths
        [[1.0, 2.0, 0.0, -1.0], [3.0, 6.0, 0.0, -3.0], [0.5, -1.0, 3.0, 0.0]],
        # a zero row
        [[1.0, 2.0, 0.0, -1.0], [0.0, 0.0, 0.0, 0.0], [0.5, -1.0, 3.0, 0.0]],
        # all zero
        [[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]],
        # more tasks than dimensions
        [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 2.0]],
    ],
)
def test_imtlg_rank_deficient_is_finite(J):
    J = torch.tensor(J, dtype=torch.float64)
    weights = IMTLG().weights_from_gramian(gramian_of(J), torch.ones(J.shape[0], dtype=torch.float64))
    assert torch.isfinite(weights).all()
    assert torch.isfinite(weights @ J).all()


def _two_tasks_at_60_degrees(ratio):
    t = math.radians(60.0)
    return torch.tensor(
        [[1.0, 0.0, 0.0], [math.cos(t) / ratio, math.sin(t) / ratio, 0.0]], dtype=torch.float64
    )


def _check_imtlg_imbalanced(ratio):
    J = _two_tasks_at_60_degrees(ratio)
    weights = IMTLG().weights_from_gramian(gramian_of(J), torch.ones(2, dtype=torch.float64))
    expected = imtlg_reference(rows_of(J))  # = [1, ratio] / (1 + ratio)
    torch.testing.assert_close(weights, as_tensor(expected), rtol=1e-6, atol=1e-12)
    d = (weights @ J).tolist()
    projections = [dot(d, g) / norm(g) for g in rows_of(J)]
    assert projections[0] == pytest.approx(projections[1], rel=1e-6)


@pytest.mark.parametrize("ratio", [1e1, 1e2])
def test_imtlg_gradient_norm_imbalance(ratio):
    """IMTL-G exists for tasks whose gradients differ in scale."""
    _check_imtlg_imbalanced(ratio)


@pytest.mark.parametrize("ratio", [1e3, 1e4, 1e8])
def test_imtlg_gradient_norm_imbalance_large(ratio):
    _check_imtlg_imbalanced(ratio)


def test_imtlg_duplicate_rows_keep_equal_projections():
    J = torch.tensor(
        [[1.0, 2.0, 0.0, -1.0], [1.0, 2.0, 0.0, -1.0], [0.5, -1.0, 3.0, 0.0]], dtype=torch.float64
    )
    weights = IMTLG().weights_from_gramian(gramian_of(J), torch.ones(3, dtype=torch.float64))
    d = (weights @ J).tolist()
    projections = [dot(d, g) / norm(g) for g in rows_of(J)]
    assert max(projections) - min(projections) <= 1e-9 * max(abs(p) for p in projections)
    assert sum(weights.tolist()) == pytest.approx(1.0, abs=1e-12)
    # Compare with the closed form on the distinct rows: same update.
    a = imtlg_reference([rows_of(J)[0], rows_of(J)[2]])
    d_ref = weighted_sum(a, [rows_of(J)[0], rows_of(J)[2]])
    torch.testing.assert_close(torch.tensor(d, dtype=torch.float64), as_tensor(d_ref), rtol=1e-9, atol=1e-12)


# ======================================================================================
# End to end through MultiTaskOptimizer
# ======================================================================================

N_TASKS = 3


class Net(nn.Module):
    def __init__(self, n_tasks: int = N_TASKS) -> None:
        super().__init__()
        self.trunk = nn.Linear(4, 6)
        self.heads = nn.ModuleList(nn.Linear(6, 1) for _ in range(n_tasks))

    def forward(self, x):
        h = torch.tanh(self.trunk(x))
        return [head(h).squeeze(-1) for head in self.heads]


def make_model(seed=0) -> Net:
    torch.manual_seed(seed)
    return Net().double()


def make_batches(seed=0, steps=4):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        x = torch.randn(8, 4, generator=gen, dtype=torch.float64)
        ys = [torch.randn(8, generator=gen, dtype=torch.float64) * (t + 1) ** 1.5 for t in range(N_TASKS)]
        out.append((x, ys))
    return out


def task_losses(model, batch):
    x, ys = batch
    return [((out - y) ** 2).mean() for out, y in zip(model(x), ys)]


def shared_params(model):
    return [model.trunk.weight, model.trunk.bias]






def flat_grad(params):
    return torch.cat([p.grad.flatten() for p in params])


def scale_group(opt):
    groups = [g for g in opt.param_groups if g.get("mtlopt_role") == "loss_scales"]
    assert len(groups) == 1
    return groups[0]


@pytest.mark.parametrize("hybrid", [False, True])
def test_imtl_loss_scales_end_to_end(hybrid):
    model = make_model(1)
    batches = make_batches(1)
    weighting = IMTL() if hybrid else IMTLL()
    opt = MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), weighting=weighting)
    opt.step(task_losses(model, batches[0]))
    w = opt.weightings()[0]
    assert isinstance(w, IMTL if hybrid else IMTLL)
    assert w.log_scales is not None
    group = scale_group(opt)
    assert group["lr"] == 0.1
    assert any(p is w.log_scales for p in group["params"])

    with torch.no_grad():
        w.log_scales.copy_(torch.tensor([0.5, -0.75, 0.25]))
    s = w.log_scales.detach().to(torch.float64)
    c = s.exp()

    for batch in batches[1:3]:
        opt.zero_grad()
        losses = task_losses(model, batch)
        L = torch.stack([l.detach() for l in losses])
        J_shared = per_task_grads(losses, shared_params(model))
        head_rows = [per_task_grads(losses, head_params(model, t))[t] for t in range(N_TASKS)]
        opt.backward(losses)

        if hybrid:
            scaled = rows_of(c.reshape(-1, 1) * J_shared)
            a = imtlg_reference(scaled)
            expected_shared = as_tensor(weighted_sum(a, scaled))
        else:
            expected_shared = as_tensor(weighted_sum(c.tolist(), rows_of(J_shared)))
        torch.testing.assert_close(flat_grad(shared_params(model)), expected_shared, rtol=1e-9, atol=1e-12)
        for t in range(N_TASKS):
            torch.testing.assert_close(
                flat_grad(head_params(model, t)), c[t] * head_rows[t], rtol=1e-9, atol=1e-12
            )
        expected_scale_grad = (c * L - 1.0).to(w.log_scales.dtype)
        torch.testing.assert_close(w.log_scales.grad, expected_scale_grad, rtol=1e-6, atol=1e-7)

        # The base optimizer moves the scales (SGD: s <- s - lr * grad).
        before = w.log_scales.detach().clone()
        grad = w.log_scales.grad.clone()
        opt.step()
        torch.testing.assert_close(w.log_scales.detach(), before - 0.1 * grad)
        s = w.log_scales.detach().to(torch.float64)
        c = s.exp()


def test_imtll_lr_override():
    model = make_model(2)
    batch = make_batches(2, steps=1)[0]
    opt = MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), weighting=IMTLL(lr=0.01))
    opt.zero_grad()
    opt.backward(task_losses(model, batch))
    w = opt.weightings()[0]
    group = scale_group(opt)
    assert group["lr"] == 0.01
    before = w.log_scales.detach().clone()
    grad = w.log_scales.grad.clone()
    assert torch.count_nonzero(grad) > 0
    opt.step()
    torch.testing.assert_close(w.log_scales.detach(), before - 0.01 * grad)
    # The model parameters kept the base lr.
    assert [g["lr"] for g in opt.param_groups if g.get("mtlopt_role") != "loss_scales"] == [0.1]


def test_imtll_scales_created_at_construction():
    model = make_model(3)
    opt = MultiTaskOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), weighting=IMTLL(n_tasks=N_TASKS)
    )
    group = scale_group(opt)
    assert group["lr"] == 0.1
    w = opt.weightings()[0]
    assert any(p is w.log_scales for p in group["params"])


def _grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("kind", ["Mean", "Sum"])
def test_mean_and_sum_equal_plain_backward(kind):
    model = make_model(4)
    reference = copy.deepcopy(model)
    weighting = Mean() if kind == "Mean" else Sum()
    opt = MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), weighting=weighting)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    for batch in make_batches(4, steps=3):
        opt.zero_grad()
        ref_opt.zero_grad()
        opt.backward(task_losses(model, batch))
        losses = task_losses(reference, batch)
        total = sum(losses)
        (total / len(losses) if kind == "Mean" else total).backward()
        got, expected = _grads(model), _grads(reference)
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], rtol=1e-6, atol=1e-12)
        opt.step()
        ref_opt.step()


def test_mean_on_trunk_sum_on_heads():
    model = make_model(5)
    ref_mean, ref_sum = copy.deepcopy(model), copy.deepcopy(model)
    opt = MultiTaskOptimizer(
        torch.optim.SGD(
            [
                {"params": model.trunk.parameters(), "weighting": Mean()},
                {"params": model.heads.parameters(), "weighting": Sum()},
            ],
            lr=0.1,
        )
    )
    batch = make_batches(5, steps=1)[0]
    opt.zero_grad()
    opt.backward(task_losses(model, batch))
    losses = task_losses(ref_mean, batch)
    (sum(losses) / len(losses)).backward()
    sum(task_losses(ref_sum, batch)).backward()
    for name, p in model.named_parameters():
        source = ref_mean if name.startswith("trunk") else ref_sum
        torch.testing.assert_close(p.grad, dict(source.named_parameters())[name].grad, rtol=1e-6, atol=1e-12)
    # Heads with Sum get their own task's gradient exactly (no 1/m).
    for t in range(N_TASKS):
        model.zero_grad()
        task_losses(model, batch)[t].backward()
        own = flat_grad(head_params(model, t))
        ref_head = torch.cat([q.grad.flatten() for q in head_params(ref_sum, t)])
        torch.testing.assert_close(ref_head, own, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", ["GradVac", "IMTLG", "ExcessMTL"])
def test_per_task_weightings_end_to_end(kind):
    model = make_model(6)
    if kind == "GradVac":
        weighting = GradVac(beta=0.3, eps=1e-30, seed=3)
    elif kind == "IMTLG":
        weighting = IMTLG()
    else:
        weighting = ExcessMTL(robust_step_size=0.5)
    opt = MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), weighting=weighting)
    w = opt.weightings()[0]
    n_shared = sum(p.numel() for p in shared_params(model))
    generator = copy_generator(w) if kind == "GradVac" else None
    phi_hat = [[0.0] * N_TASKS for _ in range(N_TASKS)]
    excess = ExcessMTLReference(N_TASKS, n_shared, 0.5, 0)

    for batch in make_batches(6, steps=4):
        opt.zero_grad()
        losses = task_losses(model, batch)
        J = per_task_grads(losses, shared_params(model))
        rows = rows_of(J)
        head_rows = [per_task_grads(losses, head_params(model, t))[t] for t in range(N_TASKS)]
        opt.backward(losses)

        if kind == "GradVac":
            d_ref, phi_hat = gradvac_reference(
                rows, phi_hat, draw_orders(generator, N_TASKS), 0.3, eps=1e-30
            )
        elif kind == "IMTLG":
            d_ref = weighted_sum(imtlg_reference(rows), rows)
        else:
            d_ref = weighted_sum(excess.step(rows), rows)
        torch.testing.assert_close(flat_grad(shared_params(model)), as_tensor(d_ref), rtol=1e-8, atol=1e-11)
        if kind == "GradVac":
            torch.testing.assert_close(w.phi_hat, as_tensor(phi_hat), rtol=1e-8, atol=1e-11)
        for t in range(N_TASKS):
            torch.testing.assert_close(flat_grad(head_params(model, t)), head_rows[t], rtol=1e-12, atol=1e-14)
        opt.step()
