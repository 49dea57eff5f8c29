"""task_masks / single_task: which losses reach which parameters, from the graph's structure.

Every mask is checked against a brute-force reference: bit i is set for a parameter exactly
when ``torch.autograd.grad(loss_i, params, allow_unused=True)`` does not return None for it.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from mtlopt import MultiTaskOptimizer
from mtlopt.losses import prepare_losses
from mtlopt.reachability import GraphMasks, single_task, task_masks
from mtlopt.weighting import GradVac


def roots_of(losses):  # noqa: ANN001, ANN201
    """Per-task graph roots as the optimizer finds them (from a list of scalar losses)."""
    return prepare_losses(list(losses)).roots if len(losses) else []


def brute_force_masks(losses: list[Tensor], params: list[Tensor]) -> list[int]:
    masks = [0] * len(params)
    for task, loss in enumerate(losses):
        if not loss.requires_grad:
            continue
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        for k, g in enumerate(grads):
            if g is not None:
                masks[k] |= 1 << task
    return masks


def check(losses: list[Tensor], params: list[Tensor], expected: list[int]) -> None:
    """task_masks == hand-written expectation == brute-force reference."""
    assert brute_force_masks(losses, params) == expected
    assert task_masks(roots_of(losses), params) == expected
    assert task_masks(prepare_losses(losses).roots, params) == expected
    assert task_masks(prepare_losses(torch.stack(losses)).roots, params) == expected


class TrunkHeads(nn.Module):
    def __init__(self, n_tasks: int = 3) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 5), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(5, 1) for _ in range(n_tasks))
        self.unused = nn.Linear(2, 2)

    def losses(self, x: Tensor, y: Tensor) -> list[Tensor]:
        z = self.trunk(x)
        return [((h(z).squeeze(-1) - y[:, i]) ** 2).mean() for i, h in enumerate(self.heads)]


def batch(n_tasks: int = 3, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(6, 4, generator=g), torch.randn(6, n_tasks, generator=g)


# --------------------------------------------------------------------------- single_task


@pytest.mark.parametrize(
    ("mask", "task"),
    [(0, None), (1, 0), (2, 1), (4, 2), (3, None), (5, None), (6, None), (7, None),
     (1 << 40, 40), ((1 << 40) | 1, None)],
)
def test_single_task(mask: int, task: int | None) -> None:
    assert single_task(mask) == task


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 2**70))
def test_single_task_property(mask: int) -> None:
    expected = mask.bit_length() - 1 if bin(mask).count("1") == 1 else None
    assert single_task(mask) == expected


# --------------------------------------------------------------------------- task_masks


def test_heads_trunk_and_unused() -> None:
    torch.manual_seed(0)
    net = TrunkHeads()
    losses = net.losses(*batch())
    trunk = list(net.trunk.parameters())
    heads = [list(h.parameters()) for h in net.heads]
    unused = list(net.unused.parameters())
    params = [*trunk, *heads[0], *heads[1], *heads[2], *unused]
    expected = [0b111] * 4 + [0b001] * 2 + [0b010] * 2 + [0b100] * 2 + [0] * 2
    check(losses, params, expected)
    masks = task_masks(roots_of(losses), params)
    assert [single_task(mk) for mk in masks] == [None] * 4 + [0, 0, 1, 1, 2, 2, None, None]


def test_param_order_and_duplicates_in_params() -> None:
    torch.manual_seed(1)
    net = TrunkHeads()
    losses = net.losses(*batch(seed=1))
    w = net.trunk[0].weight
    h1 = net.heads[1].bias
    params = [h1, net.unused.weight, w, h1, w]
    check(losses, params, [0b010, 0, 0b111, 0b010, 0b111])
    assert task_masks(roots_of(losses), []) == []


def test_loss_that_is_a_function_of_another_loss() -> None:
    torch.manual_seed(2)
    trunk = nn.Linear(3, 4)
    head1, head2 = nn.Linear(4, 1), nn.Linear(4, 1)
    x = torch.randn(5, 3)
    z = torch.tanh(trunk(x))
    l1 = head1(z).pow(2).mean()
    l2 = torch.exp(-l1) + head2(z).abs().mean()  # L2 = f(L1) + head2
    params = [*trunk.parameters(), *head1.parameters(), *head2.parameters()]
    # head1 is reached by both tasks (through L1 inside L2), head2 by task 1 only
    check([l1, l2], params, [0b11] * 2 + [0b11] * 2 + [0b10] * 2)
    # and with the tasks in the other order
    check([l2, l1], params, [0b11] * 2 + [0b11] * 2 + [0b01] * 2)


def test_param_reached_by_two_of_three_tasks() -> None:
    torch.manual_seed(3)
    trunk = nn.Linear(3, 4)
    pair = nn.Linear(4, 4)  # shared by tasks 0 and 2 only
    heads = nn.ModuleList(nn.Linear(4, 1) for _ in range(3))
    x = torch.randn(5, 3)
    z = torch.tanh(trunk(x))
    zp = torch.tanh(pair(z))
    losses = [heads[0](zp).pow(2).mean(), heads[1](z).pow(2).mean(), heads[2](zp).abs().mean()]
    params = [*trunk.parameters(), *pair.parameters(), *(p for h in heads for p in h.parameters())]
    check(losses, params, [0b111] * 2 + [0b101] * 2 + [0b001] * 2 + [0b010] * 2 + [0b100] * 2)


def test_tied_weight_used_by_two_heads() -> None:
    torch.manual_seed(4)
    w = nn.Parameter(torch.randn(3))
    own = [nn.Parameter(torch.randn(3)) for _ in range(3)]
    x = torch.randn(4, 3)
    losses = [(x @ w).pow(2).mean() + (x @ own[0]).mean(), (x @ own[1]).exp().mean(),
              (x @ (w * own[2])).mean()]
    check(losses, [w, *own], [0b101, 0b001, 0b010, 0b100])


def test_param_used_many_times_in_one_node() -> None:
    """Several edges from one node to the same child (x * x) are counted consistently."""
    torch.manual_seed(5)
    a = nn.Parameter(torch.randn(3))
    b = nn.Parameter(torch.randn(3))
    losses = [(a * a * a).sum() + (a * b).sum(), (b * b).sum(), torch.stack([a, a, b]).sum()]
    check(losses, [a, b], [0b101, 0b111])


def test_detached_paths_are_not_counted() -> None:
    torch.manual_seed(6)
    trunk = nn.Linear(3, 4)
    head1, head2 = nn.Linear(4, 1), nn.Linear(4, 1)
    aux = nn.Linear(3, 4)
    x = torch.randn(5, 3)
    z = torch.tanh(trunk(x))
    with torch.no_grad():
        aux_out = aux(x)
    l1 = head1(z).pow(2).mean()
    l2 = head2(z.detach()).pow(2).mean() + (aux_out * 0 + aux(x).detach()).mean()
    params = [*trunk.parameters(), *head1.parameters(), *head2.parameters(), *aux.parameters()]
    check([l1, l2], params, [0b01] * 2 + [0b01] * 2 + [0b10] * 2 + [0] * 2)


def test_losses_without_graph_and_none_roots() -> None:
    torch.manual_seed(7)
    lin = nn.Linear(3, 1)
    loss = lin(torch.randn(4, 3)).pow(2).mean()
    const = torch.tensor(1.5)
    params = list(lin.parameters())
    assert task_masks([None, loss.grad_fn, None], params) == [0b010, 0b010]
    assert task_masks([None], params) == [0, 0]
    assert task_masks([], params) == [0, 0]
    # a constant entry in a stacked 1-D loss tensor: its root is None, it reaches nothing
    stacked = torch.stack([const, loss])
    roots = prepare_losses(stacked).roots
    assert roots[0] is None and roots[1] is loss.grad_fn
    assert task_masks(roots, params) == brute_force_masks([const, loss], params) == [0b10, 0b10]


def test_leaf_parameter_used_directly_as_a_loss_stacked() -> None:
    """A one-element parameter that is itself a task loss: its stack entry's child is the
    parameter's AccumulateGrad node, which is a valid root."""
    p = nn.Parameter(torch.tensor(2.0))
    q = nn.Parameter(torch.tensor(3.0))
    losses = [p, p * q]
    assert brute_force_masks(losses, [p, q]) == [0b11, 0b10]
    assert task_masks(prepare_losses(torch.stack(losses)).roots, [p, q]) == [0b11, 0b10]


