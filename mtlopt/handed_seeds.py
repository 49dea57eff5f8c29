"""A batched backward whose seed rows autograd may free while it runs.

Stage 2 of the task cut (:mod:`mtlopt.task_cut`) differentiates the shared layers from the
cut with m seed rows, ``[m, *shape]`` per cut edge. Passed to ``vmap`` as arguments, the rows
stay referenced for the whole call, and they are alive when the batched backward reaches
its peak (the largest weight gradient): at m = 10 on the benchmark MLP, 5 MB of a 31 MB peak.

Here the call is mapped over the row indices instead. The cut nodes receive a zero
gradient that takes no memory (a stride-0 expanded scalar), and a pre-hook on each cut node
swaps in its rows, gathered for the batch being computed. The caller hands over the only
reference to the rows: the hook drops it once the last chunk has gathered its rows, so they
are freed as soon as the cut nodes have used them. Same numbers as passing the rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge

from .batched_rows import run_chunked, seeded_vjp


def handed_seed_vjp(
    edges: Sequence[GradientEdge],
    held: list[Tensor | None],
    inputs: Sequence[Tensor],
    chunk_size: int | None,
    keep: bool,
) -> list[Tensor | None]:
    """Row k of each block is the backward from ``edges`` seeded with row k of ``held``.

    ``held`` is owned by this call: its entries are set to None once every row was read.
    """
    on_edges = {(edge.node, edge.output_nr) for edge in edges}
    if any(x.grad_fn is not None and (x.grad_fn, x.output_nr) in on_edges for x in inputs):
        # Autograd reads the gradient of an input that is an edge's own tensor (the
        # representation, in representation mode) before that node's pre-hooks run: it would
        # miss its rows. Such a call takes the rows as seeds.
        rows = list(held)  # every entry is set on entry: one per edge, in order
        held[:] = [None] * len(held)
        return seeded_vjp(list(edges), rows, inputs, chunk_size, keep)  # type: ignore[arg-type]
    n_rows = held[0].shape[0]  # type: ignore[union-attr]
    dummies = [
        torch.zeros((), dtype=rows.dtype, device=rows.device).expand(rows.shape[1:])  # type: ignore[union-attr]
        for rows in held
    ]
    current: dict[str, object] = {}
    positions: dict[object, list[tuple[int, int]]] = {}
    for k, edge in enumerate(edges):
        positions.setdefault(edge.node, []).append((edge.output_nr, k))

    def swap_in(node_positions: list[tuple[int, int]]):
        def prehook(grad_outputs: tuple[Tensor | None, ...]) -> tuple[Tensor | None, ...]:
            replaced = list(grad_outputs)
            for output_nr, k in node_positions:
                rows = _batched(held[k], current["rows"], current["index"])  # type: ignore[arg-type]
                incoming = grad_outputs[output_nr]
                # Another cut edge's gradient can flow into this node as well: keep it.
                replaced[output_nr] = rows if incoming is dummies[k] else rows + incoming
            if current["rows"].stop == n_rows:  # type: ignore[union-attr]
                for _, k in node_positions:
                    held[k] = None
            return tuple(replaced)

        return prehook

    def vjp_for(retain: bool, rows: slice):
        def vjp(index: Tensor) -> tuple[Tensor | None, ...]:
            current["index"], current["rows"] = index, rows
            return torch.autograd.grad(
                list(edges), inputs, dummies, retain_graph=retain, materialize_grads=True
            )

        return vjp

    handles = [
        node.register_prehook(swap_in(node_positions))  # type: ignore[attr-defined]
        for node, node_positions in positions.items()
    ]
    try:
        index = torch.arange(n_rows, device=dummies[0].device)
        return run_chunked(vjp_for, [index], chunk_size, keep)
    finally:
        for handle in handles:
            handle.remove()


def _batched(rows: Tensor, chunk: slice, index: Tensor) -> Tensor:
    """``rows[chunk]`` as the batched tensor of the running vmap call (``index`` is its
    batched row index): a view, where indexing with ``index`` would copy the rows."""
    try:
        from torch._C._functorch import _add_batch_dim, maybe_get_level

        return _add_batch_dim(rows[chunk], 0, maybe_get_level(index))
    except (ImportError, AttributeError, RuntimeError):  # functorch internals moved
        return rows[index]
