"""Krum, TrimmedMean and GradDrop against independent references.

The references loop over explicit per-task gradient vectors (Python floats): Krum's scores
from pairwise squared distances, the coordinate-wise trimmed mean by sorting each coordinate,
GradDrop's sign purity and masks coordinate by coordinate (with the uniform draws replayed
from the weighting's documented stream).
"""

from __future__ import annotations

import io
import math

import pytest
import torch

from mtlopt import MultiTaskOptimizer
from mtlopt.weighting.graddrop import GradDrop
from mtlopt.weighting.robust import Krum, TrimmedMean
from tests.conftest import Net, make_batch

F64 = torch.float64


def rows_of(jacobian: torch.Tensor) -> list[list[float]]:
    flat = jacobian.detach().to(F64).reshape(jacobian.shape[0], -1)
    return [[float(v) for v in row] for row in flat]


def random_blocks(seed: int, m: int, shapes=((3, 4), (5,))) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(m, *shape, generator=g, dtype=F64) for shape in shapes]


def ones(m: int) -> torch.Tensor:
    return torch.ones(m, dtype=F64)


# ======================================================================================
# Krum
# ======================================================================================


def krum_reference(rows: list[list[float]], f: int, n_selected: int) -> list[float]:
    """Blanchard et al. 2017: score = sum of squared distances to the m - f - 2 nearest
    others; Multi-Krum averages the n_selected lowest scores (ties: lower index)."""
    m = len(rows)
    neighbours = min(max(m - f - 2, 1), m - 1)
    scores = []
    for i in range(m):
        distances = sorted(
            sum((a - b) ** 2 for a, b in zip(rows[i], rows[j])) for j in range(m) if j != i
        )
        scores.append(sum(distances[:neighbours]))
    chosen = sorted(range(m), key=lambda i: (scores[i], i))[: min(n_selected, m)]
    return [1.0 / len(chosen) if i in chosen else 0.0 for i in range(m)]


def krum_weights(weighting: Krum, jacobian: torch.Tensor) -> torch.Tensor:
    return weighting.weights_from_gramian(jacobian @ jacobian.T, ones(jacobian.shape[0]))


@pytest.mark.parametrize("f,n_selected", [(0, 1), (1, 1), (1, 2), (2, 3), (3, 1)])
@pytest.mark.parametrize("seed,m", [(0, 5), (1, 7), (2, 9), (3, 10)])
def test_krum_matches_reference(f: int, n_selected: int, seed: int, m: int) -> None:
    g = torch.Generator().manual_seed(seed)
    J = torch.randn(m, 6, generator=g, dtype=F64) * torch.rand(m, 1, generator=g, dtype=F64) * 3
    w = krum_weights(Krum(f, n_selected), J)
    assert w.dtype == F64
    assert w.tolist() == pytest.approx(krum_reference(rows_of(J), f, n_selected), abs=1e-15)


@pytest.mark.parametrize("n_selected", [1, 3])
def test_krum_ignores_byzantine_gradients(n_selected: int) -> None:
    g = torch.Generator().manual_seed(0)
    honest = torch.randn(1, 8, generator=g, dtype=F64) + 0.1 * torch.randn(
        6, 8, generator=g, dtype=F64
    )
    attackers = torch.stack([-20 * honest[0], 50 * torch.ones(8, dtype=F64)])
    J = torch.cat([honest[:3], attackers, honest[3:]])
    w = krum_weights(Krum(n_byzantine=2, n_selected=n_selected), J)
    assert w[3] == 0 and w[4] == 0
    assert w.sum().item() == pytest.approx(1.0)
    assert (w > 0).sum() == n_selected