def test_leaf_parameter_used_directly_as_a_loss_in_list() -> None:
    p = nn.Parameter(torch.tensor(2.0))
    q = nn.Parameter(torch.tensor(3.0))
    losses = [p, p * q]
    assert task_masks(prepare_losses(losses).roots, [p, q]) == [0b11, 0b10]


def test_optimizer_leaf_loss_list_and_stack_agree() -> None:
    grads = []
    for make in (lambda p, q: [p, p * q], lambda p, q: torch.stack([p, p * q])):
        p = nn.Parameter(torch.tensor(2.0))
        q = nn.Parameter(torch.tensor(3.0))
        opt = MultiTaskOptimizer(torch.optim.SGD([p, q], lr=0.1), weighting=GradVac())
        opt.zero_grad()
        opt.backward(make(p, q))
        grads.append((p.grad.clone(), q.grad.clone()))
    torch.testing.assert_close(grads[0], grads[1])


def test_deep_graph_does_not_recurse() -> None:
    torch.manual_seed(8)
    w = nn.Parameter(torch.randn(2))
    h1 = nn.Parameter(torch.randn(2))
    z = w
    for _ in range(3000):
        z = torch.sin(z) + 0.5 * z
    losses = [(z * h1).sum(), z.pow(2).sum()]
    assert task_masks(roots_of(losses), [w, h1]) == [0b11, 0b01]


