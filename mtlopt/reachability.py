"""Which losses reach which parameters through the autograd graph.

A parameter reached by exactly one loss is that task's own (a task head): it gets that
task's gradient directly. The answer comes from the graph's structure, never from a gradient
that happens to be zero.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor


def task_masks(roots: Sequence[object | None], params: Sequence[Tensor]) -> list[int]:
    """For each tensor, a bit mask of the tasks whose loss reaches it (bit i = task i).

    ``roots`` are the losses' graph nodes (one task may share its node with another). A leaf
    tensor is reached through its ``AccumulateGrad`` node, a non-leaf one through its
    ``grad_fn``. One pass over the union of the graphs: in-degrees first, then masks pushed in
    topological order (Kahn), so a node's mask is complete before it is propagated. Cost is
    linear in the number of graph nodes.
    """
    indegree: dict[object, int] = {}
    stack = list(dict.fromkeys(node for node in roots if node is not None))
    for node in stack:
        indegree.setdefault(node, 0)
    seen = set(stack)
    wanted = {p.grad_fn for p in params if p.grad_fn is not None}
    node_masks: dict[object, int] = {}
    while stack:
        node = stack.pop()
        for child, _ in node.next_functions:  # type: ignore[attr-defined]
            if child is None:
                continue
            indegree[child] = indegree.get(child, 0) + 1
            if child not in seen:
                seen.add(child)
                stack.append(child)

    masks: dict[object, int] = {}
    for task, node in enumerate(roots):
        if node is not None:
            masks[node] = masks.get(node, 0) | (1 << task)
    ready = [node for node, degree in indegree.items() if degree == 0]
    leaf_masks: dict[int, int] = {}
    while ready:
        node = ready.pop()
        mask = masks.pop(node, 0)
        if node in wanted:
            node_masks[node] = mask
        variable = getattr(node, "variable", None)
        if variable is not None:
            leaf_masks[id(variable)] = leaf_masks.get(id(variable), 0) | mask
        for child, _ in node.next_functions:  # type: ignore[attr-defined]
            if child is None:
                continue
            masks[child] = masks.get(child, 0) | mask
            indegree[child] -= 1
            if indegree[child] == 0:
                ready.append(child)
    return [
        leaf_masks.get(id(p), 0) if p.grad_fn is None else node_masks.get(p.grad_fn, 0)
        for p in params
    ]


def single_task(mask: int) -> int | None:
    """The task index if exactly one bit is set, else None."""
    if mask and mask & (mask - 1) == 0:
        return mask.bit_length() - 1
    return None
