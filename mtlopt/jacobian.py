"""Per-task gradients: one batched vector-Jacobian product through the existing graph.

``rows_vjp`` computes ``R @ J`` for a matrix ``R`` of task coefficients (the identity for
per-task gradients, one row of loss weights for loss-only methods) with respect to every
input tensor, without concatenating anything. Rows are differentiated ``chunk_size`` at a
time with ``torch.func.vmap`` over ``torch.autograd.grad``; if vmap cannot run an op of the
graph, it falls back to a loop of ordinary backward passes (same numbers) and warns once.
Knows nothing about weightings.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

from .reachability import task_masks

Blocks = list[Tensor | None]


class JacobianEngine:
    """Computes ``R @ J`` blocks; remembers whether batching works for this model.

    Args:
        chunk_size: at most this many rows per batched call (None: all at once).
        mode: ``"auto"`` (batched, falling back to a loop if needed), ``"batched"`` (never
            fall back) or ``"loop"`` (one backward pass per row).
    """

    def __init__(self, chunk_size: int | None = None, mode: str = "auto") -> None:
        if chunk_size is not None and (
            isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
        ):
            raise ValueError(f"chunk_size: expected a positive int or None, got {chunk_size!r}")
        if mode not in ("auto", "batched", "loop"):
            raise ValueError(f"jacobian: expected 'auto', 'batched' or 'loop', got {mode!r}")
        self.chunk_size = chunk_size
        self.mode = mode
        self.fallback_reason: str | None = None  # set once the batched path has failed

    @property
    def uses_loop(self) -> bool:
        return self.mode == "loop" or self.fallback_reason is not None

    def rows_vjp(
        self,
        output: Tensor,
        inputs: Sequence[Tensor],
        rows: Tensor,
        retain_graph: bool = False,
        reached: Sequence[bool] | None = None,
    ) -> Blocks:
        """``[rows @ d output / d x for x in inputs]``: each block ``[r, *x.shape]`` or None.

        ``output`` is the 1-D tensor of the ``m`` losses, ``rows`` is ``[r, m]``. A None block
        means that no loss reaches that input. ``reached`` (which inputs the graph reaches)
        spares a graph walk when the caller knows it already.
        """
        if rows.shape[0] == 1:
            grads = _grad(output, inputs, rows[0], retain_graph, allow_unused=True)
            return [None if g is None else g.unsqueeze(0) for g in grads]
        # vmap cannot return None, so unreached inputs are left out of the batched call.
        if reached is None:
            reached = [mask != 0 for mask in task_masks([output.grad_fn], inputs)]
        used = [x for x, hit in zip(inputs, reached) if hit]
        blocks = iter(self._rows_vjp_reached(output, used, rows, retain_graph) if used else [])
        return [next(blocks) if hit else None for hit in reached]

    def _rows_vjp_reached(
        self, output: Tensor, inputs: Sequence[Tensor], rows: Tensor, retain_graph: bool
    ) -> Blocks:
        if self.uses_loop:
            return _loop_vjp(output, inputs, rows, retain_graph)
        # In auto mode the graph is kept so that the loop can rerun if vmap fails on this step
        # (a model can take another code path on a later batch). Its buffers are released
        # with the losses at the end of the user's iteration, as after a plain backward.
        keep = retain_graph or self.mode == "auto"
        try:
            blocks = _batched_vjp(output, inputs, rows, self.chunk_size, keep)
        except Exception as error:  # vmap lacks a rule for some op of the graph
            if _graph_freed(error):
                raise RuntimeError(FREED_GRAPH) from error
            if self.mode == "batched":
                raise
            blocks = _loop_vjp(output, inputs, rows, retain_graph)
            self.fallback_reason = f"{type(error).__name__}: {str(error).splitlines()[0]}"
            warnings.warn(
                "mtlopt: batched per-task gradients are not available for this model "
                f"({self.fallback_reason}); using a loop of {rows.shape[0]} backward passes "
                "instead (same results, slower). Pass jacobian='loop' to silence this.",
                RuntimeWarning,
                stacklevel=4,
            )
            return blocks
        return blocks


FREED_GRAPH = (
    "losses: their autograd graph was already freed by an earlier backward() or step(); "
    "compute the losses again for this step (or keep the graph with retain_graph=True)"
)


def _grad(
    output: Tensor, inputs: Sequence[Tensor], row: Tensor, retain: bool, **options: bool
) -> tuple[Tensor | None, ...]:
    """``torch.autograd.grad`` with a clear message when the graph was already freed."""
    try:
        return torch.autograd.grad(output, inputs, row, retain_graph=retain, **options)
    except RuntimeError as error:
        if _graph_freed(error):
            raise RuntimeError(FREED_GRAPH) from error
        raise


def _graph_freed(error: Exception) -> bool:
    text = str(error)
    return isinstance(error, RuntimeError) and (
        "backward through the graph a second time" in text or "have already been freed" in text
    )


def _batched_vjp(
    output: Tensor, inputs: Sequence[Tensor], rows: Tensor, chunk_size: int | None, keep: bool
) -> Blocks:
    def vjp_keeping(retain: bool):  # noqa: ANN202
        def vjp(row: Tensor) -> tuple[Tensor | None, ...]:
            return torch.autograd.grad(
                output, inputs, row, retain_graph=retain, materialize_grads=True
            )

        return vjp

    n_rows = rows.shape[0]
    step = n_rows if chunk_size is None else chunk_size
    if step >= n_rows:
        return list(torch.func.vmap(vjp_keeping(keep))(rows))
    # Preallocated outputs: the transient memory is one chunk, not a second copy of J.
    blocks: Blocks = []
    for start in range(0, n_rows, step):
        last = start + step >= n_rows
        chunk = torch.func.vmap(vjp_keeping(keep or not last))(rows[start : start + step])
        if start == 0:
            blocks = [None if g is None else g.new_empty((n_rows, *g.shape[1:])) for g in chunk]
        for block, part in zip(blocks, chunk):
            if block is not None and part is not None:
                block[start : start + part.shape[0]].copy_(part)
    return blocks


def _loop_vjp(output: Tensor, inputs: Sequence[Tensor], rows: Tensor, retain_graph: bool) -> Blocks:
    per_row = []
    for index, row in enumerate(rows):
        keep = retain_graph or index < rows.shape[0] - 1
        per_row.append(_grad(output, inputs, row, keep, materialize_grads=True))
    return [
        None if parts[0] is None else torch.stack(parts, 0)  # type: ignore[arg-type]
        for parts in zip(*per_row)
    ]
