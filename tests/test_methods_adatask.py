"""AdaTask against independent references.

* ``update_from_jacobian`` against ``torch.optim.Adam`` itself: one Adam per task on a dummy
  tensor fed with that task's gradient; the AdaTask direction is the sum of their steps.
* End to end with ``torch.optim.SGD(lr, weight_decay)`` per param group against a plain loop
  of ``torch.autograd.grad`` calls with the per-task Adam moments written out by hand.
* With one task, AdaTask + SGD is Adam.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch

from mtlopt import MultiTaskOptimizer
from mtlopt.weighting.adatask import AdaTask
from tests.conftest import Net, make_batch


def ones(m: int) -> torch.Tensor:
    return torch.ones(m, dtype=torch.float64)


def round_trip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


class TorchAdamPerTask:
    """One ``torch.optim.Adam(lr=1)`` per (tensor, task): its step is ``m_hat / (sqrt(v_hat) +
    eps)``. A head (one task in the mask) gets one Adam on the summed gradient."""

    def __init__(self, shapes, masks, m, betas, eps):
        self.slots = []
        for shape, mask in zip(shapes, masks):
            count = 1 if (mask).bit_count() == 1 else m
            params = [
                torch.zeros(shape, dtype=torch.float64, requires_grad=True) for _ in range(count)
            ]
            optims = [
                torch.optim.Adam([p], lr=1.0, betas=betas, eps=eps, foreach=False) for p in params
            ]
            self.slots.append((params, optims))

    def step(self, blocks):
        updates = []
        for block, (params, optims) in zip(blocks, self.slots):
            grads = [block.sum(0)] if len(params) == 1 else list(block)
            total = torch.zeros_like(block[0])
            for param, optim, grad in zip(params, optims, grads):
                before = param.detach().clone()
                param.grad = grad.detach().clone()
                optim.step()
                total += before - param.detach()
            updates.append(total)
        return updates


def _blocks(gen, m, step):
    """A shared tensor, a tensor shared by tasks 0 and 1 only, and a head of the last task."""
    scales = torch.tensor([1.0, 10.0, 0.1, 3.0][:m], dtype=torch.float64) * (1 + 0.5 * step)
    shared = torch.randn(m, 3, 4, generator=gen, dtype=torch.float64) * scales.reshape(m, 1, 1)
    partial = torch.randn(m, 5, generator=gen, dtype=torch.float64) * scales.reshape(m, 1)
    partial[2:] = 0.0
    head = torch.zeros(m, 2, 3, dtype=torch.float64)
    head[m - 1] = torch.randn(2, 3, generator=gen, dtype=torch.float64)
    masks = [2**m - 1, 0b11, 1 << (m - 1)]
    return [shared, partial, head], masks


@pytest.mark.parametrize(
    "betas,eps", [((0.9, 0.999), 1e-8), ((0.5, 0.9), 1e-3), ((0.0, 0.99), 1e-6)]
)
@pytest.mark.parametrize("m", [3, 4])
def test_adatask_matches_per_task_torch_adam(betas, eps, m):
    gen = torch.Generator().manual_seed(m)
    weighting = AdaTask(betas=betas, eps=eps)
    blocks, masks = _blocks(gen, m, 0)
    reference = TorchAdamPerTask([b.shape[1:] for b in blocks], masks, m, betas, eps)
    for step in range(6):
        blocks, masks = _blocks(gen, m, step)
        expected = reference.step(blocks)
        updates, weights = weighting.update_from_jacobian(
            [b.clone() for b in blocks], ones(m), masks
        )
        assert weights is None
        for got, want, block in zip(updates, expected, blocks):
            assert got.shape == block.shape[1:]
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    # Per-task moments for the shared tensors, Adam's single pair for the head.
    assert [t.shape[0] for t in weighting.exp_avg] == [m, m, 1]
    assert [t.shape[0] for t in weighting.exp_avg_sq] == [m, m, 1]


def test_adatask_first_step_by_hand():
    """t = 1: m_hat = g and v_hat = g^2, so each task contributes g / (|g| + eps)."""
    J = torch.tensor([[2.0, -1.0, 0.0], [0.5, 3.0, -4.0]], dtype=torch.float64)
    (update,), _ = AdaTask(eps=1e-8).update_from_jacobian([J.clone()], ones(2), [0b11])
    expected = (J / (J.abs() + 1e-8)).sum(0)
    torch.testing.assert_close(update, expected, rtol=1e-14, atol=1e-14)


def test_adatask_does_not_modify_input_blocks():
    gen = torch.Generator().manual_seed(0)
    blocks, masks = _blocks(gen, 3, 0)
    saved = [b.clone() for b in blocks]
    AdaTask().update_from_jacobian(blocks, ones(3), masks)
    assert all(torch.equal(a, b) for a, b in zip(blocks, saved))


@pytest.mark.parametrize("scale", [1e-10, 1e-3, 1.0, 1e6, 1e15])
@pytest.mark.parametrize(
    "rows",
    [
        [[0.0, 0.0, 0.0], [1.0, -2.0, 0.5], [-1.0, 1.0, 1.0]],  # a zero row
        [[1.0, 2.0, -1.0], [1.0, 2.0, -1.0], [-1.0, -2.0, 1.0]],  # duplicate and opposite
        [[0.0, 0.0, 0.0]] * 3,  # all zero
        [[1.0, -2.0, 3.0]],  # one task
    ],
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_adatask_degenerate_inputs_finite(scale, rows, dtype):
    J = torch.tensor(rows, dtype=dtype) * scale
    m = J.shape[0]
    weighting = AdaTask()
    for _ in range(3):
        (update,), weights = weighting.update_from_jacobian([J.clone()], ones(m), [2**m - 1])
        assert weights is None
        assert update.dtype == dtype and torch.isfinite(update).all()
        assert update.abs().max() <= m * (1.0 + 1e-6)  # each task's Adam step is at most ~1


def test_adatask_permutation_equivariant():
    gen = torch.Generator().manual_seed(5)
    perm = [2, 0, 3, 1]
    a, b = AdaTask(), AdaTask()
    for _ in range(4):
        J = torch.randn(4, 6, generator=gen, dtype=torch.float64)
        (ua,), _ = a.update_from_jacobian([J.clone()], ones(4), [0b1111])
        (ub,), _ = b.update_from_jacobian([J[perm].clone()], ones(4), [0b1111])
        torch.testing.assert_close(ub, ua, rtol=1e-13, atol=1e-14)


def test_adatask_checkpoint_round_trip_bit_identical():
    gen = torch.Generator().manual_seed(9)
    steps = [_blocks(gen, 3, s) for s in range(6)]
    original = AdaTask(betas=(0.8, 0.99))
    for blocks, masks in steps[:3]:
        original.update_from_jacobian([b.clone() for b in blocks], ones(3), masks)
    resumed = AdaTask(betas=(0.8, 0.99))
    resumed.load_state_dict(round_trip(original.state_dict()))
    assert resumed.step == 3
    for blocks, masks in steps[3:]:
        ua, _ = original.update_from_jacobian([b.clone() for b in blocks], ones(3), masks)
        ub, _ = resumed.update_from_jacobian([b.clone() for b in blocks], ones(3), masks)
        assert all(torch.equal(x, y) for x, y in zip(ua, ub))


def test_adatask_refuses_a_head_that_becomes_shared():
    weighting = AdaTask()
    J = torch.zeros(2, 3, dtype=torch.float64)
    J[0] = 1.0
    weighting.update_from_jacobian([J], ones(2), [0b01])
    with pytest.raises(ValueError, match="task head"):
        weighting.update_from_jacobian([torch.ones(2, 3, dtype=torch.float64)], ones(2), [0b11])


def test_adatask_refuses_changed_tensors():
    weighting = AdaTask()
    weighting.update_from_jacobian([torch.ones(2, 3, dtype=torch.float64)], ones(2), [0b11])
    with pytest.raises(ValueError, match="shapes"):
        weighting.update_from_jacobian([torch.ones(2, 4, dtype=torch.float64)], ones(2), [0b11])


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"betas": (1.0, 0.999)}, "betas"),
        ({"betas": (0.9, -0.1)}, "betas"),
        ({"betas": (0.9,)}, "betas"),
        ({"betas": "ab"}, "betas"),
        ({"betas": (0.9, "x")}, "betas"),
        ({"eps": 0.0}, "eps"),
        ({"eps": -1e-8}, "eps"),
    ],
)
def test_adatask_bad_hyperparameters(kwargs, name):
    with pytest.raises((TypeError, ValueError), match=name):
        AdaTask(**kwargs)


def test_adatask_declares_what_it_needs():
    assert AdaTask.needs == "jacobian" and AdaTask.aggregates_task_heads and AdaTask.stateful
    assert repr(AdaTask()) == "AdaTask(betas=(0.9, 0.999), eps=1e-08)"


# ======================================================================================
# End to end through MultiTaskOptimizer with SGD as the base
# ======================================================================================


class AdaTaskLoopReference:
    """AdaTask written out over explicit per-task autograd.grad calls."""

    def __init__(self, net, betas, eps, groups):
        self.net, self.betas, self.eps, self.groups = net, betas, eps, groups
        self.t = 0
        self.moments = {}

    def _adam(self, key, grad):
        beta1, beta2 = self.betas
        m1, m2 = self.moments.get(key, (torch.zeros_like(grad), torch.zeros_like(grad)))
        m1 = beta1 * m1 + (1 - beta1) * grad
        m2 = beta2 * m2 + (1 - beta2) * grad * grad
        self.moments[key] = (m1, m2)
        m_hat = m1 / (1 - beta1**self.t)
        v_hat = m2 / (1 - beta2**self.t)
        return m_hat / (v_hat.sqrt() + self.eps)

    def step(self, x, y):
        self.t += 1
        losses = self.net.losses(x, y)
        encoder = list(self.net.encoder.parameters())
        directions = {}
        for task, loss in enumerate(losses):
            grads = torch.autograd.grad(loss, encoder, retain_graph=True)
            for index, grad in enumerate(grads):
                u = self._adam(("encoder", index, task), grad)
                directions[id(encoder[index])] = directions.get(id(encoder[index]), 0) + u
        heads = list(self.net.heads.parameters())
        for index, grad in enumerate(torch.autograd.grad(sum(losses), heads)):
            directions[id(heads[index])] = self._adam(("head", index), grad)
        with torch.no_grad():
            for params, lr, decay in self.groups:
                for p in params:
                    p -= lr * (directions[id(p)] + decay * p)


def _groups(net, lrs, decays):
    return [
        {"params": list(net.encoder.parameters()), "lr": lrs[0], "weight_decay": decays[0]},
        {"params": list(net.heads.parameters()), "lr": lrs[1], "weight_decay": decays[1]},
        {"params": list(net.unused.parameters())},
    ]


@pytest.mark.parametrize("lrs,decays", [((0.01, 0.01), (0.0, 0.0)), ((0.01, 0.05), (0.1, 0.02))])
def test_adatask_end_to_end_with_sgd(lrs, decays):
    torch.manual_seed(0)
    net = Net().double()
    ref_net = copy.deepcopy(net)
    unused_before = [p.detach().clone() for p in net.unused.parameters()]
    betas, eps = (0.9, 0.99), 1e-8
    opt = MultiTaskOptimizer(
        torch.optim.SGD(_groups(net, lrs, decays), lr=0.1), weighting=AdaTask(betas=betas, eps=eps)
    )
    reference = AdaTaskLoopReference(
        ref_net,
        betas,
        eps,
        [
            (list(ref_net.encoder.parameters()), lrs[0], decays[0]),
            (list(ref_net.heads.parameters()), lrs[1], decays[1]),
        ],
    )
    for step in range(4):
        x, y = (t.double() for t in make_batch(step))
        opt.zero_grad()
        opt.step(net.losses(x, y))
        reference.step(x, y)
        for got, want in zip(net.parameters(), ref_net.parameters()):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert all(torch.equal(a, b) for a, b in zip(net.unused.parameters(), unused_before))
    weightings = [w for w in opt.weightings() if w is not None]
    assert weightings[0].exp_avg[0].shape[0] == 3  # encoder: per-task moments
    assert weightings[1].exp_avg[0].shape[0] == 1  # heads: Adam's moments


def test_adatask_single_task_is_adam():
    torch.manual_seed(1)
    net = Net(n_tasks=1).double()
    adam_net = copy.deepcopy(net)
    params = [p for name, p in net.named_parameters() if not name.startswith("unused")]
    adam_params = [p for name, p in adam_net.named_parameters() if not name.startswith("unused")]
    opt = MultiTaskOptimizer(torch.optim.SGD(params, lr=0.01), weighting=AdaTask())
    adam = torch.optim.Adam(adam_params, lr=0.01, foreach=False)
    for step in range(5):
        x, y = (t.double() for t in make_batch(step, n_tasks=1))
        opt.zero_grad()
        opt.step(net.losses(x, y))
        adam.zero_grad()
        adam_net.losses(x, y)[0].backward()
        adam.step()
        for got, want in zip(params, adam_params):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_adatask_optimizer_checkpoint_resumes_bit_identically():
    torch.manual_seed(2)
    net = Net().double()
    opt = MultiTaskOptimizer(
        torch.optim.SGD(_groups(net, (0.01, 0.02), (0.1, 0.0)), lr=0.1), weighting=AdaTask()
    )
    batches = [tuple(t.double() for t in make_batch(s)) for s in range(5)]
    for x, y in batches[:2]:
        opt.zero_grad()
        opt.step(net.losses(x, y))
    saved = round_trip({"model": net.state_dict(), "opt": opt.state_dict()})
    resumed_net = Net().double()
    resumed_net.load_state_dict(saved["model"])
    resumed = MultiTaskOptimizer(
        torch.optim.SGD(_groups(resumed_net, (0.01, 0.02), (0.1, 0.0)), lr=0.1), weighting=AdaTask()
    )
    resumed.load_state_dict(saved["opt"])
    for x, y in batches[2:]:
        for model, optimizer in ((net, opt), (resumed_net, resumed)):
            optimizer.zero_grad()
            optimizer.step(model.losses(x, y))
        assert all(torch.equal(a, b) for a, b in zip(net.parameters(), resumed_net.parameters()))
