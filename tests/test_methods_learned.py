"""UW, FAMO, DB-MTL and GradNorm against references written from the papers.

References: autograd of the methods' own objectives on leaf tensors (UW's and GradNorm's
closed-form gradients), ``torch.optim.Adam`` driving FAMO's logits as the authors' code does,
plain loops over explicit per-task gradient vectors (DB-MTL, GradNorm), and finite
differences of the scalarised objective for FAMO's loss weights. End-to-end tests compare the
optimizer's gradients with loops of autograd calls.
"""

from __future__ import annotations

import copy
import io
import itertools
import math

import pytest
import torch

from mtlopt import MultiTaskOptimizer
from mtlopt.solvers import host_linalg
from mtlopt.weighting.dbmtl import DBMTL
from mtlopt.weighting.famo import FAMO
from mtlopt.weighting.gradnorm import GradNorm
from mtlopt.weighting.imtl import IMTLL
from mtlopt.weighting.uncertainty import UW

from .conftest import Net
from .references import batch64, double_net, encoder_params, flat_grad, head_params, task_gradients

F64 = torch.float64
M = 3


def t64(values) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


def roundtrip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def assert_same(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert set(a) == set(b)
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b














def own_group_optimizer(
    net: Net, weighting, lr: float = 0.05, base: str = "sgd"
) -> MultiTaskOptimizer:
    """One param group that names ``weighting`` itself (so it is not spawned)."""
    groups = [{"params": net.parameters(), "weighting": weighting}]
    inner = torch.optim.SGD(groups, lr=lr) if base == "sgd" else torch.optim.Adam(groups, lr=lr)
    opt = MultiTaskOptimizer(inner)
    assert opt.weightings()[0] is weighting
    return opt


def learnable_group(opt: MultiTaskOptimizer) -> dict:
    groups = [g for g in opt.param_groups if g.get("mtlopt_role") == "loss_scales"]
    assert len(groups) == 1
    return groups[0]


def check_checkpoint_continues(make_weighting, base: str = "adam", closure: bool = False) -> None:
    """Train, save through torch.save / torch.load(weights_only=True), load into a fresh
    optimizer, then both continue bit-identically."""
    net = double_net(4)
    opt = own_group_optimizer(net, make_weighting(), lr=0.01, base=base)

    def train(model, optimizer, steps):
        for step in steps:
            optimizer.zero_grad()
            batch = batch64(step)
            if closure:
                optimizer.step(lambda batch=batch: model.losses(*batch))
            else:
                optimizer.step(model.losses(*batch))

    train(net, opt, range(3))
    state = roundtrip(opt.state_dict())
    net2 = copy.deepcopy(net)
    opt2 = own_group_optimizer(net2, make_weighting(), lr=0.01, base=base)
    opt2.load_state_dict(state)
    assert_same(opt.weightings()[0].state_dict(), opt2.weightings()[0].state_dict())
    train(net, opt, range(3, 7))
    train(net2, opt2, range(3, 7))
    for a, b in zip(net.parameters(), net2.parameters()):
        assert torch.equal(a, b)
    assert_same(opt.weightings()[0].state_dict(), opt2.weightings()[0].state_dict())


# ============================================================================ UW
def uw_objective_gradient(s: list[float], losses: list[float]) -> list[float]:
    """d/ds of sum_i exp(-s_i) L_i + s_i, by autograd on a leaf tensor."""
    leaf = t64(s).requires_grad_()
    objective = ((-leaf).exp() * t64(losses) + leaf).sum()
    return torch.autograd.grad(objective, leaf)[0].tolist()


def assert_uw_step(w: UW, losses: torch.Tensor) -> None:
    """UW's weights ``exp(-s)`` and its log-variances' gradient, against the objective's
    autograd gradient, for the log-variances ``w`` holds now."""
    s = w.log_variances.detach().double().tolist()
    torch.testing.assert_close(w.loss_weights(losses), t64([math.exp(-v) for v in s]))
    w.accumulate_parameter_grads(losses)
    expected = torch.tensor(uw_objective_gradient(s, losses.tolist()), dtype=torch.float32)
    torch.testing.assert_close(w.log_variances.grad, expected, rtol=1e-6, atol=1e-7)


def test_uw_weights_and_closed_form_gradient():
    w = UW(n_tasks=M)
    with torch.no_grad():
        w.log_variances.copy_(torch.tensor([0.3, -1.2, 2.0]))
    losses = t64([0.5, 4.0, 0.01])
    assert_uw_step(w, losses)


@pytest.mark.parametrize("change", ["values in place", "values replaced", "other losses"])
def test_uw_reuses_its_precisions_only_for_the_same_losses_and_values(change):
    """The weights computed for ``loss_weights`` serve the same step's gradient, never a
    step where the values or the losses changed (checked against the formula)."""
    w = UW(n_tasks=M)
    losses = t64([0.5, 4.0, 0.01])
    w.loss_weights(losses)
    if change == "values in place":
        with torch.no_grad():
            w.log_variances.add_(torch.tensor([0.3, -1.2, 2.0]))
    elif change == "values replaced":
        w.load_state_dict({"n_tasks": M, "log_variances": torch.tensor([0.3, -1.2, 2.0])})
    else:
        losses = t64([1.5, 0.2, 3.0])
    assert_uw_step(w, losses)


@pytest.mark.parametrize(
    ("make", "weight", "gradient"),
    [
        (UW, lambda s: math.exp(-s), lambda s, loss: 1.0 - math.exp(-s) * loss),
        (IMTLL, lambda s: math.exp(s), lambda s, loss: math.exp(s) * loss - 1.0),
    ],
    ids=["UW", "IMTLL"],
)
@pytest.mark.parametrize("host", [True, False], ids=["host-floats", "tensors"])
def test_learned_values_gradient_written_once_is_not_reused(
    make, weight, gradient, host, monkeypatch
):
    """The values' gradient, computed with the loss weights before the backward pass, is
    handed to ``.grad`` once: changing ``.grad`` in place (clipping, say) leaves the weights
    alone, and a second accumulation adds a fresh copy (checked against the formulas). On
    the CPU the terms are computed on Python floats (``host_terms``), elsewhere as tensors."""
    monkeypatch.setattr(host_linalg, "HOST_READS", host)
    w = make(n_tasks=M)
    with torch.no_grad():
        w.parameter.copy_(torch.tensor([0.3, -1.2, 2.0]))
    losses = t64([0.5, 4.0, 0.01])
    s = w.parameter.detach().double().tolist()
    weights = t64([weight(v) for v in s])
    expected = torch.tensor([gradient(v, x) for v, x in zip(s, losses.tolist())])
    torch.testing.assert_close(w.loss_weights(losses), weights)
    w.accumulate_parameter_grads(losses)
    torch.testing.assert_close(w.parameter.grad, expected, rtol=1e-6, atol=1e-7)
    w.parameter.grad.mul_(0.5)
    torch.testing.assert_close(w.loss_weights(losses), weights)
    w.accumulate_parameter_grads(losses)
    torch.testing.assert_close(w.parameter.grad, 1.5 * expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("make", [UW, IMTLL])
def test_host_and_tensor_terms_agree_and_overflow_falls_back(make, monkeypatch):
    """The Python-float terms against the tensor ones, to the last bit or one rounding of
    exp; a value whose exponential overflows Python's math.exp takes the tensor path (inf,
    as the tensors give)."""
    terms = []
    for host in (True, False):
        monkeypatch.setattr(host_linalg, "HOST_READS", host)
        w = make(n_tasks=5)
        with torch.no_grad():
            w.parameter.copy_(torch.tensor([0.3, -1.2, 2.0, 0.0, -7.5]))
        losses = t64([0.5, 4.0, 0.01, 1.0, 3.0])
        terms.append((w.loss_weights(losses), w.step_terms(losses)[1]))
    (host_weights, host_grad), (weights, grad) = terms
    torch.testing.assert_close(host_weights, weights, rtol=2.3e-16, atol=0)
    torch.testing.assert_close(host_grad, grad, rtol=0, atol=0)
    monkeypatch.setattr(host_linalg, "HOST_READS", True)
    w = make(n_tasks=2)
    with torch.no_grad():
        w.parameter.copy_(torch.tensor([800.0 if make is IMTLL else -800.0, 0.0]))
    weights = w.loss_weights(t64([1.0, 1.0]))
    assert math.isinf(weights[0]) and weights[1] == 1.0


def test_uw_end_to_end_trains_log_variances_with_the_base_optimizer():
    net = double_net(1)
    lr = 0.05
    w = UW()
    w.log_variances.data = torch.zeros(0, dtype=F64)  # float64 like the model: exact comparisons
    opt = own_group_optimizer(net, w, lr=lr)
    assert learnable_group(opt)["params"][0] is w.log_variances
    s = [0.0] * M
    for step in range(3):
        opt.zero_grad()
        losses = net.losses(*batch64(step))
        values = [float(l.detach()) for l in losses]
        factors = [math.exp(-v) for v in s]
        opt.backward(losses, retain_graph=True)
        expected = sum(c * g for c, g in zip(factors, task_gradients(losses, encoder_params(net))))
        torch.testing.assert_close(flat_grad(encoder_params(net)), expected, rtol=1e-9, atol=1e-12)
        for t in range(M):
            own = task_gradients([losses[t]], head_params(net, t))[0]
            torch.testing.assert_close(
                flat_grad(head_params(net, t)), factors[t] * own, rtol=1e-9, atol=1e-12
            )
        opt.step()
        s = [a - lr * g for a, g in zip(s, uw_objective_gradient(s, values))]
        torch.testing.assert_close(
            w.log_variances.detach().double(), t64(s), rtol=1e-12, atol=1e-14
        )


def test_uw_lr_override_and_group_exists_before_first_step():
    net = double_net(2)
    opt = own_group_optimizer(net, UW(lr=0.5))
    group = learnable_group(opt)
    assert group["lr"] == 0.5 and group["params"][0].numel() == 0
    opt.step(net.losses(*batch64(0)))
    assert group["params"][0].shape == (M,)


def test_uw_extreme_losses_give_finite_weights_and_gradients():
    w = UW(n_tasks=4)
    losses = t64([0.0, 1e-10, 1e15, 1.0])
    assert torch.isfinite(w.loss_weights(losses)).all()
    w.accumulate_parameter_grads(losses)
    assert torch.isfinite(w.log_variances.grad).all()


def test_uw_checkpoint_roundtrip():
    check_checkpoint_continues(UW)


@pytest.mark.parametrize(
    "kwargs,name", [({"lr": 0}, "lr"), ({"lr": -1.0}, "lr"), ({"n_tasks": 0}, "n_tasks")]
)
def test_uw_bad_hyperparameters(kwargs, name):
    with pytest.raises((TypeError, ValueError), match=name):
        UW(**kwargs)


# ============================================================================ FAMO
class FAMOReference:
    """The authors' procedure: logits trained by torch.optim.Adam through autograd."""

    def __init__(self, m: int, gamma: float, w_lr: float, min_losses: list[float]) -> None:
        self.logits = torch.zeros(m, dtype=F64, requires_grad=True)
        self.adam = torch.optim.Adam([self.logits], lr=w_lr, weight_decay=gamma)
        self.min = t64(min_losses)

    def z(self) -> list[float]:
        return torch.softmax(self.logits.detach(), 0).tolist()

    def objective(self, values: list[float], c: float) -> float:
        """c sum_i z_i log(L_i - min_i + 1e-8), with c held constant."""
        return c * sum(
            z * math.log(v - lo + 1e-8) for z, v, lo in zip(self.z(), values, self.min.tolist())
        )

    def weights(self, values: list[float]) -> list[float]:
        z = self.z()
        c = 1.0 / sum(zi / (v - lo + 1e-8) for zi, v, lo in zip(z, values, self.min.tolist()))
        out = []
        for i in range(len(values)):
            h = 1e-6 * (values[i] - self.min[i].item())
            up, down = list(values), list(values)
            up[i] += h
            down[i] -= h
            out.append((self.objective(up, c) - self.objective(down, c)) / (2 * h))
        return out

    def update(self, before: list[float], after: list[float]) -> None:
        delta = (t64(before) - self.min + 1e-8).log() - (t64(after) - self.min + 1e-8).log()
        with torch.enable_grad():
            grad = torch.autograd.grad(
                torch.softmax(self.logits, 0), self.logits, grad_outputs=delta
            )[0]
        self.adam.zero_grad()
        self.logits.grad = grad
        self.adam.step()


def famo_losses(seed: int, steps: int, m: int = M) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-1, 1, m, dtype=F64)
    return [scales * (0.2 + torch.rand(m, generator=gen, dtype=F64)) for _ in range(steps)]


@pytest.mark.parametrize(
    "gamma,w_lr,bounds", [(1e-3, 0.025, [0.0] * M), (0.1, 0.5, [0.01, 0.0, 0.005])]
)
def test_famo_closure_protocol_matches_reference(gamma, w_lr, bounds):
    w = FAMO(gamma=gamma, w_lr=w_lr, min_losses=bounds)
    ref = FAMOReference(M, gamma, w_lr, bounds)
    sequence = famo_losses(1, 12)
    for before, after in zip(sequence[::2], sequence[1::2]):
        c = w.loss_weights(before)
        torch.testing.assert_close(c, t64(ref.weights(before.tolist())), rtol=1e-6, atol=0)
        assert float(c.sum()) == pytest.approx(1.0, abs=1e-12)
        w.observe(before, after_step=False)  # the step's losses: pending, no update yet
        w.observe(after, after_step=True)  # the closure's post-step losses: update
        assert w.pending_losses is None
        ref.update(before.tolist(), after.tolist())
        torch.testing.assert_close(w.logits, ref.logits.detach(), rtol=1e-10, atol=1e-13)
    assert not torch.allclose(w.logits, torch.zeros(M, dtype=F64))


def test_famo_without_closure_uses_the_next_steps_losses():
    w = FAMO(gamma=0.01, w_lr=0.1)
    ref = FAMOReference(M, 0.01, 0.1, [0.0] * M)
    sequence = famo_losses(2, 6)
    w.observe(sequence[0], after_step=False)
    assert torch.equal(w.logits, torch.zeros(M, dtype=F64))  # nothing to compare with yet
    for previous, current in itertools.pairwise(sequence):
        torch.testing.assert_close(
            w.loss_weights(current), t64(ref.weights(current.tolist())), rtol=1e-6, atol=0
        )
        w.observe(current, after_step=False)
        ref.update(previous.tolist(), current.tolist())
        torch.testing.assert_close(w.logits, ref.logits.detach(), rtol=1e-10, atol=1e-13)
        assert torch.equal(w.pending_losses, current)


def test_famo_loss_weights_are_pure():
    w = FAMO()
    for losses in famo_losses(3, 3):
        w.observe(losses, after_step=False)
    before = copy.deepcopy(w.state_dict())
    first = w.loss_weights(t64([1.0, 2.0, 3.0]))
    assert torch.equal(first, w.loss_weights(t64([1.0, 2.0, 3.0])))
    assert_same(before, w.state_dict())


def test_famo_weights_favour_the_task_that_improved_least():
    w = FAMO(w_lr=0.1)
    for _ in range(5):
        w.observe(t64([1.0, 1.0]), after_step=False)
        w.observe(t64([0.5, 1.0]), after_step=True)  # task 0 halves, task 1 stalls
    z = torch.softmax(w.logits, 0)
    assert z[1] > z[0]


@pytest.mark.parametrize(
    "losses", [[0.0, 1.0, 2.0], [1e-10, 1.0, 1e15], [0.0, 0.0, 0.0], [3.0, 3.0, 3.0]]
)
def test_famo_degenerate_losses_are_finite(losses):
    w = FAMO(w_lr=0.5)
    values = t64(losses)
    for _ in range(3):
        c = w.loss_weights(values)
        assert c.shape == (3,) and torch.isfinite(c).all()
        w.observe(values, after_step=False)
        w.observe(values * 0.5, after_step=True)
        assert torch.isfinite(w.logits).all()
    # A post-step loss below the bound counts as the bound.
    w.observe(values, after_step=False)
    w.observe(values - 10.0, after_step=True)
    assert torch.isfinite(w.logits).all()


def test_famo_single_task():
    w = FAMO()
    torch.testing.assert_close(w.loss_weights(t64([2.0])), t64([1.0]))
    w.observe(t64([2.0]), after_step=False)
    w.observe(t64([1.0]), after_step=True)
    torch.testing.assert_close(w.loss_weights(t64([2.0])), t64([1.0]))


def test_famo_losses_below_their_bounds_raise():
    with pytest.raises(
        ValueError, match=r"losses: FAMO needs losses >= min_losses.*task\(s\) \[1\]"
    ):
        FAMO().loss_weights(t64([1.0, -0.5, 2.0]))
    with pytest.raises(ValueError, match="min_losses"):
        FAMO(min_losses=[0.0, 0.0]).loss_weights(t64([1.0, 2.0, 3.0]))


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"gamma": -1.0}, "gamma"),
        ({"gamma": "a"}, "gamma"),
        ({"w_lr": 0.0}, "w_lr"),
        ({"min_losses": "a"}, "min_losses"),
        ({"min_losses": [0.0, float("nan")]}, "min_losses"),
        ({"min_losses": []}, "min_losses"),
    ],
)
def test_famo_bad_hyperparameters(kwargs, name):
    with pytest.raises((TypeError, ValueError), match=name):
        FAMO(**kwargs)


