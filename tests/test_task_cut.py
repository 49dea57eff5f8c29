"""Per-task gradients split at the cut below the task heads (``mtlopt.task_cut``).

Every graph shape is checked against one plain ``autograd.grad`` call per loss, in every
Jacobian mode; where the cut applies, each head's backward runs once (not once per task).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from mtlopt import MultiTaskOptimizer
from mtlopt import jacobian as jacobian_module
from mtlopt.batched_rows import seeded_vjp
from mtlopt.handed_seeds import handed_seed_vjp
from mtlopt.jacobian import JacobianEngine
from mtlopt.losses import prepare_losses
from mtlopt.reachability import GraphMasks, single_task
from mtlopt.task_cut import CrossingRows, backward_through_heads, find_cut
from mtlopt.weighting.base import Weighting

from .test_jacobian import ItemBackward, assert_blocks_close, reference_jacobian

DTYPE = torch.float64
M = 3

Case = tuple[list[Tensor], Callable[[], list[Tensor]], bool]  # params, losses, cut applies


def _data(seed: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(5, 4, generator=g, dtype=DTYPE), torch.randn(5, M, generator=g, dtype=DTYPE)


def heads_on_z() -> Case:
    trunk = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh()).to(DTYPE)
    heads = nn.ModuleList(nn.Linear(6, 1) for _ in range(M)).to(DTYPE)
    x, y = _data(1)

    def losses() -> list[Tensor]:
        z = trunk(x)
        return [((h(z).squeeze(-1) - y[:, t]) ** 2).mean() for t, h in enumerate(heads)]

    return [*trunk.parameters(), *heads.parameters()], losses, True


def skip_connections() -> Case:
    """Heads read the representation and an earlier layer: two nested cut targets."""
    first, second = nn.Linear(4, 6).to(DTYPE), nn.Linear(6, 6).to(DTYPE)
    heads = nn.ModuleList(nn.Linear(12, 1) for _ in range(M)).to(DTYPE)
    x, y = _data(2)

    def losses() -> list[Tensor]:
        low = torch.tanh(first(x))
        z = torch.tanh(second(low))
        both = torch.cat([z, low], dim=1)
        return [((h(both).squeeze(-1) - y[:, t]) ** 2).mean() for t, h in enumerate(heads)]

    return [*first.parameters(), *second.parameters(), *heads.parameters()], losses, True


def shared_sub_head() -> Case:
    """Tasks 0 and 1 share a layer above the trunk; task 2 uses z twice; task 1 reads the
    raw trunk output as its loss too."""
    trunk = nn.Linear(4, 6).to(DTYPE)
    pair = nn.Linear(6, 6).to(DTYPE)
    heads = nn.ModuleList(
        nn.Sequential(nn.Linear(6, 3), nn.Tanh(), nn.Linear(3, 1)) for _ in range(M)
    )
    heads = heads.to(DTYPE)
    x, y = _data(3)

    def losses() -> list[Tensor]:
        z = torch.tanh(trunk(x))
        p = torch.tanh(pair(z))
        out0 = heads[0](p).squeeze(-1)
        out1 = heads[1](p).squeeze(-1) + z.pow(2).mean(1)
        out2 = heads[2](z).squeeze(-1) * heads[2](2 * z).squeeze(-1)
        return [((o - y[:, t]) ** 2).mean() for t, o in enumerate([out0, out1, out2])]

    params = [*trunk.parameters(), *pair.parameters(), *heads.parameters()]
    return params, losses, True


def task_without_shared() -> Case:
    """Task 2 has its own input and parameters only."""
    trunk = nn.Linear(4, 6).to(DTYPE)
    heads = nn.ModuleList(nn.Linear(6, 1) for _ in range(2)).to(DTYPE)
    alone = nn.Linear(4, 1).to(DTYPE)
    x, y = _data(4)

    def losses() -> list[Tensor]:
        z = torch.tanh(trunk(x))
        out = [h(z).squeeze(-1) for h in heads] + [alone(x * 3).squeeze(-1)]
        return [((o - y[:, t]) ** 2).mean() for t, o in enumerate(out)]

    return [*trunk.parameters(), *heads.parameters(), *alone.parameters()], losses, True


def tied_weight() -> Case:
    """A head reuses a trunk weight directly: no node to seed, the rows are not split."""
    trunk = nn.Linear(4, 4).to(DTYPE)
    heads = nn.ModuleList(nn.Linear(4, 1) for _ in range(M)).to(DTYPE)
    x, y = _data(5)

    def losses() -> list[Tensor]:
        z = torch.tanh(trunk(x))
        out = [h(z).squeeze(-1) for h in heads]
        out[1] = out[1] + (z @ trunk.weight).sum(1)
        return [((o - y[:, t]) ** 2).mean() for t, o in enumerate(out)]

    return [*trunk.parameters(), *heads.parameters()], losses, False


def loss_vector() -> Case:
    """The losses as one 1-D tensor: the tasks share the root, the rows are not split."""
    trunk = nn.Linear(4, 6).to(DTYPE)
    head = nn.Linear(6, M).to(DTYPE)
    x, y = _data(6)

    def losses() -> Tensor:
        return ((head(torch.tanh(trunk(x))) - y) ** 2).mean(0)

    return [*trunk.parameters(), *head.parameters()], losses, False


CASES = {
    "heads_on_z": heads_on_z,
    "skip_connections": skip_connections,
    "shared_sub_head": shared_sub_head,
    "task_without_shared": task_without_shared,
    "tied_weight": tied_weight,
    "loss_vector": loss_vector,
}


def _rows(case: str, mode: str, chunk_size: int | None) -> tuple[list, list, bool]:
    torch.manual_seed(0)
    params, losses_fn, applies = CASES[case]()
    losses = losses_fn()
    separate = list(losses) if isinstance(losses, list) else list(losses.unbind())
    want = reference_jacobian(separate, params)
    task_losses = prepare_losses(losses)
    graph = GraphMasks(task_losses.roots)
    assert (find_cut(graph) is not None) == applies
    engine = JacobianEngine(chunk_size=chunk_size, mode=mode)
    got = engine.task_rows(task_losses.output, graph, params, retain_graph=True)
    return got, want, applies


@pytest.mark.parametrize("chunk_size", [None, 2])
@pytest.mark.parametrize("mode", ["auto", "batched", "loop"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_rows_match_one_backward_per_loss(case: str, mode: str, chunk_size: int | None) -> None:
    got, want, _ = _rows(case, mode, chunk_size)
    assert_blocks_close(got, want)


@pytest.mark.parametrize("chunk_size", [None, 1, 2])
def test_each_head_runs_its_backward_once(chunk_size: int | None) -> None:
    """The point of the cut: a head is differentiated once, not once per task (nor once
    per chunk of tasks)."""
    torch.manual_seed(0)
    params, losses_fn, _ = heads_on_z()
    losses = losses_fn()
    calls = []
    for task, loss in enumerate(losses):  # each task's own loss node
        loss.grad_fn.register_hook(lambda *_, task=task: calls.append(task))
    task_losses = prepare_losses(losses)
    engine = JacobianEngine(chunk_size=chunk_size)
    engine.task_rows(task_losses.output, GraphMasks(task_losses.roots), params)
    assert sorted(calls) == list(range(M))


def test_single_task_needs_no_cut() -> None:
    torch.manual_seed(0)
    params, losses_fn, _ = heads_on_z()
    losses = losses_fn()[:1]
    want = reference_jacobian(losses, params)
    task_losses = prepare_losses(losses)
    got = JacobianEngine().task_rows(task_losses.output, GraphMasks(task_losses.roots), params)
    assert_blocks_close(got, want)


def test_freed_graph_gets_the_clear_error() -> None:
    torch.manual_seed(0)
    params, losses_fn, _ = heads_on_z()
    losses = losses_fn()
    torch.stack(losses).sum().backward()
    task_losses = prepare_losses(losses)
    with pytest.raises(RuntimeError, match="already freed"):
        JacobianEngine().task_rows(task_losses.output, GraphMasks(task_losses.roots), params)


def test_hooks_are_removed_after_the_step() -> None:
    """A later backward through the same graph must not feed the recorders again."""
    torch.manual_seed(0)
    params, losses_fn, _ = heads_on_z()
    losses = losses_fn()
    task_losses = prepare_losses(losses)
    graph = GraphMasks(task_losses.roots)
    first = JacobianEngine().task_rows(task_losses.output, graph, params, retain_graph=True)
    second = JacobianEngine().task_rows(task_losses.output, graph, params)
    assert_blocks_close(second, first)


class FixedWeights(Weighting, register=False):
    """A Gramian weighting with known weights, so the test needs no solver."""

    needs = "gramian"
    WEIGHTS = (0.2, 0.3, 0.5)

    def weights_from_gramian(self, gramian: Tensor, losses: Tensor) -> Tensor:
        return torch.tensor(self.WEIGHTS, dtype=torch.float64)


@pytest.mark.parametrize("case", ["skip_connections", "shared_sub_head", "task_without_shared"])
def test_optimizer_step_writes_the_weighted_sum(case: str) -> None:
    """End to end through the optimizer: shared tensors get w^T J with J from the loop, task
    heads their own task's gradient."""
    torch.manual_seed(0)
    params, losses_fn, _ = CASES[case]()
    opt = MultiTaskOptimizer(torch.optim.SGD(params, lr=0.0), weighting=FixedWeights())
    losses = losses_fn()
    want = reference_jacobian(losses, params)
    opt.zero_grad()
    opt.step(losses)
    weights = torch.tensor(FixedWeights.WEIGHTS, dtype=DTYPE)
    for p, block in zip(params, want):
        tasks = [t for t in range(M) if block is not None and block[t].abs().sum() > 0]
        if not tasks:
            assert p.grad is None or p.grad.abs().sum() == 0
        elif len(tasks) == 1:
            torch.testing.assert_close(p.grad, block[tasks[0]], rtol=1e-12, atol=1e-14)
        else:
            want_grad = torch.einsum("m,m...->...", weights, block)
            torch.testing.assert_close(p.grad, want_grad, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("view", [True, False])
@pytest.mark.parametrize("chunk_size", [None, 2])
def test_handed_seeds_match_passed_rows_and_are_released(
    chunk_size: int | None, view: bool, monkeypatch
) -> None:
    """Rows swapped in at the cut nodes give the numbers of rows passed to vmap, and the
    caller's list no longer holds them afterwards (they could be freed inside the call);
    also where functorch's internals cannot wrap a view of the rows (they are copied)."""
    if not view:
        import torch._C._functorch as functorch_internals

        def moved(*_: object) -> None:
            raise AttributeError("moved")

        monkeypatch.setattr(functorch_internals, "_add_batch_dim", moved)
    torch.manual_seed(0)
    params, losses_fn, _ = CASES["shared_sub_head"]()  # nested targets: one feeds the other
    task_losses = prepare_losses(losses_fn())
    graph = GraphMasks(task_losses.roots)
    cut = find_cut(graph)
    assert cut is not None and len(cut.targets) == 2
    shared = [p for p, mask in zip(params, graph.of(params)) if single_task(mask) is None]
    _, targets, seeds = backward_through_heads(cut, task_losses.output, [], M)
    assert len(targets) == 2
    want = seeded_vjp(targets, seeds, shared, chunk_size, True)
    held = [rows.clone() for rows in seeds]
    got = handed_seed_vjp(targets, held, shared, chunk_size, True)
    assert held == [None, None]
    # The copy made without functorch's internals is row-major, where the seeds are stored
    # task-minor: the same sums, rounded in another order.
    tolerance = {} if not view else {"rtol": 0, "atol": 0}
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **tolerance)


