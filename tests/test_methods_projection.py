"""MGDA, UPGrad and DualProj against independent references written from the papers.

The references work on explicit per-task gradient vectors (numpy) and solve each problem in
its primal form with scipy.optimize: MGDA as the min-norm point of the (normalised) gradients'
convex hull; UPGrad and DualProj as Euclidean projections onto the dual cone ``{d : J d >= 0}``
in the gradients' own space. torchjd's regularisation ``G / tr(G) + reg I`` is the Gramian of
the augmented rows ``[g_i / sqrt(tr G), sqrt(reg) e_i]``, so the references project those.
"""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mtlopt import MultiTaskOptimizer
from mtlopt.weighting import resolve, weighting_class
from mtlopt.weighting.dualproj import DualProj
from mtlopt.weighting.mgda import MGDA
from mtlopt.weighting.upgrad import UPGrad
from tests.conftest import Net, make_batch

scipy_optimize = pytest.importorskip("scipy.optimize")

NORMALIZATIONS = ["none", "l2", "loss", "loss+"]


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Thousands of tiny batched LUs: OpenMP threads only add contention on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ======================================================================================
# Independent references (numpy / scipy on explicit gradient vectors)
# ======================================================================================


def random_jacobian(seed: int, m: int, n: int, spread: float = 1.5) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(m, n)) * np.exp(rng.normal(size=(m, 1)) * spread)


def min_norm_point(rows: np.ndarray) -> np.ndarray:
    """argmin ||sum_i a_i r_i||^2 over the simplex (SLSQP), returned as the point itself."""
    m = rows.shape[0]
    scale = max(np.abs(rows).max(), 1e-300)
    unit = rows / scale
    result = scipy_optimize.minimize(
        lambda a: np.sum((a @ unit) ** 2),
        np.full(m, 1.0 / m),
        jac=lambda a: 2 * unit @ (a @ unit),
        bounds=[(0, None)] * m,
        constraints=[{"type": "eq", "fun": lambda a: a.sum() - 1, "jac": lambda a: np.ones(m)}],
        method="SLSQP",
        options={"ftol": 1e-16, "maxiter": 2000},
    )
    return result.x @ rows


def mgda_reference(jac: np.ndarray, losses: np.ndarray, normalization: str) -> np.ndarray:
    """Sener and Koltun's Eq. 3 on g_i / n_i; the update is the min-norm point (LibMTL)."""
    return min_norm_point(normalized_rows(jac, losses, normalization))


def normalized_rows(jac: np.ndarray, losses: np.ndarray, normalization: str) -> np.ndarray:
    """g_i / n_i with the normalisers of Sener and Koltun's code (1 where n_i would be 0)."""
    normalizers = []
    for g, loss in zip(jac, losses):
        norm = math.sqrt(sum(v * v for v in g))
        norm = norm if norm > 0 else 1.0
        loss = abs(loss) if loss != 0 else 1.0
        normalizers.append(
            {"none": 1.0, "l2": norm, "loss": loss, "loss+": loss * norm}[normalization]
        )
    return jac / np.array(normalizers)[:, None]


def project_dual_cone(rows: np.ndarray, target: np.ndarray) -> np.ndarray:
    """argmin_d ||d - target||^2 s.t. rows @ d >= 0 (SLSQP in the gradients' space)."""
    scale = max(np.abs(rows).max(), 1e-300)
    unit = rows / scale
    result = scipy_optimize.minimize(
        lambda d: 0.5 * np.sum((d - target) ** 2),
        target.copy(),
        jac=lambda d: d - target,
        constraints=[{"type": "ineq", "fun": lambda d: unit @ d, "jac": lambda d: unit}],
        method="SLSQP",
        options={"ftol": 1e-16, "maxiter": 2000},
    )
    return result.x


def augmented_rows(jac: np.ndarray, norm_eps: float, reg_eps: float) -> np.ndarray:
    """Rows whose Gramian is torchjd's conditioned one: G / tr(G) (or 0) + reg_eps I."""
    m = jac.shape[0]
    trace = float(np.sum(jac * jac))
    scaled = np.zeros_like(jac) if (trace < norm_eps or trace <= 0) else jac / math.sqrt(trace)
    return np.concatenate([scaled, math.sqrt(reg_eps) * np.eye(m)], axis=1)


def upgrad_reference(jac, pref, norm_eps=1e-4, reg_eps=1e-4) -> np.ndarray:
    """sum_i pref_i pi(g_i), in the augmented space (the paper's definition, torchjd's G)."""
    rows = augmented_rows(jac, norm_eps, reg_eps)
    return sum(project_dual_cone(rows, p * row) for p, row in zip(pref, rows))


