"""MoCo, SDMGrad (and SDMGrad-OS) and MoDo against independent references.

The references are the papers' algorithms written plainly over explicit per-task gradient
vectors (Python lists of floats, i.e. float64, with loops); they never call library code.
SDMGrad and MoDo are fed through ``weights_from_cross_gramians`` with cross Gramians built
here from three explicit per-batch Jacobians, ``gramians[p, q] = J_p J_q^T``.
"""

from __future__ import annotations

import io

import pytest
import scipy.optimize
import torch

from mtlopt import MultiTaskOptimizer
from mtlopt.weighting.double_sampling import MoDo, SDMGrad
from mtlopt.weighting.moco import MoCo
from tests.conftest import Net, make_batch

from .references import dot, norm, rows_of, weighted_sum

# ======================================================================================
# Plain-Python helpers
# ======================================================================================










def project_simplex_reference(v):
    """Euclidean projection onto the simplex by bisection on the threshold (independent of
    the library's sort-based algorithm): find theta with sum(max(v - theta, 0)) = 1."""
    lo, hi = min(v) - 1.0, max(v)
    for _ in range(300):
        mid = 0.5 * (lo + hi)
        if sum(max(x - mid, 0.0) for x in v) > 1.0:
            lo = mid
        else:
            hi = mid
    theta = 0.5 * (lo + hi)
    return [max(x - theta, 0.0) for x in v]


