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
        for position, (child, output_nr) in enumerate(graph.edges[node]):
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
    ``as_seeds``: lay the rows out for a batched backward (see :func:`stack_rows`); False
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
    # The hooks keep references to each task's gradients (no copy while autograd runs, no
    # buffer to fault in); one stack per target builds the rows at the end.
    parts: list[list[list[Tensor]]] = [[[] for _ in range(n_tasks)] for _ in cut.targets]
    handles = hold_crossings(cut, parts, tasks)
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
        for target, per_task in zip(cut.targets, parts)
        if (rows := stack_rows(per_task[tasks.start : tasks.stop], as_seeds)) is not None
    ]
    return list(grads[len(cut.targets) :]), [t for t, _ in crossed], [r for _, r in crossed]


def hold_crossings(
    cut: TaskCut,
    parts: list[list[list[Tensor]]],
    tasks: range,
    passing: tuple[object, int] | None = None,
) -> list:
    """Hooks on the feeders of ``tasks``: each appends its task's gradient across the cut to
    ``parts[target][task]`` and stops it there (autograd need not sum the tasks' gradients
    at the target), except on the edge ``passing`` (node, input position), whose gradient
    also goes on. Returns the hooks' handles."""

    def recorder(node: object, task: int, edges: list[tuple[int, int]]):
        def record(grad_inputs: tuple[Tensor | None, ...], _: object) -> tuple:
            passed = list(grad_inputs)
            for position, index in edges:
                if grad_inputs[position] is not None:
                    parts[index][task].append(grad_inputs[position])
                if (node, position) != passing:
                    passed[position] = None
            return tuple(passed)

        return record

    return [
        node.register_hook(recorder(node, task, edges))  # type: ignore[attr-defined]
        for node, task, edges in cut.feeders
        if task in tasks
    ]


def stack_rows(per_task: list[list[Tensor]], as_seeds: bool = False) -> Tensor | None:
    """``[m, *shape]``: row t sums task t's recorded gradients (zeros if it sent none).

    ``as_seeds``: stored task-minor (``[*shape[:-1], m, shape[-1]]`` in memory), for seeds of
    a batched backward. Under vmap a Linear layer's weight gradient is a matmul of the
    transposed batched gradient, which ``torch.matmul`` folds into one matrix: a view in
    this layout, a copy of ``m x batch x width`` floats in the row-major one. Same values
    bit for bit; the bare batched backward of the benchmark MLP (m = 10) peaks at 1.73x the
    Jacobian instead of 2.06x, and is no slower.
    """
    like = next((grads[0] for grads in per_task if grads), None)
    if like is None:
        return None
    rows = [
        torch.zeros_like(like) if not grads else grads[0] if len(grads) == 1 else sum(grads)
        for grads in per_task
    ]
    per_task.clear()  # drop the references: the stacked copy replaces them
    if not as_seeds or like.dim() < 2:
        return torch.stack(rows)
    return torch.stack(rows, dim=-2).movedim(-2, 0)