def dualproj_reference(jac, pref, norm_eps=1e-4, reg_eps=1e-4) -> np.ndarray:
    rows = augmented_rows(jac, norm_eps, reg_eps)
    return project_dual_cone(rows, np.asarray(pref) @ rows)


def augmented_update(jac, weights, norm_eps=1e-4, reg_eps=1e-4) -> np.ndarray:
    """The library's weights applied to the augmented rows (comparable with the references)."""
    return weights @ augmented_rows(jac, norm_eps, reg_eps)


def library_weights(weighting, jac: np.ndarray, losses: np.ndarray | None = None) -> np.ndarray:
    gram = torch.tensor(jac @ jac.T)
    loss_values = (
        torch.ones(jac.shape[0], dtype=torch.float64) if losses is None else torch.tensor(losses)
    )
    weights = weighting.weights_from_gramian(gram, loss_values)
    assert weights.dtype == torch.float64 and weights.shape == (jac.shape[0],)
    return weights.numpy()


# ======================================================================================
# MGDA
# ======================================================================================


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
@pytest.mark.parametrize("seed, m, n", [(0, 2, 5), (1, 3, 4), (2, 5, 3), (3, 6, 10), (4, 4, 1)])
def test_mgda_matches_reference(normalization, seed, m, n):
    jac = random_jacobian(seed, m, n)
    losses = np.random.default_rng(seed).uniform(0.1, 5.0, size=m)
    w = library_weights(MGDA(normalization), jac, losses)
    d_ref = mgda_reference(jac, losses, normalization)
    scale = np.abs(normalized_rows(jac, losses, normalization)).max()
    np.testing.assert_allclose(w @ jac, d_ref, rtol=0, atol=1e-6 * scale)
    assert np.all(w >= 0)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 7), st.integers(1, 9))
def test_mgda_common_descent_direction(seed, m, n):
    """The min-norm point d satisfies g_i . d >= ||d||^2 for every task (Desideri's MGDA)."""
    jac = random_jacobian(seed, m, n)
    w = library_weights(MGDA(), jac)
    d = w @ jac
    scale = (jac * jac).sum(1).max()
    assert np.all(jac @ d >= d @ d - 1e-10 * scale)
    np.testing.assert_allclose(w.sum(), 1.0, atol=1e-12)


def test_mgda_two_tasks_closed_form():
    """Sener and Koltun's Algorithm 1 for two tasks, written plainly."""
    g1, g2 = np.array([3.0, 1.0, -2.0]), np.array([-1.0, 0.5, 4.0])
    a = min(max((g2 - g1) @ g2 / np.sum((g1 - g2) ** 2), 0.0), 1.0)
    np.testing.assert_allclose(library_weights(MGDA(), np.stack([g1, g2])), [a, 1 - a], atol=1e-12)


def test_mgda_normalized_weights_map_back():
    """With l2 normalisation, w_i = a_i / ||g_i||: rescaling one gradient leaves d unchanged."""
    jac = random_jacobian(9, 3, 4)
    scaled = jac * np.array([[1.0], [1e3], [1e-3]])
    d = library_weights(MGDA("l2"), jac) @ jac
    d_scaled = library_weights(MGDA("l2"), scaled) @ scaled
    np.testing.assert_allclose(d_scaled, d, rtol=1e-9, atol=1e-12)


# ======================================================================================
# UPGrad and DualProj
# ======================================================================================

PROJECTION_CASES = [(0, 2, 3), (1, 3, 3), (2, 4, 6), (3, 5, 2), (4, 3, 1), (5, 6, 8)]


@pytest.mark.parametrize("seed, m, n", PROJECTION_CASES)
@pytest.mark.parametrize("options", [{}, {"reg_eps": 1e-2, "norm_eps": 0.0}, {"pref": True}])
def test_upgrad_matches_reference(seed, m, n, options):
    jac = random_jacobian(seed, m, n)
    pref = np.random.default_rng(seed).uniform(0.1, 1.0, size=m) if options.get("pref") else None
    eps = {k: v for k, v in options.items() if k != "pref"}
    w = library_weights(UPGrad(pref_vector=pref, **eps), jac)
    ref = upgrad_reference(jac, np.full(m, 1 / m) if pref is None else pref, **eps)
    np.testing.assert_allclose(augmented_update(jac, w, **eps), ref, rtol=0, atol=1e-7)