def as_tensor(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def cross_gramians(jacobians: list[torch.Tensor]) -> torch.Tensor:
    """``[b, b, m, m]`` with ``[p, q] = J_p J_q^T`` (float64)."""
    flats = [j.reshape(j.shape[0], -1).to(torch.float64) for j in jacobians]
    return torch.stack([torch.stack([a @ b.T for b in flats]) for a in flats])


def round_trip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def ones(m: int) -> torch.Tensor:
    return torch.ones(m, dtype=torch.float64)


DEGENERATE = {
    "zero_row": [[0.0, 0.0, 0.0, 0.0], [1.0, -2.0, 0.5, 0.0], [-1.0, 1.0, 1.0, 2.0]],
    "duplicate": [[1.0, 2.0, 0.0, -1.0], [1.0, 2.0, 0.0, -1.0], [0.5, -1.0, 3.0, 0.0]],
    "opposite": [[1.0, 2.0, 0.0, -1.0], [-1.0, -2.0, 0.0, 1.0], [0.5, -1.0, 3.0, 0.0]],
    "rank_one": [[1.0, 2.0, 0.0, -1.0], [2.0, 4.0, 0.0, -2.0], [-3.0, -6.0, 0.0, 3.0]],
    "all_zero": [[0.0] * 4] * 3,
    "single_task": [[1.0, -2.0, 3.0, 0.5]],
}
SCALES = [1e-10, 1e-3, 1.0, 1e6, 1e15]


# ======================================================================================
# MoCo
# ======================================================================================


class MoCoReference:
    """MoCo (Fernando et al. 2023, Alg. 1) on explicit gradient lists."""

    def __init__(self, m, n, beta, beta_sigma, gamma, gamma_sigma, rho, normalization):
        self.y = [[0.0] * n for _ in range(m)]
        self.lam = [1.0 / m] * m
        self.t = 0
        self.beta, self.beta_sigma = beta, beta_sigma
        self.gamma, self.gamma_sigma = gamma, gamma_sigma
        self.rho = rho
        self.normalization = normalization

    def step(self, rows, losses):
        m = len(rows)
        self.t += 1
        beta_t = self.beta / self.t**self.beta_sigma
        gamma_t = self.gamma / self.t**self.gamma_sigma
        if self.normalization == "loss":
            rows = [[abs(L) / (norm(g) + 1e-8) * x for x in g] for g, L in zip(rows, losses)]
        self.y = [[a - beta_t * (a - b) for a, b in zip(yi, hi)] for yi, hi in zip(self.y, rows)]
        gram = [[dot(self.y[i], self.y[j]) for j in range(m)] for i in range(m)]
        grad = [
            sum(gram[i][j] * self.lam[j] for j in range(m)) + self.rho * self.lam[i]
            for i in range(m)
        ]
        self.lam = project_simplex_reference([l - gamma_t * g for l, g in zip(self.lam, grad)])
        return weighted_sum(self.lam, self.y), list(self.lam)


def _moco_blocks(gen, m, step):
    scales = torch.tensor([1.0, 0.3, 2.0, 0.7, 1.5][:m], dtype=torch.float64) * (1 + 0.2 * step)
    base = torch.randn(m, 3, 4, generator=gen, dtype=torch.float64)
    a = base * scales.reshape(m, 1, 1)
    b = torch.randn(m, 5, generator=gen, dtype=torch.float64) * scales.reshape(m, 1)
    return [a, b]


def _flat_updates(updates):
    return torch.cat([u.reshape(-1) for u in updates])


MOCO_CONFIGS = {
    "defaults": {},
    "raw_gradients": {"gradient_normalization": "none", "gamma": 0.05},
    "constant_rates_rho": {
        "beta": 0.9,
        "beta_sigma": 0.0,
        "gamma": 0.5,
        "gamma_sigma": 0.0,
        "rho": 0.2,
    },
    "fast_decay": {"beta": 1.0, "beta_sigma": 1.0, "gamma": 2.0, "gamma_sigma": 1.0, "rho": 0.05},
}


@pytest.mark.parametrize("config", sorted(MOCO_CONFIGS))
@pytest.mark.parametrize("m", [2, 3, 5])
def test_moco_matches_reference(config, m):
    kwargs = MOCO_CONFIGS[config]
    full = {
        "beta": 0.5,
        "beta_sigma": 0.5,
        "gamma": 0.1,
        "gamma_sigma": 0.5,
        "rho": 0.0,
        "gradient_normalization": "loss",
    }
    full.update(kwargs)
    weighting = MoCo(**kwargs)
    ref = MoCoReference(
        m,
        17,
        full["beta"],
        full["beta_sigma"],
        full["gamma"],
        full["gamma_sigma"],
        full["rho"],
        full["gradient_normalization"],
    )
    gen = torch.Generator().manual_seed(7 * m)
    lambdas = []
    for step in range(6):
        blocks = _moco_blocks(gen, m, step)
        # Negative losses: the normalisation uses |L_i|.
        losses = torch.linspace(-1.5, 2.5, m, dtype=torch.float64) * (1 + step)
        flat = torch.cat([b.reshape(m, -1) for b in blocks], dim=1)
        expected_d, expected_lam = ref.step(rows_of(flat), losses.tolist())
        updates, lam = weighting.update_from_jacobian(blocks, losses, [2**m - 1] * 2)
        assert [u.shape for u in updates] == [b.shape[1:] for b in blocks]
        torch.testing.assert_close(
            _flat_updates(updates), as_tensor(expected_d), rtol=1e-9, atol=1e-12
        )
        torch.testing.assert_close(lam, as_tensor(expected_lam), rtol=1e-9, atol=1e-12)
        lambdas.append(lam)
    assert not torch.allclose(lambdas[-1], torch.full((m,), 1.0 / m, dtype=torch.float64))


def test_moco_first_step_by_hand():
    """t = 1, beta = 0.5: y = h / 2; one projected step from uniform lambda."""
    J = torch.tensor([[3.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    w = MoCo(gradient_normalization="none", gamma=0.1)
    (update,), lam = w.update_from_jacobian([J.clone()], ones(2), [3])
    y = J / 2  # [[1.5, 0], [0, 0.5]]
    # (Y Y^T) lambda = [2.25, 0.25] * 0.5 = [1.125, 0.125]; lambda - 0.1 * that, projected
    expected_lam = as_tensor(project_simplex_reference([0.5 - 0.1125, 0.5 - 0.0125]))
    torch.testing.assert_close(lam, expected_lam)
    torch.testing.assert_close(update, expected_lam @ y)


@pytest.mark.parametrize("name", sorted(DEGENERATE))
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("normalization", ["loss", "none"])
def test_moco_degenerate_inputs_finite(name, scale, normalization):
    J = torch.tensor(DEGENERATE[name], dtype=torch.float64) * scale
    m = J.shape[0]
    w = MoCo(gradient_normalization=normalization)
    for _ in range(3):
        (update,), lam = w.update_from_jacobian([J.clone()], ones(m) * scale, [2**m - 1])
        assert lam.shape == (m,) and torch.isfinite(lam).all()
        assert torch.isfinite(update).all()
        assert lam.min() >= 0 and abs(float(lam.sum()) - 1.0) < 1e-12


def test_moco_permutation_equivariant():
    gen = torch.Generator().manual_seed(3)
    perm = torch.tensor([2, 0, 3, 1])
    a, b = MoCo(rho=0.1), MoCo(rho=0.1)
    for step in range(4):
        blocks = _moco_blocks(gen, 4, step)
        losses = torch.rand(4, generator=gen, dtype=torch.float64) + 0.5
        ua, la = a.update_from_jacobian(blocks, losses, [15, 15])
        ub, lb = b.update_from_jacobian([x[perm] for x in blocks], losses[perm], [15, 15])
        torch.testing.assert_close(lb, la[perm], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(_flat_updates(ub), _flat_updates(ua), rtol=1e-10, atol=1e-13)


def test_moco_checkpoint_round_trip_bit_identical():
    gen = torch.Generator().manual_seed(11)
    steps = [
        (_moco_blocks(gen, 3, s), torch.rand(3, generator=gen, dtype=torch.float64))
        for s in range(6)
    ]
    original = MoCo(rho=0.05)
    for blocks, losses in steps[:3]:
        original.update_from_jacobian([b.clone() for b in blocks], losses, [7, 7])
    resumed = MoCo(rho=0.05)
    resumed.load_state_dict(round_trip(original.state_dict()))
    for blocks, losses in steps[3:]:
        ua, la = original.update_from_jacobian([b.clone() for b in blocks], losses, [7, 7])
        ub, lb = resumed.update_from_jacobian([b.clone() for b in blocks], losses, [7, 7])
        assert torch.equal(la, lb)
        assert all(torch.equal(x, y) for x, y in zip(ua, ub))
    # The loaded state is a copy, not an alias of the saved tensors.
    state = original.state_dict()
    fresh = MoCo(rho=0.05)
    fresh.load_state_dict(state)
    state["tracked"][0].add_(1.0)
    assert not torch.equal(fresh.tracked[0], state["tracked"][0])


def test_moco_refuses_changed_layout():
    w = MoCo()
    w.update_from_jacobian([torch.ones(2, 3, dtype=torch.float64)], ones(2), [3])
    with pytest.raises(ValueError, match="shared parameters"):
        w.update_from_jacobian([torch.ones(2, 4, dtype=torch.float64)], ones(2), [3])


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"beta": 0.0}, "beta"),
        ({"beta": 1.5}, "beta"),
        ({"beta": "a"}, "beta"),
        ({"beta_sigma": -0.5}, "beta_sigma"),
        ({"gamma": 0.0}, "gamma"),
        ({"gamma": -1.0}, "gamma"),
        ({"gamma_sigma": -1.0}, "gamma_sigma"),
        ({"rho": -0.1}, "rho"),
        ({"rho": float("nan")}, "rho"),
        ({"gradient_normalization": "l2"}, "gradient_normalization"),
    ],
)
def test_moco_bad_hyperparameters(kwargs, name):
    with pytest.raises((TypeError, ValueError), match=name):
        MoCo(**kwargs)


def per_task_grads(losses, params):
    rows = []
    for loss in losses:
        grads = torch.autograd.grad(loss, params, retain_graph=True)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


@pytest.mark.parametrize("normalization", ["loss", "none"])
def test_moco_end_to_end(normalization):
    torch.manual_seed(0)
    net = Net().double()
    opt = MultiTaskOptimizer(
        torch.optim.SGD(net.parameters(), lr=0.05),
        weighting=MoCo(gradient_normalization=normalization),
    )
    encoder = list(net.encoder.parameters())
    n = sum(p.numel() for p in encoder)
    ref = MoCoReference(3, n, 0.5, 0.5, 0.1, 0.5, 0.0, normalization)
    for step in range(3):
        x, y = (t.double() for t in make_batch(step))
        opt.zero_grad()
        losses = net.losses(x, y)
        J = per_task_grads(losses, encoder)
        heads = [per_task_grads([losses[t]], list(net.heads[t].parameters()))[0] for t in range(3)]
        expected, expected_lam = ref.step(rows_of(J), [float(l.detach()) for l in losses])
        opt.step(losses)
        got = torch.cat([p.grad.reshape(-1) for p in encoder])
        torch.testing.assert_close(got, as_tensor(expected), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(
            opt.last_step[0].weights, as_tensor(expected_lam), rtol=1e-9, atol=1e-12
        )
        for t in range(3):  # task heads keep their own task's gradient
            head = torch.cat([p.grad.reshape(-1) for p in net.heads[t].parameters()])
            torch.testing.assert_close(head, heads[t], rtol=1e-12, atol=1e-14)
        assert all(p.grad is None for p in net.unused.parameters())


# ======================================================================================
# SDMGrad
# ======================================================================================


class SDMGradReference:
    """SDMGrad (Xiao, Ban and Ji 2023, Alg. 1) on explicit per-batch gradient lists."""

    def __init__(self, m, lmbda, niter, lr, momentum):
        self.w = [1.0 / m] * m
        self.lmbda, self.niter, self.lr, self.momentum = lmbda, niter, lr, momentum

    def step(self, zeta, xi1, xi2, sampled=None):
        m = len(zeta)
        keep = [1.0] * m if sampled is None else [1.0 if i in sampled else 0.0 for i in range(m)]
        # Unsampled objectives count as zero gradients (SDMGrad-OS).
        xi1 = [[keep[i] * x for x in g] for i, g in enumerate(xi1)]
        xi2 = [[keep[i] * x for x in g] for i, g in enumerate(xi2)]
        scale = (sum(norm(g) for g in xi1) / m) * (sum(norm(g) for g in xi2) / m)
        scale = scale if scale > 0 else 1.0
        A = [[dot(xi1[i], xi2[j]) / scale for j in range(m)] for i in range(m)]
        w = list(self.w)
        buffer = [0.0] * m
        for _ in range(self.niter):
            grad = [
                sum(A[i][j] * w[j] for j in range(m)) + self.lmbda * sum(A[i]) / m for i in range(m)
            ]
            buffer = [self.momentum * b + g for b, g in zip(buffer, grad)]
            w = project_simplex_reference([a - self.lr * b for a, b in zip(w, buffer)])
        self.w = w
        # d = (J_zeta^T w + lmbda g0) / (1 + lmbda), g0 the mean over all m objectives.
        n_kept = sum(keep)
        zeta_kept = [[keep[i] * x for x in g] for i, g in enumerate(zeta)]
        g0 = [sum(col) / m for col in zip(*zeta_kept)]
        gw = weighted_sum(w, zeta_kept)
        d = [(a + self.lmbda * b) / (1 + self.lmbda) for a, b in zip(gw, g0)]
        return [m / n_kept * x for x in d], list(w)


def _three_batches(gen, m, n, noise=0.5):
    base = torch.randn(m, n, generator=gen, dtype=torch.float64)
    base = base * torch.logspace(-0.5, 0.5, m, dtype=torch.float64).reshape(m, 1)
    return [base + noise * torch.randn(m, n, generator=gen, dtype=torch.float64) for _ in range(3)]


SDMGRAD_CONFIGS = {
    "defaults": {},
    "no_momentum": {"momentum": 0.0, "lr": 1.0},
    "mgda_like": {"lmbda": 0.0, "niter": 5, "lr": 2.0},
    "large_lambda": {"lmbda": 2.0, "niter": 1, "lr": 0.5, "momentum": 0.9},
}


@pytest.mark.parametrize("config", sorted(SDMGRAD_CONFIGS))
@pytest.mark.parametrize("m", [2, 3, 5])
def test_sdmgrad_matches_reference(config, m):
    kwargs = {"lmbda": 0.3, "niter": 20, "lr": 10.0, "momentum": 0.5}
    kwargs.update(SDMGRAD_CONFIGS[config])
    weighting = SDMGrad(**kwargs)
    ref = SDMGradReference(m, **kwargs)
    gen = torch.Generator().manual_seed(100 + m)
    history = []
    for _ in range(5):  # warm-started across steps
        batches = _three_batches(gen, m, 7)
        weights = weighting.weights_from_cross_gramians(cross_gramians(batches), ones(m))
        expected_d, expected_w = ref.step(*(rows_of(b) for b in batches))
        assert weights.shape == (m,) and weights.dtype == torch.float64
        torch.testing.assert_close(
            weights @ batches[0], as_tensor(expected_d), rtol=1e-9, atol=1e-12
        )
        torch.testing.assert_close(weighting.weights, as_tensor(expected_w), rtol=1e-9, atol=1e-12)
        history.append(weighting.weights.clone())
    assert not torch.allclose(history[-1], torch.full((m,), 1.0 / m, dtype=torch.float64))


def test_sdmgrad_weights_formula():
    """The returned weights are (w + lmbda / m) / (1 + lmbda), summing to one."""
    gen = torch.Generator().manual_seed(1)
    weighting = SDMGrad(lmbda=0.7)
    weights = weighting.weights_from_cross_gramians(
        cross_gramians(_three_batches(gen, 4, 6)), ones(4)
    )
    torch.testing.assert_close(weights, (weighting.weights + 0.7 / 4) / 1.7)
    assert abs(float(weights.sum()) - 1.0) < 1e-12


def test_sdmgrad_converges_to_the_direction_oriented_optimum():
    """With one batch and enough small steps, w solves min_w 1/2 ||J^T w + lmbda g0||^2 on the
    simplex (checked with scipy's SLSQP on the raw, unnormalised problem)."""
    gen = torch.Generator().manual_seed(5)
    m, n, lmbda = 4, 9, 0.3
    J = torch.randn(m, n, generator=gen, dtype=torch.float64)
    J = J * torch.tensor([1.0, 3.0, 0.5, 2.0], dtype=torch.float64).reshape(m, 1)
    weighting = SDMGrad(lmbda=lmbda, niter=4000, lr=0.05, momentum=0.5)
    weighting.weights_from_gramian(J @ J.T, ones(m))
    rows = rows_of(J)
    g0 = [sum(col) / m for col in zip(*rows)]

    def objective(w):
        v = [a + lmbda * b for a, b in zip(weighted_sum(list(w), rows), g0)]
        return 0.5 * dot(v, v)

    result = scipy.optimize.minimize(
        objective,
        [1.0 / m] * m,
        method="SLSQP",
        bounds=[(0.0, 1.0)] * m,
        constraints=[{"type": "eq", "fun": lambda w: sum(w) - 1.0}],
        options={"ftol": 1e-15, "maxiter": 1000},
    )
    assert result.success
    torch.testing.assert_close(weighting.weights, as_tensor(result.x), rtol=0, atol=2e-6)
    assert objective(weighting.weights.tolist()) <= result.fun * (1 + 1e-6) + 1e-12


def test_sdmgrad_single_gramian_is_the_same_batch_in_every_role():
    gen = torch.Generator().manual_seed(2)
    J = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    a, b = SDMGrad(), SDMGrad()
    for _ in range(3):
        wa = a.weights_from_gramian(J @ J.T, ones(3))
        wb = b.weights_from_cross_gramians(cross_gramians([J, J, J]), ones(3))
        torch.testing.assert_close(wa, wb, rtol=0, atol=0)


@pytest.mark.parametrize("scale", SCALES)
def test_sdmgrad_scale_invariant(scale):
    gen = torch.Generator().manual_seed(8)
    steps = [_three_batches(gen, 3, 5) for _ in range(3)]
    a, b = SDMGrad(), SDMGrad()
    for batches in steps:
        wa = a.weights_from_cross_gramians(cross_gramians(batches), ones(3))
        wb = b.weights_from_cross_gramians(cross_gramians([x * scale for x in batches]), ones(3))
        torch.testing.assert_close(wb, wa, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", sorted(DEGENERATE))
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("n_sampled", [None, 1])
def test_sdmgrad_degenerate_inputs_finite(name, scale, n_sampled):
    J = torch.tensor(DEGENERATE[name], dtype=torch.float64) * scale
    m = J.shape[0]
    weighting = SDMGrad(n_sampled=n_sampled, seed=0)
    # Same batch, and batches whose cross products are negative (noise-like).
    for batches in ([J, J, J], [J, J, -J], [J, 0 * J, J]):
        weights = weighting.weights_from_cross_gramians(cross_gramians(batches), ones(m))
        assert weights.shape == (m,) and torch.isfinite(weights).all()
        assert torch.isfinite(weighting.weights).all()
        assert abs(float(weighting.weights.sum()) - 1.0) < 1e-12


def test_sdmgrad_permutation_equivariant():
    gen = torch.Generator().manual_seed(4)
    perm = torch.tensor([3, 1, 0, 2])
    a, b = SDMGrad(), SDMGrad()
    for _ in range(3):
        batches = _three_batches(gen, 4, 6)
        wa = a.weights_from_cross_gramians(cross_gramians(batches), ones(4))
        wb = b.weights_from_cross_gramians(cross_gramians([x[perm] for x in batches]), ones(4))
        torch.testing.assert_close(wb, wa[perm], rtol=1e-10, atol=1e-13)


def draw_sampled(generator: torch.Generator, m: int, n: int) -> set[int]:
    """The objectives drawn as the library does: n smallest of m uniform keys."""
    keys = torch.rand(m, generator=generator, dtype=torch.float64).tolist()
    return set(sorted(range(m), key=lambda i: keys[i])[:n])


def copy_generator(weighting: SDMGrad) -> torch.Generator:
    generator = torch.Generator()
    generator.set_state(weighting._generator.get_state())
    return generator


@pytest.mark.parametrize("m,n_sampled", [(4, 2), (5, 3), (3, 1)])
def test_sdmgrad_os_matches_reference(m, n_sampled):
    weighting = SDMGrad(n_sampled=n_sampled, seed=3)
    generator = copy_generator(weighting)
    ref = SDMGradReference(m, 0.3, 20, 10.0, 0.5)
    gen = torch.Generator().manual_seed(m)
    for _ in range(5):
        batches = _three_batches(gen, m, 6)
        weights = weighting.weights_from_cross_gramians(cross_gramians(batches), ones(m))
        sampled = draw_sampled(generator, m, n_sampled)
        expected_d, expected_w = ref.step(*(rows_of(b) for b in batches), sampled=sampled)
        assert {i for i in range(m) if weights[i] != 0} == sampled
        torch.testing.assert_close(
            weights @ batches[0], as_tensor(expected_d), rtol=1e-9, atol=1e-12
        )
        torch.testing.assert_close(weighting.weights, as_tensor(expected_w), rtol=1e-9, atol=1e-12)


def test_sdmgrad_os_samples_uniformly():
    m, n, calls = 5, 2, 500
    weighting = SDMGrad(n_sampled=n, niter=1, seed=1)
    gramians = cross_gramians([torch.eye(m, dtype=torch.float64)] * 3)
    counts = torch.zeros(m)
    for _ in range(calls):
        weights = weighting.weights_from_cross_gramians(gramians, ones(m))
        assert int((weights != 0).sum()) == n
        counts += (weights != 0).float()
    # Each objective is drawn with probability n / m = 0.4 (std of the frequency ~ 0.022).
    assert torch.allclose(counts / calls, torch.full((m,), n / m), atol=0.09)


def test_sdmgrad_os_with_every_task_is_sdmgrad():
    gen = torch.Generator().manual_seed(6)
    a, b = SDMGrad(), SDMGrad(n_sampled=3, seed=0)
    for _ in range(3):
        gramians = cross_gramians(_three_batches(gen, 3, 5))
        torch.testing.assert_close(
            b.weights_from_cross_gramians(gramians, ones(3)),
            a.weights_from_cross_gramians(gramians, ones(3)),
            rtol=1e-13,
            atol=1e-15,
        )


def test_sdmgrad_os_more_samples_than_tasks_raises():
    weighting = SDMGrad(n_sampled=4, seed=0)
    with pytest.raises(ValueError, match="n_sampled"):
        weighting.weights_from_gramian(torch.eye(3, dtype=torch.float64), ones(3))
    assert weighting.n_tasks is None and weighting.weights is None


def test_sdmgrad_os_spawn_has_its_own_stream():
    parent = SDMGrad(n_sampled=2, seed=9)
    first, second = parent.spawn(), parent.spawn()
    draws = []
    for weighting in (parent, first, second):
        generator = copy_generator(weighting)
        draws.append([sorted(draw_sampled(generator, 10, 2)) for _ in range(6)])
    assert draws[0] != draws[1] and draws[1] != draws[2] and draws[0] != draws[2]
    assert SDMGrad().spawn()._generator is None  # plain SDMGrad draws nothing


@pytest.mark.parametrize("n_sampled", [None, 2])
def test_sdmgrad_checkpoint_round_trip_bit_identical(n_sampled):
    gen = torch.Generator().manual_seed(12)
    steps = [cross_gramians(_three_batches(gen, 4, 5)) for _ in range(6)]
    original = SDMGrad(n_sampled=n_sampled, seed=4)
    for gramians in steps[:3]:
        original.weights_from_cross_gramians(gramians, ones(4))
    resumed = SDMGrad(n_sampled=n_sampled, seed=99)  # the saved RNG state replaces the seed
    resumed.load_state_dict(round_trip(original.state_dict()))
    for gramians in steps[3:]:
        wa = original.weights_from_cross_gramians(gramians, ones(4))
        wb = resumed.weights_from_cross_gramians(gramians, ones(4))
        assert torch.equal(wa, wb)
        assert torch.equal(original.weights, resumed.weights)


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"lmbda": -0.1}, "lmbda"),
        ({"lmbda": "a"}, "lmbda"),
        ({"niter": 0}, "niter"),
        ({"niter": 2.5}, "niter"),
        ({"niter": True}, "niter"),
        ({"lr": 0.0}, "lr"),
        ({"lr": -1.0}, "lr"),
        ({"momentum": 1.0}, "momentum"),
        ({"momentum": -0.1}, "momentum"),
        ({"n_sampled": 0}, "n_sampled"),
        ({"n_sampled": 1.5}, "n_sampled"),
        ({"n_sampled": 2, "seed": -1}, "seed"),
    ],
)
def test_sdmgrad_bad_hyperparameters(kwargs, name):
    with pytest.raises((TypeError, ValueError), match=name):
        SDMGrad(**kwargs)