def test_famo_state_roundtrip_with_pending_losses():
    a = FAMO(w_lr=0.2)
    sequence = famo_losses(5, 9)
    for losses in sequence[:4]:
        a.observe(losses, after_step=False)
    b = FAMO(w_lr=0.2)
    b.load_state_dict(roundtrip(a.state_dict()))
    for losses in sequence[4:]:
        assert torch.equal(a.loss_weights(losses), b.loss_weights(losses))
        a.observe(losses, after_step=False)
        b.observe(losses, after_step=False)
    assert_same(a.state_dict(), b.state_dict())


@pytest.mark.parametrize("closure", [False, True])
def test_famo_checkpoint_through_optimizer(closure):
    check_checkpoint_continues(lambda: FAMO(w_lr=0.1), closure=closure)


@pytest.mark.parametrize("closure", [False, True])
def test_famo_end_to_end(closure):
    net = double_net(5)
    weighting = FAMO(w_lr=0.1)
    opt = own_group_optimizer(net, weighting)
    ref = FAMOReference(M, 1e-3, 0.1, [0.0] * M)
    previous = None
    for step in range(4):
        batch = batch64(step)
        losses = net.losses(*batch)
        values = [float(l.detach()) for l in losses]
        factors = ref.weights(values)
        rows = task_gradients(losses, encoder_params(net))
        heads = [task_gradients([losses[t]], head_params(net, t))[0] for t in range(M)]
        calls: list[list[float]] = []

        def closure_fn(batch=batch, calls=calls):
            out = net.losses(*batch)
            calls.append([float(l.detach()) for l in out])
            return out

        opt.zero_grad()
        if closure:
            opt.step(closure_fn)
            assert len(calls) == 2 and calls[0] == pytest.approx(values, rel=1e-12)
            ref.update(values, calls[1])
        else:
            opt.step(losses)
            if previous is not None:
                ref.update(previous, values)
            previous = values
        # The gradients the step used: loss weights from the logits before this step.
        expected = sum(c * g for c, g in zip(factors, rows))
        torch.testing.assert_close(flat_grad(encoder_params(net)), expected, rtol=1e-6, atol=1e-12)
        for t in range(M):
            torch.testing.assert_close(
                flat_grad(head_params(net, t)), factors[t] * heads[t], rtol=1e-6, atol=1e-12
            )
        torch.testing.assert_close(weighting.logits, ref.logits.detach(), rtol=1e-9, atol=1e-12)


