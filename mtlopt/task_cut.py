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


def find_cut(graph: GraphMasks) -> TaskCut | None:
    """The cut between task-only and shared nodes, or None where it does not apply."""
    for task, root in enumerate(graph.roots):
        if root is None or single_task(graph.nodes.get(root, 0)) != task:
            return None  # losses sharing a node (a 1-D tensor of losses) cannot be told apart
    target_index: dict[tuple[object, int], int] = {}
    feeders = []
    for node, mask in graph.nodes.items():
        task = single_task(mask)
        if task is None:
            continue
        edges = []
        for position, (child, output_nr) in enumerate(node.next_functions):  # type: ignore[attr-defined]
            if child is None or single_task(graph.nodes[child]) is not None:
                continue
            if getattr(child, "variable", None) is not None:
                return None  # a shared leaf used by one task's own op: no node to seed
            index = target_index.setdefault((child, output_nr), len(target_index))
            edges.append((position, index))
        if edges:
            feeders.append((node, task, edges))
    targets = [GradientEdge(node, output_nr) for node, output_nr in target_index]
    return TaskCut(targets, feeders)


def backward_through_heads(
    cut: TaskCut, output: Tensor, head_inputs: Sequence[Tensor], n_tasks: int
) -> tuple[list[Tensor | None], list[Tensor | None]]:
    """Stage 1: the gradients of ``head_inputs`` (each reached by one task, so the gradient
    of the sum is that task's own) and, per cut target, the ``[m, *shape]`` rows of each
    task's gradient across the cut (zeros for a task that does not reach it; None where
    nothing crossed).

    The graph is kept: stage 2 and the caller's fallback go through it again.
    """
    # Each task's gradient goes straight into its row of one buffer per target (no stacking
    # copy); rows that nothing reached are zeroed at the end.
    buffers: list[Tensor | None] = [None] * len(cut.targets)
    written: list[set[int]] = [set() for _ in cut.targets]

    def recorder(task: int, edges: list[tuple[int, int]]):
        def record(grad_inputs: tuple[Tensor | None, ...], _: object) -> None:
            for position, index in edges:
                grad = grad_inputs[position]
                if grad is None:
                    continue
                if buffers[index] is None:
                    buffers[index] = grad.new_empty((n_tasks, *grad.shape))
                if task in written[index]:
                    buffers[index][task] += grad
                else:
                    buffers[index][task].copy_(grad)
                    written[index].add(task)

        return record

    handles = [node.register_hook(recorder(task, edges)) for node, task, edges in cut.feeders]  # type: ignore[attr-defined]
    try:
        grads = torch.autograd.grad(
            output,
            [*cut.targets, *head_inputs],
            torch.ones_like(output),
            retain_graph=True,
            allow_unused=True,
        )
    finally:
        for handle in handles:
            handle.remove()
    for buffer, tasks in zip(buffers, written):
        for task in range(n_tasks):
            if buffer is not None and task not in tasks:
                buffer[task].zero_()
    rows = buffers  # None where nothing crossed (an op without a gradient for it)
    return list(grads[len(cut.targets) :]), rows