@pytest.mark.parametrize("weighting", [SDMGrad, MoDo])
def test_double_sampling_refuses_wrong_gramians(weighting):
    with pytest.raises(ValueError, match="3 mini-batches"):
        weighting().weights_from_cross_gramians(
            torch.zeros(2, 2, 3, 3, dtype=torch.float64), ones(3)
        )
    with pytest.raises(ValueError, match="3 mini-batches"):
        weighting().weights_from_cross_gramians(torch.zeros(3, 3, dtype=torch.float64), ones(3))


@pytest.mark.parametrize("weighting", [SDMGrad, MoDo])
def test_double_sampling_declares_three_batches(weighting):
    assert weighting.n_batches == 3 and weighting.stateful


@pytest.mark.parametrize("weighting", [SDMGrad, MoDo])
def test_double_sampling_fixes_the_task_count(weighting):
    w = weighting()
    w.weights_from_gramian(torch.eye(3, dtype=torch.float64), ones(3))
    with pytest.raises(ValueError, match="3 tasks"):
        w.weights_from_gramian(torch.eye(4, dtype=torch.float64), ones(4))


# ======================================================================================
# MoDo
# ======================================================================================


class MoDoReference:
    """MoDo (Chen et al. 2023, Alg. 1): lambda from batches xi1, xi2; update from zeta."""

    def __init__(self, m, gamma, rho):
        self.lam = [1.0 / m] * m
        self.gamma, self.rho = gamma, rho

    def step(self, zeta, xi1, xi2):
        m = len(zeta)
        xi2_lam = weighted_sum(self.lam, xi2)  # J_xi2^T lambda
        grad = [dot(xi1[i], xi2_lam) + self.rho * self.lam[i] for i in range(m)]
        self.lam = project_simplex_reference([l - self.gamma * g for l, g in zip(self.lam, grad)])
        return weighted_sum(self.lam, zeta), list(self.lam)