@pytest.mark.parametrize("scale", [1e-10, 1.0, 1e15])
def test_krum_scale_free_and_degenerate(scale: float) -> None:
    J = torch.tensor(
        [[1.0, 2.0, 0.0], [1.0, 2.0, 0.0], [0.0, 0.0, 0.0], [-1.0, 0.5, 3.0]], dtype=F64
    )
    w = krum_weights(Krum(0, 2), J * scale)
    assert w.tolist() == krum_reference(rows_of(J), 0, 2)
    for m in (1, 2, 3):  # fewer tasks than n_byzantine + 3: still finite, documented fallback
        w = krum_weights(Krum(1, 2), J[:m] * scale)
        assert w.shape == (m,) and torch.isfinite(w).all()
        assert w.tolist() == pytest.approx(krum_reference(rows_of(J[:m]), 1, 2))
    assert krum_weights(Krum(0), torch.zeros(4, 3, dtype=F64)).tolist() == [1.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"n_byzantine": -1}, "n_byzantine"),
        ({"n_byzantine": 1.5}, "n_byzantine"),
        ({"n_byzantine": True}, "n_byzantine"),
        ({"n_byzantine": 1, "n_selected": 0}, "n_selected"),
        ({"n_byzantine": 1, "n_selected": "2"}, "n_selected"),
    ],
)
def test_krum_bad_hyperparameters(kwargs: dict, name: str) -> None:
    with pytest.raises((TypeError, ValueError), match=name):
        Krum(**kwargs)


# ======================================================================================
# TrimmedMean
# ======================================================================================