# ============================================================================ DB-MTL
class DBMTLReference:
    """DB-MTL (Lin et al. 2023, Alg. 1; LibMTL's DB_MTL) on explicit gradient vectors."""

    def __init__(self, beta: float, beta_sigma: float) -> None:
        self.beta, self.beta_sigma = beta, beta_sigma
        self.buffers: list[list[float]] | None = None
        self.k = 0

    def step(self, rows: list[list[float]]) -> tuple[list[float], list[float]]:
        """``rows``: the gradients of log(L_i + 1e-8). Returns (update, alpha)."""
        self.k += 1
        beta_k = self.beta / self.k**self.beta_sigma
        if self.buffers is None:
            self.buffers = [[0.0] * len(r) for r in rows]
        self.buffers = [
            [g + beta_k * (h - g) for g, h in zip(row, buf)] for row, buf in zip(rows, self.buffers)
        ]
        norms = [math.sqrt(sum(x * x for x in buf)) for buf in self.buffers]
        alpha = [max(norms) / (n + 1e-8) for n in norms]
        n = len(rows[0])
        update = [sum(a * buf[k] for a, buf in zip(alpha, self.buffers)) for k in range(n)]
        return update, alpha


def split_blocks(flat: torch.Tensor, shapes) -> list[torch.Tensor]:
    blocks, offset = [], 0
    for shape in shapes:
        size = math.prod(shape)
        blocks.append(flat[:, offset : offset + size].reshape(flat.shape[0], *shape))
        offset += size
    return blocks