def test_released_seeds_are_computed_again_when_the_loop_takes_over(monkeypatch) -> None:
    """vmap fails below the cut (an LSTM) after the rows were handed over: the fallback
    loop computes them again and gives the per-loss gradients."""
    torch.manual_seed(0)
    trunk = nn.Linear(3, 4).to(DTYPE)
    heads = nn.ModuleList(nn.Linear(4, 1) for _ in range(M)).to(DTYPE)
    z = torch.tanh(ItemBackward.apply(trunk(torch.randn(5, 3, dtype=DTYPE))))
    losses = [head(z).pow(2).mean() for head in heads]
    params = [*trunk.parameters(), *heads.parameters()]
    want = reference_jacobian(losses, params)
    calls = []
    original = jacobian_module.backward_through_heads
    monkeypatch.setattr(
        jacobian_module,
        "backward_through_heads",
        lambda *args: calls.append(1) or original(*args),
    )
    task_losses = prepare_losses(losses)
    engine = JacobianEngine(mode="auto")
    with pytest.warns(RuntimeWarning, match="loop"):
        got = engine.task_rows(task_losses.output, GraphMasks(task_losses.roots), params, True)
    assert len(calls) == 2  # the second run rebuilt the released rows
    assert_blocks_close(got, want)


def test_seed_rows_are_stored_task_minor_and_kept_rows_row_major() -> None:
    """Rows for a batched backward are stored ``[batch, m, width]`` (so that vmap's weight
    gradients fold them into a matrix without a copy); rows the caller keeps as per-task
    gradients are plain row-major. Same values either way."""
    torch.manual_seed(0)
    _, losses_fn, _ = heads_on_z()
    task_losses = prepare_losses(losses_fn())
    cut = find_cut(GraphMasks(task_losses.roots))
    assert cut is not None
    _, _, (seeds,) = backward_through_heads(cut, task_losses.output, [], M)
    _, _, (rows,) = backward_through_heads(cut, task_losses.output, [], M, as_seeds=False)
    assert seeds.shape == rows.shape == (M, 5, 6)
    assert rows.is_contiguous() and not seeds.is_contiguous()
    assert seeds.movedim(0, -2).is_contiguous()
    torch.testing.assert_close(seeds, rows, rtol=0, atol=0)


