"""Which losses reach which parameters through the autograd graph.

A parameter reached by exactly one loss is that task's own (a task head): it gets that
task's gradient directly. The answer comes from the graph's structure, never from a gradient
that happens to be zero.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor


class GraphMasks:
    """For every node of the losses' graphs, a bit mask of the tasks reaching it (bit i =
    task i).

    ``roots`` are the losses' graph nodes (one task may share its node with another). One
    pass over the union of the graphs: in-degrees first, then masks pushed in topological
    order (Kahn), so a node's mask is complete before it is propagated. Cost is linear in the
    number of graph nodes.

    ``stop``: a node whose inputs are not visited (representation mode stops at the
    representation, so that the walk covers the heads only); it gets its mask like any node.
    """

    def __init__(self, roots: Sequence[object | None], stop: object | None = None) -> None:
        self.roots = list(roots)
        # The walk runs every step on every node of the heads (all nodes in the ordinary
        # mode): a node is seen once it has an in-degree entry, and edges are read once.
        stack = list(dict.fromkeys(node for node in roots if node is not None))
        indegree: dict[object, int] = dict.fromkeys(stack, 0)
        #: node -> its ``next_functions`` (each read builds a new tuple: read it once)
        self.edges: dict[object, tuple] = {}
        edges_of = self.edges
        while stack:
            node = stack.pop()
            edges = edges_of[node] = () if node is stop else node.next_functions  # type: ignore[attr-defined]
            for child, _ in edges:
                if child is None:
                    continue
                if child in indegree:
                    indegree[child] += 1
                else:
                    indegree[child] = 1
                    stack.append(child)

        pending: dict[object, int] = {}
        for task, node in enumerate(roots):
            if node is not None:
                pending[node] = pending.get(node, 0) | (1 << task)
        #: node -> mask, in topological order (a node before every node it points to)
        self.nodes: dict[object, int] = {}
        nodes = self.nodes
        self._leaves: dict[int, int] = {}  # id(leaf tensor) -> mask of its AccumulateGrad
        ready = [node for node, degree in indegree.items() if degree == 0]
        while ready:
            node = ready.pop()
            mask = pending.pop(node, 0)
            nodes[node] = mask
            variable = getattr(node, "variable", None)
            if variable is not None:
                self._leaves[id(variable)] = self._leaves.get(id(variable), 0) | mask
            for child, _ in edges_of[node]:
                if child is None:
                    continue
                pending[child] = pending.get(child, 0) | mask
                left = indegree[child] - 1
                indegree[child] = left
                if not left:
                    ready.append(child)

    def of(self, tensors: Sequence[Tensor]) -> list[int]:
        """The mask of each tensor: a leaf is reached through its ``AccumulateGrad`` node, a
        non-leaf one through its ``grad_fn``; 0 when no loss reaches it."""
        return [
            self._leaves.get(id(t), 0) if t.grad_fn is None else self.nodes.get(t.grad_fn, 0)
            for t in tensors
        ]


def task_masks(roots: Sequence[object | None], params: Sequence[Tensor]) -> list[int]:
    """For each tensor, a bit mask of the tasks whose loss reaches it (bit i = task i)."""
    return GraphMasks(roots).of(params)


def single_task(mask: int) -> int | None:
    """The task index if exactly one bit is set, else None."""
    if mask and mask & (mask - 1) == 0:
        return mask.bit_length() - 1
    return None


def leaves_below(node: object) -> set[int]:
    """The ids of the leaf tensors that ``node`` reaches (through their AccumulateGrad)."""
    seen, stack, found = {node}, [node], set()
    while stack:
        current = stack.pop()
        variable = getattr(current, "variable", None)
        if variable is not None:
            found.add(id(variable))
        for child, _ in current.next_functions:  # type: ignore[attr-defined]
            if child is not None and child not in seen:
                seen.add(child)
                stack.append(child)
    return found