@pytest.mark.parametrize("beta,beta_sigma", [(0.9, 0.5), (0.9, 0.0), (0.5, 1.0), (0.0, 0.5)])
@pytest.mark.parametrize("m", [1, 2, 4])
def test_dbmtl_matches_reference(beta, beta_sigma, m):
    gen = torch.Generator().manual_seed(m)
    shapes = [(3, 2), (4,)]
    w = DBMTL(beta=beta, beta_sigma=beta_sigma)
    ref = DBMTLReference(beta, beta_sigma)
    scales = torch.logspace(-2, 2, m, dtype=F64).reshape(m, 1)
    for _ in range(5):
        flat = torch.randn(m, 10, generator=gen, dtype=F64) * scales
        blocks = split_blocks(flat, shapes)
        saved = [b.clone() for b in blocks]
        updates, alpha = w.update_from_jacobian(blocks, torch.ones(m, dtype=F64), [0] * 2)
        for b, s in zip(blocks, saved):
            assert torch.equal(b, s)  # inputs untouched
        expected, expected_alpha = ref.step(flat.tolist())
        got = torch.cat([u.flatten() for u in updates])
        torch.testing.assert_close(got, t64(expected), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(alpha, t64(expected_alpha), rtol=1e-10, atol=1e-12)
        assert [u.shape for u in updates] == [torch.Size(s) for s in shapes]


def test_dbmtl_balances_update_magnitudes():
    w = DBMTL(beta=0.0)  # no averaging: the current gradients
    J = t64([[1000.0, 0.0], [0.0, 0.001]])
    updates, _ = w.update_from_jacobian([J], torch.ones(2, dtype=F64), [3])
    # Both tasks contribute as much as the largest (up to the 1e-8 in the denominator).
    torch.testing.assert_close(updates[0], t64([1000.0, 1000.0]), rtol=1e-4, atol=0)


def test_dbmtl_loss_weights_are_the_log_transform_gradient():
    losses = t64([0.5, 3.0, 1e-3])
    leaf = losses.clone().requires_grad_()
    expected = torch.autograd.grad(torch.log(leaf + 1e-8).sum(), leaf)[0]
    torch.testing.assert_close(DBMTL().loss_weights(losses), expected, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="losses: DBMTL needs non-negative losses"):
        DBMTL().loss_weights(t64([1.0, -1.0]))


@pytest.mark.parametrize(
    "J",
    [
        [[0.0, 0.0, 0.0], [1.0, -2.0, 0.5]],
        [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]],
        [[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]],
        [[1.0, 2.0, 3.0], [-1.0, -2.0, -3.0]],
        [[1e-10, 0.0, 0.0], [0.0, 1e15, 0.0]],
    ],
)
def test_dbmtl_degenerate_gradients_are_finite(J):
    w = DBMTL()
    for _ in range(3):
        updates, alpha = w.update_from_jacobian([t64(J)], torch.ones(2, dtype=F64), [3])
        assert (
            torch.isfinite(updates[0]).all() and alpha.shape == (2,) and torch.isfinite(alpha).all()
        )