@pytest.mark.parametrize("gamma,rho", [(1e-3, 0.1), (0.05, 0.0), (0.2, 0.5)])
@pytest.mark.parametrize("m", [2, 3, 5])
def test_modo_matches_reference(gamma, rho, m):
    weighting = MoDo(gamma=gamma, rho=rho)
    ref = MoDoReference(m, gamma, rho)
    gen = torch.Generator().manual_seed(200 + m)
    for _ in range(6):
        batches = _three_batches(gen, m, 7)
        weights = weighting.weights_from_cross_gramians(cross_gramians(batches), ones(m))
        expected_d, expected_lam = ref.step(*(rows_of(b) for b in batches))
        torch.testing.assert_close(weights, as_tensor(expected_lam), rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(
            weights @ batches[0], as_tensor(expected_d), rtol=1e-10, atol=1e-13
        )
    if gamma > 1e-3:
        assert not torch.allclose(weights, torch.full((m,), 1.0 / m, dtype=torch.float64))


def test_modo_uses_the_cross_product_of_batches_one_and_two():
    """Batch 0 only gives the update: changing it leaves lambda alone; swapping batches 1 and
    2 transposes the cross product (same lambda step only if it is symmetric)."""
    gen = torch.Generator().manual_seed(9)
    batches = _three_batches(gen, 3, 4)
    other = [torch.randn(3, 4, generator=gen, dtype=torch.float64), batches[1], batches[2]]
    a, b = MoDo(gamma=0.1), MoDo(gamma=0.1)
    wa = a.weights_from_cross_gramians(cross_gramians(batches), ones(3))
    wb = b.weights_from_cross_gramians(cross_gramians(other), ones(3))
    assert torch.equal(wa, wb)
    c = MoDo(gamma=0.1)
    wc = c.weights_from_cross_gramians(
        cross_gramians([batches[0], batches[2], batches[1]]), ones(3)
    )
    assert not torch.allclose(wa, wc)


@pytest.mark.parametrize("name", sorted(DEGENERATE))
@pytest.mark.parametrize("scale", SCALES)
def test_modo_degenerate_inputs_finite(name, scale):
    J = torch.tensor(DEGENERATE[name], dtype=torch.float64) * scale
    m = J.shape[0]
    weighting = MoDo(gamma=0.1)
    for batches in ([J, J, J], [J, J, -J]):
        weights = weighting.weights_from_cross_gramians(cross_gramians(batches), ones(m))
        assert weights.shape == (m,) and torch.isfinite(weights).all()
        assert weights.min() >= 0 and abs(float(weights.sum()) - 1.0) < 1e-12


def test_modo_permutation_equivariant():
    gen = torch.Generator().manual_seed(14)
    perm = torch.tensor([1, 3, 0, 2])
    a, b = MoDo(gamma=0.1), MoDo(gamma=0.1)
    for _ in range(4):
        batches = _three_batches(gen, 4, 5)
        wa = a.weights_from_cross_gramians(cross_gramians(batches), ones(4))
        wb = b.weights_from_cross_gramians(cross_gramians([x[perm] for x in batches]), ones(4))
        torch.testing.assert_close(wb, wa[perm], rtol=1e-12, atol=1e-14)


def test_modo_single_gramian_is_the_same_batch_in_every_role():
    J = torch.randn(3, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    a, b = MoDo(gamma=0.1), MoDo(gamma=0.1)
    for _ in range(3):
        wa = a.weights_from_gramian(J @ J.T, ones(3))
        wb = b.weights_from_cross_gramians(cross_gramians([J, J, J]), ones(3))
        assert torch.equal(wa, wb)


def test_modo_checkpoint_round_trip_bit_identical():
    gen = torch.Generator().manual_seed(15)
    steps = [cross_gramians(_three_batches(gen, 3, 5)) for _ in range(6)]
    original = MoDo(gamma=0.1)
    for gramians in steps[:3]:
        original.weights_from_cross_gramians(gramians, ones(3))
    resumed = MoDo(gamma=0.1)
    resumed.load_state_dict(round_trip(original.state_dict()))
    for gramians in steps[3:]:
        assert torch.equal(
            original.weights_from_cross_gramians(gramians, ones(3)),
            resumed.weights_from_cross_gramians(gramians, ones(3)),
        )


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"gamma": 0.0}, "gamma"),
        ({"gamma": -1e-3}, "gamma"),
        ({"gamma": "x"}, "gamma"),
        ({"rho": -0.1}, "rho"),
        ({"rho": float("inf")}, "rho"),
    ],
)
def test_modo_bad_hyperparameters(kwargs, name):
    with pytest.raises((TypeError, ValueError), match=name):
        MoDo(**kwargs)