@pytest.mark.parametrize("seed, m, n", PROJECTION_CASES)
@pytest.mark.parametrize("options", [{}, {"reg_eps": 1e-2, "norm_eps": 0.0}, {"pref": True}])
def test_dualproj_matches_reference(seed, m, n, options):
    jac = random_jacobian(seed, m, n)
    pref = np.random.default_rng(seed).uniform(0.1, 1.0, size=m) if options.get("pref") else None
    eps = {k: v for k, v in options.items() if k != "pref"}
    w = library_weights(DualProj(pref_vector=pref, **eps), jac)
    ref = dualproj_reference(jac, np.full(m, 1 / m) if pref is None else pref, **eps)
    np.testing.assert_allclose(augmented_update(jac, w, **eps), ref, rtol=0, atol=1e-7)


@pytest.mark.parametrize("kind", ["UPGrad", "DualProj"])
def test_without_regularisation_matches_plain_projection(kind):
    """reg_eps = 0: the update is the projection in the gradients' own space, J d >= 0 exactly."""
    jac = random_jacobian(6, 4, 7)
    weighting = UPGrad(reg_eps=0.0) if kind == "UPGrad" else DualProj(reg_eps=0.0)
    d = library_weights(weighting, jac) @ jac
    if kind == "UPGrad":
        ref = sum(project_dual_cone(jac, row / 4) for row in jac)
    else:
        ref = project_dual_cone(jac, jac.mean(0))
    scale = np.abs(jac).max()
    np.testing.assert_allclose(d, ref, rtol=0, atol=1e-7 * scale)
    assert np.all(jac @ d >= -1e-10 * scale**2)


def test_many_tasks_use_the_interior_point_path():
    """m = 13: beyond face enumeration for all three methods; same references."""
    jac = random_jacobian(21, 13, 20, spread=1.0)
    m = jac.shape[0]
    w = library_weights(MGDA(), jac)
    scale = np.abs(jac).max()
    np.testing.assert_allclose(w @ jac, min_norm_point(jac), rtol=0, atol=1e-6 * scale)
    w = library_weights(UPGrad(), jac)
    ref = upgrad_reference(jac, np.full(m, 1 / m))
    np.testing.assert_allclose(augmented_update(jac, w), ref, rtol=0, atol=1e-7)
    w = library_weights(DualProj(), jac)
    ref = dualproj_reference(jac, np.full(m, 1 / m))
    np.testing.assert_allclose(augmented_update(jac, w), ref, rtol=0, atol=1e-7)


def test_torchjd_documented_values():
    """torchjd's documentation examples (J = [[-4, 1, 1], [6, 1, 1]]), 4 decimals."""
    jac = np.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
    np.testing.assert_allclose(
        library_weights(UPGrad(), jac) @ jac, [0.2929, 1.9004, 1.9004], atol=1e-4
    )
    np.testing.assert_allclose(
        library_weights(DualProj(), jac) @ jac, [0.5563, 1.1109, 1.1109], atol=1e-4
    )


@settings(max_examples=30, deadline=None)
@given(
    st.integers(0, 10_000), st.integers(1, 7), st.integers(1, 9), st.sampled_from([0.0, 1e-4, 1e-2])
)
def test_non_conflicting(seed, m, n, reg_eps):
    """g_i . d >= 0, up to the reg_eps-sized slack the ridge introduces (see the docstring)."""
    jac = random_jacobian(seed, m, n)
    trace = float(np.sum(jac * jac))
    for weighting in (
        UPGrad(norm_eps=0.0, reg_eps=reg_eps),
        DualProj(norm_eps=0.0, reg_eps=reg_eps),
    ):
        w = library_weights(weighting, jac)
        # (G / tr + reg I) v >= 0 at each solution v >= 0, so (J d)_i >= -reg tr w_i.
        assert np.all(w >= 0)
        slack = reg_eps * trace * w + 1e-10 * trace
        assert np.all(jac @ (w @ jac) >= -slack)


def test_upgrad_scale_behaviour():
    jac = random_jacobian(8, 4, 5)
    gram = jac @ jac.T
    base = UPGrad(norm_eps=0.0).weights_from_gramian(torch.tensor(gram), torch.ones(4))
    for scale in (1e-10, 1e15):
        w = UPGrad(norm_eps=0.0).weights_from_gramian(torch.tensor(gram * scale**2), torch.ones(4))
        torch.testing.assert_close(w, base, rtol=1e-9, atol=1e-12)
    # torchjd's threshold: a Gramian with trace below norm_eps counts as zero -> the mean.
    tiny = torch.tensor(gram / np.trace(gram) * 1e-6)
    torch.testing.assert_close(
        UPGrad().weights_from_gramian(tiny, torch.ones(4)),
        torch.full((4,), 0.25, dtype=torch.float64),
    )