def test_dbmtl_layout_change_raises():
    w = DBMTL()
    w.update_from_jacobian([torch.ones(2, 3, dtype=F64)], torch.ones(2, dtype=F64), [3])
    with pytest.raises(ValueError, match="shared parameters must stay the same"):
        w.check_layout([torch.ones(2, 4, dtype=F64)])


def test_dbmtl_state_roundtrip():
    gen = torch.Generator().manual_seed(0)
    sequence = [
        [
            torch.randn(3, 4, generator=gen, dtype=F64),
            torch.randn(3, 2, 2, generator=gen, dtype=F64),
        ]
        for _ in range(6)
    ]
    a = DBMTL()
    for blocks in sequence[:2]:
        a.update_from_jacobian(blocks, torch.ones(3, dtype=F64), [7, 7])
    b = DBMTL()
    b.load_state_dict(roundtrip(a.state_dict()))
    for blocks in sequence[2:]:
        ua, wa = a.update_from_jacobian(blocks, torch.ones(3, dtype=F64), [7, 7])
        ub, wb = b.update_from_jacobian(blocks, torch.ones(3, dtype=F64), [7, 7])
        assert all(torch.equal(x, y) for x, y in zip(ua, ub)) and torch.equal(wa, wb)


def test_dbmtl_checkpoint_through_optimizer():
    check_checkpoint_continues(DBMTL)