def test_batchnorm_and_buffers() -> None:
    """Buffers (running stats) are not parameters of the graph; BN affine params are shared."""
    torch.manual_seed(9)
    bn = nn.BatchNorm1d(4).train()
    heads = [nn.Linear(4, 1) for _ in range(2)]
    x = torch.randn(6, 4)
    z = bn(x)
    losses = [heads[0](z).pow(2).mean(), heads[1](z).abs().mean()]
    params = [bn.weight, bn.bias, *heads[0].parameters(), *heads[1].parameters()]
    check(losses, params, [0b11, 0b11, 0b01, 0b01, 0b10, 0b10])
    assert task_masks(roots_of(losses), [bn.running_mean, bn.running_var]) == [0, 0]


# --------------------------------------------------------------------------- prepare_losses roots


def test_stack_of_scalars_gives_per_task_roots() -> None:
    torch.manual_seed(10)
    net = TrunkHeads()
    losses = net.losses(*batch(seed=10))
    prepared = prepare_losses(torch.stack(losses))
    assert prepared.n_tasks == 3
    # Each root is the loss's own node, or the reshape node right above it.
    for root, loss in zip(prepared.roots, losses):
        assert root is loss.grad_fn or loss.grad_fn in [c for c, _ in root.next_functions]
    params = list(net.parameters())
    assert task_masks(prepared.roots, params) == brute_force_masks(losses, params)
    assert [single_task(mk) for mk in task_masks(prepared.roots, list(net.heads.parameters()))] == [
        0, 0, 1, 1, 2, 2
    ]


def test_list_input_roots_are_each_losses_node() -> None:
    torch.manual_seed(11)
    net = TrunkHeads()
    losses = net.losses(*batch(seed=11))
    losses[1] = losses[1].reshape(1)  # one-element tensors are accepted too
    prepared = prepare_losses(losses)
    # Each root is the loss's own node, or the reshape node right above it.
    for root, loss in zip(prepared.roots, losses):
        assert root is loss.grad_fn or loss.grad_fn in [c for c, _ in root.next_functions]
    assert prepared.output.shape == (3,)