def trimmed_mean_reference(rows: list[list[float]], trim: int) -> list[float]:
    m = len(rows)
    trim = min(trim, (m - 1) // 2)
    out = []
    for k in range(len(rows[0])):
        column = sorted(row[k] for row in rows)
        kept = column[trim : m - trim]
        out.append(sum(kept) / len(kept))
    return out


@pytest.mark.parametrize("trim", [0, 1, 2, 3])
@pytest.mark.parametrize("m", [1, 2, 3, 5, 8])
def test_trimmed_mean_matches_reference(trim: int, m: int) -> None:
    blocks = random_blocks(10 * m + trim, m)
    updates, weights = TrimmedMean(trim).update_from_jacobian(blocks, ones(m), [(1 << m) - 1] * 2)
    assert weights is None
    for block, got in zip(blocks, updates):
        assert got.shape == block.shape[1:] and got.dtype == block.dtype
        expected = trimmed_mean_reference(rows_of(block), trim)
        torch.testing.assert_close(
            got.flatten(), torch.tensor(expected, dtype=F64), rtol=1e-12, atol=1e-14
        )


def test_trimmed_mean_zero_is_mean_and_resists_outliers() -> None:
    block = random_blocks(0, 6, shapes=((10,),))[0]
    (mean,), _ = TrimmedMean(0).update_from_jacobian([block], ones(6), [63])
    torch.testing.assert_close(mean, block.mean(0))
    poisoned = block.clone()
    poisoned[0] = 1e12
    poisoned[1] = -1e12
    (robust,), _ = TrimmedMean(1).update_from_jacobian([poisoned], ones(6), [63])
    assert robust.abs().max() < 10


def test_trimmed_mean_half_precision() -> None:
    block = random_blocks(1, 5, shapes=((7,),))[0].to(torch.bfloat16)
    (got,), _ = TrimmedMean(1).update_from_jacobian([block], ones(5), [31])
    assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()


@pytest.mark.parametrize("value", [-1, 0.5, True, "1"])
def test_trimmed_mean_bad_hyperparameters(value) -> None:
    with pytest.raises((TypeError, ValueError), match="trim_number"):
        TrimmedMean(value)


# ======================================================================================
# GradDrop
# ======================================================================================


def replay_uniforms(weighting: GradDrop, shapes: list[tuple[int, ...]]) -> list[list[float]]:
    """The draws of the next step, replayed from a copy of the weighting's CPU stream as its
    docstring describes: one seed from the stream, then ``torch.rand`` per tensor."""
    stream = torch.Generator()
    stream.set_state(weighting._generator.get_state())
    seed = int(torch.randint(0, 2**62, (1,), generator=stream))
    step = torch.Generator().manual_seed(seed)
    return [torch.rand(shape, generator=step, dtype=F64).flatten().tolist() for shape in shapes]


def graddrop_reference(
    rows: list[list[float]], uniforms: list[float], leak: list[float]
) -> list[float]:
    """Chen et al. 2020, Algorithm 1 with leak: purity, masks, leaky sum, per coordinate."""
    out = []
    for k, u in enumerate(uniforms):
        column = [row[k] for row in rows]
        magnitude = sum(abs(v) for v in column)
        purity = 0.5 * (1 + sum(column) / magnitude) if magnitude > 0 else 0.5
        total = 0.0
        for i, v in enumerate(column):
            kept = (purity > u and v > 0) or (purity < u and v < 0)
            total += (leak[i] + (1 - leak[i]) * kept) * v
        out.append(total)
    return out


@pytest.mark.parametrize("leak", [0.0, 0.3, [0.0, 1.0, 0.5]])
def test_graddrop_matches_reference_over_steps(leak) -> None:
    m = 3
    weighting = GradDrop(leak=leak, seed=5)
    leaks = leak if isinstance(leak, list) else [leak] * m
    for step in range(4):
        blocks = random_blocks(step, m)
        blocks[0][:, 0, 0] = 0.0  # a coordinate no task moves
        blocks[1][:, 1] = blocks[1][:, 1].abs()  # a coordinate every task pushes up
        shapes = [tuple(b.shape[1:]) for b in blocks]
        uniforms = replay_uniforms(weighting, shapes)
        updates, weights = weighting.update_from_jacobian(blocks, ones(m), [7, 7])
        assert weights is None
        for block, got, u in zip(blocks, updates, uniforms):
            expected = graddrop_reference(rows_of(block), u, leaks)
            torch.testing.assert_close(
                got.flatten(), torch.tensor(expected, dtype=F64), rtol=1e-12, atol=1e-14
            )
        assert updates[0][0, 0] == 0
        torch.testing.assert_close(updates[1][1], blocks[1][:, 1].sum())


def test_graddrop_keeps_positive_signs_with_probability_purity() -> None:
    # Every coordinate: task 1 pushes +3, task 2 pushes -1: P = (1 + 2/4) / 2 = 0.75.
    n = 40000
    block = torch.stack([torch.full((n,), 3.0, dtype=F64), torch.full((n,), -1.0, dtype=F64)])
    (update,), _ = GradDrop(seed=0).update_from_jacobian([block], ones(2), [3])
    assert set(update.unique().tolist()) == {3.0, -1.0}
    assert (update > 0).double().mean().item() == pytest.approx(0.75, abs=0.01)


def test_graddrop_leak_one_is_sum() -> None:
    blocks = random_blocks(3, 4)
    updates, _ = GradDrop(leak=1.0, seed=1).update_from_jacobian(blocks, ones(4), [15, 15])
    for block, got in zip(blocks, updates):
        torch.testing.assert_close(got, block.sum(0))


def roundtrip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_graddrop_checkpoint_resumes_bit_identically() -> None:
    first = GradDrop(leak=0.1, seed=3)
    steps = [random_blocks(10 + k, 3) for k in range(6)]
    for blocks in steps[:2]:
        first.update_from_jacobian(blocks, ones(3), [7, 7])
    saved = roundtrip(first.state_dict())
    second = GradDrop(leak=0.1, seed=99)  # another seed: the checkpoint must win
    second.load_state_dict(saved)
    assert second.n_tasks == 3
    for blocks in steps[2:]:
        a, _ = first.update_from_jacobian(blocks, ones(3), [7, 7])
        b, _ = second.update_from_jacobian(blocks, ones(3), [7, 7])
        for x, y in zip(a, b):
            assert torch.equal(x, y)


def test_graddrop_streams() -> None:
    torch.manual_seed(123)
    a = GradDrop()
    torch.manual_seed(123)
    b = GradDrop()
    assert torch.equal(a._generator.get_state(), b._generator.get_state())
    parent = GradDrop(seed=7)
    children = [parent.spawn(), parent.spawn()]
    blocks = random_blocks(0, 3, shapes=((200,),))
    results = [w.update_from_jacobian(blocks, ones(3), [7])[0][0] for w in [parent, *children]]
    assert not torch.equal(results[0], results[1]) and not torch.equal(results[1], results[2])


def test_graddrop_half_precision_and_fixed_tasks() -> None:
    weighting = GradDrop(seed=0)
    block = random_blocks(2, 3, shapes=((9,),))[0].to(torch.float16)
    (got,), _ = weighting.update_from_jacobian([block], ones(3), [7])
    assert got.dtype == torch.float16 and torch.isfinite(got).all()
    with pytest.raises(ValueError, match="losses"):  # the task count is fixed at the first call
        weighting.update_from_jacobian([block[:2]], ones(2), [3])


def test_graddrop_bad_hyperparameters() -> None:
    for leak in (-0.1, 1.5, "a", [], [0.5, 2.0], None, True):
        with pytest.raises((TypeError, ValueError), match="leak"):
            GradDrop(leak=leak)
    with pytest.raises(ValueError, match="seed"):
        GradDrop(seed=-1)
    weighting = GradDrop(leak=[0.1, 0.2])
    before = weighting._generator.get_state()
    with pytest.raises(ValueError, match="leak"):
        weighting.update_from_jacobian(random_blocks(0, 3), ones(3), [7, 7])
    assert torch.equal(weighting._generator.get_state(), before)  # nothing drawn


# ======================================================================================
# End to end through the optimizer
# ======================================================================================


def _per_task_grads(losses: list[torch.Tensor], params: list[torch.Tensor]) -> list[torch.Tensor]:
    rows = [torch.autograd.grad(loss, params, retain_graph=True) for loss in losses]
    return [torch.stack([row[k] for row in rows]) for k in range(len(params))]


@pytest.mark.parametrize("name", ["Krum", "TrimmedMean", "GradDrop"])
def test_end_to_end_through_the_optimizer(name: str) -> None:
    make = {
        "Krum": lambda: Krum(n_byzantine=0, n_selected=2),
        "TrimmedMean": lambda: TrimmedMean(trim_number=1),
        "GradDrop": lambda: GradDrop(leak=0.2, seed=4),
    }[name]
    torch.manual_seed(0)
    net = Net().double()
    opt = MultiTaskOptimizer(torch.optim.SGD(net.parameters(), lr=0.05), weighting=make())
    weighting = opt.weightings()[0]
    shared = list(net.encoder.parameters())
    for step in range(3):
        x, y = (t.double() for t in make_batch(step))
        opt.zero_grad()
        losses = net.losses(x, y)
        blocks = _per_task_grads(losses, shared)
        heads = [_per_task_grads([losses[t]], list(net.heads[t].parameters())) for t in range(3)]
        if name == "Krum":
            flat = torch.cat([b.reshape(3, -1) for b in blocks], dim=1)
            w = krum_reference(rows_of(flat), 0, 2)
            expected = [sum(w[i] * b[i] for i in range(3)) for b in blocks]
        elif name == "TrimmedMean":
            expected = [
                torch.tensor(trimmed_mean_reference(rows_of(b), 1), dtype=F64).reshape(b.shape[1:])
                for b in blocks
            ]
        else:
            uniforms = replay_uniforms(weighting, [tuple(b.shape[1:]) for b in blocks])
            expected = [
                torch.tensor(graddrop_reference(rows_of(b), u, [0.2] * 3), dtype=F64).reshape(
                    b.shape[1:]
                )
                for b, u in zip(blocks, uniforms)
            ]
        opt.backward(losses)
        for p, e in zip(shared, expected):
            torch.testing.assert_close(p.grad, e, rtol=1e-10, atol=1e-13)
        for t in range(3):  # task heads get their own gradient
            for p, own in zip(net.heads[t].parameters(), heads[t]):
                torch.testing.assert_close(p.grad, own[0], rtol=1e-12, atol=1e-15)
        opt.step()
    assert math.isfinite(sum(float(p.detach().sum()) for p in net.parameters()))