@pytest.mark.parametrize(
    "kwargs,name",
    [({"beta": 1.5}, "beta"), ({"beta": -0.1}, "beta"), ({"beta_sigma": -1.0}, "beta_sigma")],
)
def test_dbmtl_bad_hyperparameters(kwargs, name):
    with pytest.raises((TypeError, ValueError), match=name):
        DBMTL(**kwargs)


def test_dbmtl_end_to_end():
    net = double_net(6)
    opt = own_group_optimizer(net, DBMTL())
    ref = DBMTLReference(0.9, 0.5)
    for step in range(3):
        opt.zero_grad()
        losses = net.losses(*batch64(step))
        logs = [torch.log(l + 1e-8) for l in losses]
        rows = [r.tolist() for r in task_gradients(logs, encoder_params(net))]
        opt.backward(losses, retain_graph=True)
        expected, _ = ref.step(rows)
        torch.testing.assert_close(
            flat_grad(encoder_params(net)), t64(expected), rtol=1e-9, atol=1e-12
        )
        for t in range(M):
            own = task_gradients([logs[t]], head_params(net, t))[0]
            torch.testing.assert_close(flat_grad(head_params(net, t)), own, rtol=1e-9, atol=1e-12)
        opt.step()


# ============================================================================ GradNorm
def gradnorm_reference_gradient(weights, norms, losses, initial, alpha) -> list[float]:
    """dL_grad/dw (Chen et al. 2018, Eq. 2) with the target held constant, coded plainly."""
    m = len(weights)
    g_w = [w * n for w, n in zip(weights, norms)]
    mean_g = sum(g_w) / m
    inverse_rates = [l / l0 for l, l0 in zip(losses, initial)]
    mean_rate = sum(inverse_rates) / m
    target = [mean_g * (r / mean_rate) ** alpha for r in inverse_rates]
    return [math.copysign(1.0, g - t) * n if g != t else 0.0 for g, t, n in zip(g_w, target, norms)]