def test_non_stack_1d_tensor_gives_one_shared_root() -> None:
    torch.manual_seed(12)
    lin = nn.Linear(3, 2)
    x, y = torch.randn(5, 3), torch.randn(5, 2)
    v = (lin(x) - y).pow(2).mean(0)
    prepared = prepare_losses(v)
    assert prepared.n_tasks == 2
    assert prepared.roots == [v.grad_fn, v.grad_fn]
    # the graph cannot tell the tasks apart: a single root reaches everything
    params = list(lin.parameters())
    assert task_masks([v.grad_fn], params) == [0b1, 0b1]
    # per entry, autograd reaches every parameter (the gradient is only numerically zero)
    assert brute_force_masks(list(v.unbind()), params) == [0b11, 0b11]


# Regression: a root listed for several tasks must not inflate in-degrees (masks were 0).
def test_non_stack_1d_tensor_masks_are_all_tasks() -> None:
    torch.manual_seed(13)
    lin = nn.Linear(3, 2)
    x, y = torch.randn(5, 3), torch.randn(5, 2)
    v = (lin(x) - y).pow(2).mean(0)
    params = list(lin.parameters())
    assert task_masks(prepare_losses(v).roots, params) == [0b11, 0b11]


def test_same_loss_passed_twice() -> None:
    torch.manual_seed(14)
    lin = nn.Linear(3, 1)
    loss = lin(torch.randn(4, 3)).pow(2).mean()
    params = list(lin.parameters())
    assert brute_force_masks([loss, loss], params) == [0b11, 0b11]
    assert task_masks(roots_of([loss, loss]), params) == [0b11, 0b11]


def test_optimizer_with_non_stack_1d_losses_writes_gradients() -> None:
    torch.manual_seed(15)
    lin = nn.Linear(3, 2)
    x, y = torch.randn(5, 3), torch.randn(5, 2)
    opt = MultiTaskOptimizer(torch.optim.SGD(lin.parameters(), lr=0.1), weighting=GradVac())
    opt.zero_grad()
    opt.backward((lin(x) - y).pow(2).mean(0))
    assert all(p.grad is not None for p in lin.parameters())


# --------------------------------------------------------------------------- property test


@settings(max_examples=25, deadline=None)
@given(
    n_tasks=st.integers(1, 5),
    n_params=st.integers(1, 6),
    data=st.data(),
)
def test_random_dag_matches_brute_force(n_tasks: int, n_params: int, data: st.DataObject) -> None:
    """Random wiring: each task uses a random subset of params, some of them through another
    task's loss, some through detached copies."""
    params = [nn.Parameter(torch.randn(2)) for _ in range(n_params)]
    losses: list[Tensor] = []
    for t in range(n_tasks):
        used = data.draw(st.lists(st.integers(0, n_params - 1), max_size=4), label=f"used{t}")
        detached = data.draw(st.lists(st.integers(0, n_params - 1), max_size=2), label=f"det{t}")
        prev = data.draw(st.lists(st.integers(0, t - 1), max_size=2) if t else st.just([]))
        total = torch.zeros((), requires_grad=True) * 0  # keeps every loss in a graph
        for k in used:
            total = total + torch.tanh(params[k]).sum()
        for k in detached:
            total = total + params[k].detach().sum()
        for j in prev:
            total = total + 0.5 * losses[j]
        losses.append(total)
    expected = brute_force_masks(losses, params)
    assert task_masks(roots_of(losses), params) == expected
    assert task_masks(prepare_losses(losses).roots, params) == expected


def test_stop_node_gets_its_mask_and_nothing_below_it_is_visited() -> None:
    torch.manual_seed(0)
    below = torch.nn.Linear(3, 4)
    head_a, head_b = torch.nn.Linear(4, 1), torch.nn.Linear(4, 1)
    side = torch.nn.Parameter(torch.randn(3, 1))
    x = torch.randn(5, 3)
    z = torch.tanh(below(x))
    losses = [head_a(z).sum() + (x @ side).sum(), head_b(z).sum()]
    graph = GraphMasks([loss.grad_fn for loss in losses], stop=z.grad_fn)
    assert graph.of([z]) == [0b11]
    assert graph.of([head_a.weight, head_b.weight, side]) == [0b01, 0b10, 0b01]
    assert graph.of([below.weight, below.bias]) == [0, 0]  # below the stop: not visited
    assert GraphMasks([loss.grad_fn for loss in losses]).of([below.weight]) == [0b11]
