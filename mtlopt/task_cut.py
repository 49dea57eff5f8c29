"""Per-task gradients split at the cut where the tasks' graphs join (below the task heads).

Differentiating the m one-hot rows of the losses with one vmapped backward sends every row
through every head: head ``t`` runs its backward m times, m - 1 of them on zeros, and each
emits a dense gradient of the shared representation for every row, O(m^2 |z|) work and
memory. The chain rule lets the graph be cut instead where the tasks meet:

1. one ordinary backward of the sum of the losses through the parts of the graph that a single
   task reaches (its head), stopped at the shared nodes they feed; a hook on each such
   task-only node records the gradient it sends across the cut, which is its task's alone;
2. one batched backward of m rows from the cut through the shared part, each row seeded with
   one task's recorded gradients (:meth:`JacobianEngine.vjp_rows`).

The numbers are those of the direct product (same operations on the same values); the cost
is one pass through the heads plus m through the shared layers. The cut applies when every
loss has a graph node of its own (separate loss tensors) and no task-only node feeds a shared
leaf tensor directly (a weight that a head reuses, as tied embeddings do); otherwise the
caller differentiates all rows at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge

from .reachability import GraphMasks, single_task


@dataclass
class TaskCut:
    """Where the tasks' own subgraphs feed the shared part of the graph."""

    targets: list[GradientEdge]  #: the shared node outputs fed from across the cut
    #: (task-only node, its task, [(index into its next_functions, index into targets)])
    feeders: list[tuple[object, int, list[tuple[int, int]]]]


class Crossing(NamedTuple):
    """What a feeder's hook sees: the node, its task, its edges across the cut ((input
    position, target index) pairs), and the node's gradients in and out."""

    node: object
    task: int
    edges: list[tuple[int, int]]
    grad_inputs: tuple[Tensor | None, ...]
    grad_outputs: tuple


class CrossingSink(Protocol):
    """What a feeder's hook hands its crossing to: :class:`CrossingRows`, or
    :class:`mtlopt.factored_rows.FactoredRows`."""

    def crossed(self, crossing: Crossing) -> None: ...


def find_cut(graph: GraphMasks) -> TaskCut | None:
    """The cut between task-only and shared nodes, or None where it does not apply."""
    for task, root in enumerate(graph.roots):
        if root is None or single_task(graph.nodes.get(root, 0)) != task:
            return None  # losses sharing a node (a 1-D tensor of losses) cannot be told apart
    target_index: dict[tuple[object, int], int] = {}
    feeders = []
    nodes = graph.nodes
    for node, mask in nodes.items():
        if not mask or mask & (mask - 1):  # reached by no task or by several: not a head's
            continue
        edges = []
        for position, (child, output_nr) in enumerate(graph.edges[node]):
            if child is None:
                continue
            reached = nodes[child]
            if reached and not reached & (reached - 1):  # one task's own node: not the cut
                continue
            if getattr(child, "variable", None) is not None:
                return None  # a shared leaf used by one task's own op: no node to seed
            index = target_index.setdefault((child, output_nr), len(target_index))
            edges.append((position, index))
        if edges:
            feeders.append((node, mask.bit_length() - 1, edges))
    targets = [GradientEdge(node, output_nr) for node, output_nr in target_index]
    return TaskCut(targets, feeders)


def cut_is_the_input(targets: Sequence[GradientEdge], inputs: Sequence[Tensor]) -> bool:
    """Whether the one cut target is the one input asked for (the representation itself,
    say): its rows across the cut are then its per-task gradients, with nothing to add."""
    if len(inputs) != 1 or len(targets) != 1 or inputs[0].grad_fn is None:
        return False
    return targets[0].node is inputs[0].grad_fn and targets[0].output_nr == inputs[0].output_nr


def backward_through_heads(
    cut: TaskCut,
    output: Tensor,
    head_inputs: Sequence[Tensor],
    n_tasks: int,
    tasks: range | None = None,
    as_seeds: bool = True,
) -> tuple[list[Tensor | None], list[GradientEdge], list[Tensor]]:
    """Stage 1: the gradients of ``head_inputs`` (each reached by one task, so the gradient
    of the sum is that task's own), and the cut targets that some gradient crossed with
    their ``[m, *shape]`` rows of each task's gradient (zeros for a task that does not reach
    the target). The rows list is their only reference: stage 2 may free them early.

    ``tasks``: only these tasks' losses are differentiated (the rows are theirs); their
    losses must be separate inputs of ``output``'s stack (what :func:`find_cut` requires).
    ``as_seeds``: lay the rows out for a batched backward (see :class:`CrossingRows`); False
    where the caller keeps them as per-task gradients. The graph is kept: stage 2 and the
    caller's fallback go through it again.
    """
    tasks = range(n_tasks) if tasks is None else tasks
    if len(tasks) == n_tasks:
        roots: list[Tensor | GradientEdge] = [output]
        seeds = [torch.ones_like(output)]
    else:
        edges = output.grad_fn.next_functions  # type: ignore[union-attr]
        roots = [GradientEdge(*edges[task]) for task in tasks]
        seeds = [torch.ones((), dtype=output.dtype, device=output.device) for _ in tasks]
    crossing = CrossingRows(len(cut.targets), tasks, as_seeds)
    handles = hold_crossings(cut, crossing, tasks)
    try:
        grads = torch.autograd.grad(
            roots,
            [*cut.targets, *head_inputs],  # the targets, so that the heads compute their grads
            seeds,
            retain_graph=True,
            allow_unused=True,
        )
    finally:
        for handle in handles:
            handle.remove()
    crossed = [
        (target, rows)
        for index, target in enumerate(cut.targets)
        if (rows := crossing.take(index)) is not None
    ]
    return list(grads[len(cut.targets) :]), [t for t, _ in crossed], [r for _, r in crossed]