def test_rows_of_the_representation_itself_are_row_major() -> None:
    """Where the input asked for is the cut (the representation), its rows are the blocks
    returned: contiguous, as every other block."""
    torch.manual_seed(0)
    trunk = nn.Linear(4, 6).to(DTYPE)
    heads = nn.ModuleList(nn.Linear(6, 1) for _ in range(M)).to(DTYPE)
    x, y = _data(3)
    z = torch.tanh(trunk(x))
    losses = [((h(z).squeeze(-1) - y[:, t]) ** 2).mean() for t, h in enumerate(heads)]
    task_losses = prepare_losses(losses)
    (block,) = JacobianEngine().task_rows(
        task_losses.output, GraphMasks(task_losses.roots), [z], retain_graph=True
    )
    assert block is not None and block.is_contiguous()
    assert_blocks_close([block], reference_jacobian(losses, [z]))


@pytest.mark.parametrize("as_seeds", [False, True])
def test_crossing_rows_sum_each_task_and_zero_the_silent_ones(as_seeds: bool) -> None:
    """Row t is the sum of task t's gradients in arrival order (a head that reads z twice)
    and zeros for a task that sent none, whatever the buffer held before: a reserved
    buffer starts as garbage (here nan), a subset of tasks fills rows from 0."""
    g = torch.Generator().manual_seed(5)
    grads = [torch.randn(4, 3, generator=g, dtype=DTYPE) for _ in range(3)]
    for reserve in (False, True):
        crossing = CrossingRows(2, range(1, 4), as_seeds)  # tasks 1, 2, 3
        if reserve:  # a reused buffer, holding the last step's rows (here nan)
            crossing.fill(0, crossing._empty_like(grads[0]).fill_(float("nan")))
        crossing.add(0, 2, grads[0])
        crossing.add(0, 2, grads[1])
        crossing.add(0, 3, grads[2])
        rows = crossing.take(0)
        assert rows is not None and rows.shape == (3, 4, 3)
        assert rows.movedim(0, -2).is_contiguous() == as_seeds
        expected = torch.stack([torch.zeros(4, 3, dtype=DTYPE), grads[0] + grads[1], grads[2]])
        torch.testing.assert_close(rows, expected, rtol=0, atol=0)
        assert crossing.take(1) is None  # nothing crossed into target 1
        assert crossing.take(0) is None  # taken: the caller holds the only reference