def gradnorm_autograd_gradient(weights, rows, losses, initial, alpha) -> torch.Tensor:
    """The same gradient by autograd through ||w_i g_i||, the target detached."""
    w = t64(weights).requires_grad_()
    g_w = torch.stack([torch.linalg.vector_norm(w[i] * rows[i]) for i in range(len(rows))])
    rates = t64(losses) / t64(initial)
    target = (g_w.mean() * (rates / rates.mean()) ** alpha).detach()
    return torch.autograd.grad((g_w - target).abs().sum(), w)[0]


def test_gradnorm_gradient_matches_paper_and_autograd():
    gen = torch.Generator().manual_seed(0)
    rows = [torch.randn(7, generator=gen, dtype=F64) * s for s in (0.1, 1.0, 10.0)]
    G = torch.stack(rows) @ torch.stack(rows).T
    w = GradNorm(alpha=1.5, n_tasks=M)
    weights = [0.5, 1.0, 1.5]
    with torch.no_grad():
        w.raw_weights.copy_(torch.tensor(weights))
    initial, losses = [2.0, 1.0, 4.0], [1.0, 0.9, 1.0]
    w.initial_losses = t64(initial)
    c = w.loss_weights(t64(losses))
    torch.testing.assert_close(c, t64(weights))  # already summing to m
    # The optimizer hands in the Gramian of the weighted gradients.
    weighted = torch.diag(c) @ G @ torch.diag(c)
    torch.testing.assert_close(
        w.weights_from_gramian(weighted, t64(losses)), torch.ones(M, dtype=F64)
    )
    w.accumulate_parameter_grads(t64(losses))
    norms = [float(torch.linalg.vector_norm(r)) for r in rows]
    expected = gradnorm_reference_gradient(weights, norms, losses, initial, 1.5)
    torch.testing.assert_close(w.raw_weights.grad.double(), t64(expected), rtol=1e-6, atol=1e-7)
    by_autograd = gradnorm_autograd_gradient(weights, rows, losses, initial, 1.5)
    torch.testing.assert_close(w.raw_weights.grad.double(), by_autograd, rtol=1e-6, atol=1e-7)


def test_gradnorm_renormalises_to_sum_m():
    w = GradNorm(n_tasks=M)
    with torch.no_grad():
        w.raw_weights.copy_(torch.tensor([1.0, 3.0, -2.0]))  # a step drove one below zero
    losses = t64([1.0, 1.0, 1.0])
    c = w.loss_weights(losses)
    floored = [1.0, 3.0, 1e-6]
    torch.testing.assert_close(c, t64([M * v / sum(floored) for v in floored]), rtol=1e-6, atol=0)
    w.accumulate_parameter_grads(losses)
    torch.testing.assert_close(w.raw_weights.detach().double(), c, rtol=1e-6, atol=0)
    assert float(w.raw_weights.detach().sum()) == pytest.approx(M, rel=1e-6)