def hold_crossings(
    cut: TaskCut,
    rows: CrossingSink,
    tasks: range,
    passing: tuple[object, int] | None = None,
) -> list:
    """Hooks on the feeders of ``tasks``: each hands its task's crossing to ``rows`` (its
    gradient across the cut, or what :class:`CrossingSink` keeps instead) and stops the
    gradient there (autograd need not sum the tasks' gradients at the target), except on
    the edge ``passing`` (node, input position), whose gradient also goes on. Returns the
    hooks' handles."""

    def recorder(node: object, task: int, edges: list[tuple[int, int]]):
        def record(grad_inputs: tuple[Tensor | None, ...], grad_outputs: tuple) -> tuple:
            rows.crossed(Crossing(node, task, edges, grad_inputs, grad_outputs))
            passed = list(grad_inputs)
            for position, _ in edges:
                if (node, position) != passing:
                    passed[position] = None
            return tuple(passed)

        return record

    return [
        node.register_hook(recorder(node, task, edges))  # type: ignore[attr-defined]
        for node, task, edges in cut.feeders
        if task in tasks
    ]


class CrossingRows:
    """Per cut target, ``[len(tasks), *shape]`` rows: row t sums task ``tasks[t]``'s
    gradients across the cut (zeros if it sent none).

    Each gradient is copied into its row as autograd hands it over, while it is still in
    cache and before the next head's gradient is allocated (the allocator then reuses its
    memory): for ten gradients of 256 x 512 floats that is 0.22 ms against 0.52 ms for
    holding them and stacking them at the end, and the rows take one copy's memory, not
    two. In representation mode (m = 10 on the benchmark MLP) a step is 0.1 to 0.2 ms
    faster, measured interleaved against the stacking code.

    ``as_seeds``: stored task-minor (``[*shape[:-1], m, shape[-1]]`` in memory), for seeds of
    a batched backward. Under vmap a Linear layer's weight gradient is a matmul of the
    transposed batched gradient, which ``torch.matmul`` folds into one matrix: a view in
    this layout, a copy of ``m x batch x width`` floats in the row-major one. Same values
    bit for bit; the bare batched backward of the benchmark MLP (m = 10) peaks at 1.73x the
    Jacobian instead of 2.06x, and is no slower.
    """

    def __init__(self, n_targets: int, tasks: range, as_seeds: bool = False) -> None:
        self.tasks = tasks
        self.as_seeds = as_seeds
        self._rows: list[Tensor | None] = [None] * n_targets
        self._filled: list[set[int]] = [set() for _ in range(n_targets)]

    def fill(self, index: int, rows: Tensor) -> None:
        """Write target ``index``'s rows into ``rows`` (``[len(tasks), *shape]``, row-major,
        contents ignored) rather than allocate them on the first gradient, among autograd's
        temporaries: representation mode hands over a buffer it keeps from step to step
        (:class:`mtlopt.workspace.RowsWorkspace`)."""
        self._rows[index] = rows

    def crossed(self, crossing: Crossing) -> None:
        """A feeder's hook: add each gradient it sends across the cut to its target's rows."""
        for position, index in crossing.edges:
            grad = crossing.grad_inputs[position]
            if grad is not None:
                self.add(index, crossing.task, grad)

    def add(self, index: int, task: int, grad: Tensor) -> None:
        rows = self._rows[index]
        if rows is None:
            rows = self._rows[index] = self._empty_like(grad)
        row = rows[task - self.tasks.start]
        if task in self._filled[index]:
            row.add_(grad)  # a task crossing twice into one target (a head read z twice)
        else:
            row.copy_(grad)
            self._filled[index].add(task)

    def _empty_like(self, grad: Tensor) -> Tensor:
        m = len(self.tasks)
        if not self.as_seeds or grad.dim() < 2:
            return grad.new_empty((m, *grad.shape))
        return grad.new_empty((*grad.shape[:-1], m, grad.shape[-1])).movedim(-2, 0)

    def take(self, index: int) -> Tensor | None:
        """Target ``index``'s rows (None if no task crossed into it and none were filled in);
        the last reference is the caller's, so that it can free them early."""
        rows, self._rows[index] = self._rows[index], None
        if rows is not None:
            for row, task in enumerate(self.tasks):
                if task not in self._filled[index]:
                    rows[row].zero_()
        return rows