# ======================================================================================
# All three: degenerate input, permutations, hyperparameters, end to end
# ======================================================================================

FACTORIES = {
    "MGDA": MGDA,
    "MGDA-l2": lambda: MGDA("l2"),
    "MGDA-loss+": lambda: MGDA("loss+"),
    "UPGrad": UPGrad,
    "DualProj": DualProj,
    "UPGrad-noreg": lambda: UPGrad(norm_eps=0.0, reg_eps=0.0),
    "DualProj-noreg": lambda: DualProj(norm_eps=0.0, reg_eps=0.0),
}


def degenerate_jacobians():
    base = random_jacobian(0, 4, 5)
    cases = {
        "zero_row": np.concatenate([np.zeros((1, 5)), base[1:]]),
        "all_zero": np.zeros((3, 5)),
        "duplicate": np.concatenate([base[:1], base[:1], base[2:]]),
        "opposite": np.stack([base[0], -base[0], base[1]]),
        "rank1": np.outer([1.0, -2.0, 0.5, 3.0], base[0]),
        "single_task": base[:1],
    }
    for scale in (1e-10, 1e15):
        cases[f"scale_{scale:g}"] = base * scale
    return cases


@pytest.mark.parametrize("name", sorted(FACTORIES))
@pytest.mark.parametrize("case", sorted(degenerate_jacobians()))
def test_degenerate_inputs_give_finite_weights(name, case):
    jac = degenerate_jacobians()[case]
    m = jac.shape[0]
    w = library_weights(FACTORIES[name](), jac, np.linspace(0.5, 2.0, m))
    assert w.shape == (m,) and np.all(np.isfinite(w))


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_permutation_equivariant(name):
    jac = random_jacobian(12, 5, 8)
    losses = np.array([0.5, 1.0, 2.0, 3.0, 0.2])
    perm = np.array([3, 0, 4, 1, 2])
    w = library_weights(FACTORIES[name](), jac, losses)
    w_perm = library_weights(FACTORIES[name](), jac[perm], losses[perm])
    np.testing.assert_allclose(w_perm, w[perm], rtol=1e-8, atol=1e-10)