@pytest.mark.parametrize(
    "weighting", [lambda: MoCo(), lambda: SDMGrad(n_sampled=2, seed=1), lambda: MoDo()]
)
def test_repr_and_hyperparameters_are_plain(weighting):
    w = weighting()
    name = type(w).__name__
    assert repr(w).startswith(f"{name}(")
    for value in w.hyperparameters().values():
        assert value is None or isinstance(value, (int, float, str))


# ======================================================================================
# End to end: the optimizer calls the closure once per mini-batch (batch 0 first)
# ======================================================================================


def _closure_run(weighting, reference, steps=2):
    torch.manual_seed(0)
    net = Net().double()
    opt = MultiTaskOptimizer(torch.optim.SGD(net.parameters(), lr=0.05), weighting=weighting)
    encoder = list(net.encoder.parameters())
    drawn = [0]

    def closure():
        x, y = (t.double() for t in make_batch(drawn[0]))
        drawn[0] += 1
        return net.losses(x, y)

    for step in range(steps):
        jacobians = []
        for k in range(3):  # the three batches the closure will draw, at the current point
            x, y = (t.double() for t in make_batch(3 * step + k))
            jacobians.append(per_task_grads(net.losses(x, y), encoder))
        expected_d, _ = reference.step(*(rows_of(j) for j in jacobians))
        opt.zero_grad()
        opt.step(closure)
        assert drawn[0] == 3 * (step + 1)
        got = torch.cat([p.grad.reshape(-1) for p in encoder])
        torch.testing.assert_close(got, as_tensor(expected_d), rtol=1e-9, atol=1e-12)


def test_sdmgrad_end_to_end_with_closure():
    _closure_run(SDMGrad(), SDMGradReference(3, 0.3, 20, 10.0, 0.5))


def test_modo_end_to_end_with_closure():
    _closure_run(MoDo(gamma=0.1), MoDoReference(3, 0.1, 0.1))