def test_gradnorm_end_to_end():
    net = double_net(7)
    lr, alpha = 0.05, 1.5
    w = GradNorm(alpha=alpha)
    w.raw_weights.data = torch.zeros(0, dtype=F64)  # float64 like the model: exact comparisons
    opt = own_group_optimizer(net, w, lr=lr)
    raw = [1.0] * M
    initial = None
    for step in range(4):
        opt.zero_grad()
        losses = net.losses(*batch64(step))
        values = [float(l.detach()) for l in losses]
        initial = initial or values
        weights = [M * v / sum(raw) for v in raw]
        rows = task_gradients(losses, encoder_params(net))
        opt.backward(losses, retain_graph=True)
        expected = sum(c * g for c, g in zip(weights, rows))
        torch.testing.assert_close(flat_grad(encoder_params(net)), expected, rtol=1e-9, atol=1e-12)
        for t in range(M):
            own = task_gradients([losses[t]], head_params(net, t))[0]
            torch.testing.assert_close(
                flat_grad(head_params(net, t)), weights[t] * own, rtol=1e-9, atol=1e-12
            )
        norms = [float(torch.linalg.vector_norm(r)) for r in rows]
        grad = gradnorm_reference_gradient(weights, norms, values, initial, alpha)
        torch.testing.assert_close(w.raw_weights.grad.double(), t64(grad), rtol=1e-9, atol=1e-12)
        opt.step()
        raw = [v - lr * g for v, g in zip(weights, grad)]  # SGD from the renormalised weights
        torch.testing.assert_close(w.raw_weights.detach().double(), t64(raw), rtol=1e-9, atol=1e-12)
    assert not torch.allclose(w.task_weights(t64(values)), torch.ones(M, dtype=F64))


def test_gradnorm_group_without_shared_parameters_learns_nothing():
    net = double_net(8)
    heads = GradNorm()
    base = torch.optim.SGD(
        [
            {"params": net.encoder.parameters()},
            {"params": net.heads.parameters(), "weighting": heads},
        ],
        lr=0.1,
    )
    opt = MultiTaskOptimizer(base)
    opt.step(net.losses(*batch64(0)))
    assert heads.raw_weights.grad is None
    torch.testing.assert_close(heads.raw_weights.detach(), torch.ones(M))


@pytest.mark.parametrize(
    "J",
    [
        [[0.0, 0.0], [1.0, 2.0], [0.0, 0.0]],
        [[0.0, 0.0]] * 3,
        [[1.0, 1.0]] * 3,
        [[1e-10, 0.0], [0.0, 1e15], [1.0, -1.0]],
    ],
)
def test_gradnorm_degenerate_gramians_are_finite(J):
    rows = t64(J)
    w = GradNorm(n_tasks=3)
    losses = t64([1.0, 0.0, 1e15])
    for _ in range(2):
        c = w.loss_weights(losses)
        weights = w.weights_from_gramian(torch.diag(c) @ rows @ rows.T @ torch.diag(c), losses)
        assert weights.shape == (3,) and torch.isfinite(weights).all()
        w.accumulate_parameter_grads(losses)
        assert torch.isfinite(w.raw_weights.grad).all() and torch.isfinite(w.raw_weights).all()


def test_gradnorm_single_task_is_plain_descent():
    w = GradNorm(n_tasks=1)
    c = w.loss_weights(t64([2.0]))
    w.weights_from_gramian(t64([[4.0]]), t64([2.0]))
    w.accumulate_parameter_grads(t64([2.0]))
    torch.testing.assert_close(c, t64([1.0]))
    assert float(w.raw_weights.grad) == 0.0


def test_gradnorm_checkpoint_through_optimizer():
    check_checkpoint_continues(lambda: GradNorm(alpha=0.5))


@pytest.mark.parametrize(
    "kwargs,name", [({"alpha": -1.0}, "alpha"), ({"lr": 0.0}, "lr"), ({"n_tasks": -2}, "n_tasks")]
)
def test_gradnorm_bad_hyperparameters(kwargs, name):
    with pytest.raises((TypeError, ValueError), match=name):
        GradNorm(**kwargs)