def test_preference_vector_permutes_with_tasks():
    jac = random_jacobian(13, 4, 6)
    pref = np.array([0.1, 0.4, 0.2, 0.3])
    perm = np.array([2, 3, 1, 0])
    for cls in (UPGrad, DualProj):
        w = library_weights(cls(pref_vector=pref), jac)
        w_perm = library_weights(cls(pref_vector=torch.tensor(pref[perm])), jac[perm])
        np.testing.assert_allclose(w_perm, w[perm], rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize(
    "factory, argument, error",
    [
        (lambda: MGDA("L2"), "normalization", ValueError),
        (lambda: MGDA(None), "normalization", ValueError),
        (lambda: UPGrad(norm_eps=-1.0), "norm_eps", ValueError),
        (lambda: UPGrad(reg_eps=float("nan")), "reg_eps", ValueError),
        (lambda: UPGrad(reg_eps=float("inf")), "reg_eps", ValueError),
        (lambda: DualProj(norm_eps="small"), "norm_eps", TypeError),
        (lambda: DualProj(reg_eps=True), "reg_eps", TypeError),
        (lambda: UPGrad(pref_vector=torch.ones(2, 2)), "pref_vector", ValueError),
        (lambda: DualProj(pref_vector=[1.0, float("nan")]), "pref_vector", ValueError),
        (lambda: UPGrad(pref_vector=[]), "pref_vector", ValueError),
        (lambda: DualProj(pref_vector="ab"), "pref_vector", TypeError),
    ],
)
def test_bad_hyperparameters(factory, argument, error):
    with pytest.raises(error, match=argument):
        factory()


@pytest.mark.parametrize("cls", [UPGrad, DualProj])
def test_pref_vector_length_must_match_tasks(cls):
    with pytest.raises(ValueError, match="pref_vector"):
        cls(pref_vector=[0.5, 0.5]).weights_from_gramian(
            torch.eye(3, dtype=torch.float64), torch.ones(3)
        )


def test_names_hyperparameters_and_state():
    assert weighting_class("upgrad") is UPGrad
    assert weighting_class("Dual-Proj") is DualProj
    assert isinstance(resolve("mgda"), MGDA)
    weighting = UPGrad(pref_vector=torch.tensor([0.2, 0.8], dtype=torch.float64), reg_eps=1e-3)
    assert weighting.hyperparameters() == {
        "pref_vector": [0.2, 0.8],
        "norm_eps": 1e-4,
        "reg_eps": 1e-3,
    }
    assert repr(MGDA("loss+")) == "MGDA(normalization='loss+')"
    for w in (MGDA(), UPGrad(), DualProj()):
        assert not w.stateful and w.needs == "gramian"
        assert w.state_dict() == {"n_tasks": None}
        assert w.spawn().hyperparameters() == w.hyperparameters()


def reference_update(name: str, jac: np.ndarray, losses: np.ndarray) -> np.ndarray:
    m = jac.shape[0]
    if name.startswith("MGDA"):
        normalization = {"MGDA": "none", "MGDA-l2": "l2", "MGDA-loss+": "loss+"}[name]
        return mgda_reference(jac, losses, normalization)
    if name == "UPGrad":
        aug = upgrad_reference(jac, np.full(m, 1 / m))
    else:
        aug = dualproj_reference(jac, np.full(m, 1 / m))
    # Recover the update in the original space from the augmented one: the last m coordinates
    # are sqrt(reg) w, and d = w^T J.
    weights = aug[jac.shape[1] :] / math.sqrt(1e-4)
    return weights @ jac


@pytest.mark.parametrize("name", ["MGDA", "MGDA-l2", "MGDA-loss+", "UPGrad", "DualProj"])
def test_end_to_end_through_optimizer(name):
    torch.manual_seed(0)
    net = Net().double()
    opt = MultiTaskOptimizer(
        torch.optim.SGD(net.parameters(), lr=0.05), weighting=FACTORIES[name]()
    )
    x, y = make_batch(0)
    x, y = x.double(), y.double()
    losses = net.losses(x, y)
    encoder = list(net.encoder.parameters())
    # J by a plain loop of autograd.grad calls, one per task.
    rows = [
        torch.cat([g.flatten() for g in torch.autograd.grad(loss, encoder, retain_graph=True)])
        for loss in losses
    ]
    jac = torch.stack(rows).numpy()
    heads = [
        [g.clone() for g in torch.autograd.grad(loss, list(h.parameters()), retain_graph=True)]
        for loss, h in zip(losses, net.heads)
    ]
    loss_values = np.array([float(loss.detach()) for loss in losses])
    opt.zero_grad()
    opt.step(losses)
    update = torch.cat([p.grad.flatten() for p in encoder]).numpy()
    ref = reference_update(name, jac, loss_values)
    np.testing.assert_allclose(update, ref, rtol=0, atol=1e-6 * np.abs(jac).max())
    for head, grads in zip(net.heads, heads):
        for p, g in zip(head.parameters(), grads):
            torch.testing.assert_close(p.grad, g)
    assert net.unused.weight.grad is None


def test_mgda_ub_is_the_representation_mode():
    """MGDA-UB: the min-norm problem on the gradients w.r.t. the shared representation z."""
    torch.manual_seed(0)
    net = Net().double()
    opt = MultiTaskOptimizer(torch.optim.SGD(net.parameters(), lr=0.0), weighting=MGDA())
    x, y = make_batch(2)
    z = net.encoder(x.double())
    losses = [((h(z).squeeze(-1) - y[:, t].double()) ** 2).mean() for t, h in enumerate(net.heads)]
    rows = [torch.autograd.grad(loss, z, retain_graph=True)[0] for loss in losses]
    jz = torch.stack([r.reshape(-1) for r in rows]).numpy()
    d_z = torch.tensor(min_norm_point(jz)).reshape(z.shape)
    encoder = list(net.encoder.parameters())
    expected = torch.autograd.grad(z, encoder, d_z, retain_graph=True)
    opt.step(losses, features=z)
    for p, g in zip(encoder, expected):
        torch.testing.assert_close(p.grad, g, rtol=0, atol=1e-6 * float(np.abs(jz).max()))


def test_checkpoint_round_trip():
    net = Net()
    opt = MultiTaskOptimizer(
        torch.optim.SGD(net.parameters(), lr=0.05), weighting=UPGrad(pref_vector=[0.2, 0.3, 0.5])
    )
    x, y = make_batch(1)
    opt.zero_grad()
    opt.step(net.losses(x, y))
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    fresh = MultiTaskOptimizer(
        torch.optim.SGD(Net().parameters(), lr=0.05), weighting=UPGrad(pref_vector=[0.2, 0.3, 0.5])
    )
    fresh.load_state_dict(state)
    other = MultiTaskOptimizer(torch.optim.SGD(Net().parameters(), lr=0.05), weighting=UPGrad())
    with pytest.raises(ValueError, match="UPGrad"):
        other.load_state_dict(state)
