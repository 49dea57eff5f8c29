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
from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge

from .batched_rows import Blocks, seeded_vjp
from .chunked_cut import cut_rows_in_chunks
from .handed_seeds import handed_seed_vjp
from .reachability import GraphMasks, single_task, task_masks
from .task_cut import TaskCut, backward_through_heads, cut_is_the_input, find_cut

Outputs = Sequence[Tensor | GradientEdge]


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

    def task_rows(
        self,
        output: Tensor,
        graph: GraphMasks,
        inputs: Sequence[Tensor],
        retain_graph: bool = False,
        masks: Sequence[int] | None = None,
        heads_as_rows: bool = True,
    ) -> Blocks:
        """Per-task gradients: ``[m, *x.shape]`` per input (row i: loss i), None where no
        loss reaches the input.

        ``output`` is the 1-D tensor of the ``m`` losses and ``graph`` the reachability of
        their graph; ``masks`` (``graph.of(inputs)``) spares recomputing it. Where the tasks
        have graphs of their own above a shared part, the rows are split at the cut (see
        :mod:`mtlopt.task_cut`): one pass through the heads, m through the shared layers.
        ``heads_as_rows=False``: an input that one task reaches (a task head) gets that
        task's gradient alone, ``x.shape``, not a block of rows that are zero but one.
        """
        masks = graph.of(inputs) if masks is None else masks
        n_tasks = output.shape[0]
        cut = find_cut(graph) if n_tasks > 1 else None
        if cut is None:
            eye = torch.eye(n_tasks, dtype=output.dtype, device=output.device)
            blocks = self.rows_vjp(output, inputs, eye, retain_graph, [m != 0 for m in masks])
            if heads_as_rows:
                return blocks
            tasks = [single_task(mask) for mask in masks]
            return [b if t is None or b is None else b[t] for b, t in zip(blocks, tasks)]
        heads = [x for x, mask in zip(inputs, masks) if single_task(mask) is not None]
        shared = [x for x, mask in zip(inputs, masks) if mask and single_task(mask) is None]
        chunked = self._in_chunks(cut, output, heads, shared, masks, retain_graph)
        if chunked is not None:
            head_grads, shared_rows = chunked
            shared_blocks = iter(shared_rows)
        elif shared:
            # Where the cut is the input asked for, its rows are the blocks: kept row-major.
            # (Tested per target: the targets some gradient crossed are known only after.)
            as_seeds = not any(cut_is_the_input([target], shared) for target in cut.targets)
            head_grads, targets, held = guarded(
                backward_through_heads, cut, output, heads, n_tasks, None, as_seeds
            )
            if cut_is_the_input(targets, shared):  # the representation itself, say
                shared_blocks = iter(held)
            else:

                def regenerate() -> list[Tensor]:
                    return guarded(backward_through_heads, cut, output, heads, n_tasks)[2]

                shared_blocks = iter(self.vjp_rows(targets, held, shared, retain_graph, regenerate))
        else:  # only task heads: one ordinary backward of the sum gives every block
            head_grads = list(
                _grad(output, heads, torch.ones_like(output), True, allow_unused=True)
            )
            shared_blocks = iter(())
        head_blocks = iter(head_grads)
        blocks: Blocks = []
        for x, mask in zip(inputs, masks):
            task = single_task(mask)
            if task is not None and not heads_as_rows:
                blocks.append(next(head_blocks))
            elif task is not None:
                block = x.new_zeros((n_tasks, *x.shape))
                grad = next(head_blocks)
                if grad is not None:
                    block[task] = grad
                blocks.append(block)
            else:
                blocks.append(next(shared_blocks) if mask else None)
        return blocks

    def _in_chunks(
        self,
        cut: TaskCut,
        output: Tensor,
        heads: list[Tensor],
        shared: list[Tensor],
        masks: Sequence[int],
        retain_graph: bool,
    ) -> tuple[Blocks, Blocks] | None:
        """Both stages of the cut ``chunk_size`` tasks at a time (:mod:`mtlopt.chunked_cut`),
        or None where that does not apply (no chunking, no shared input, the loop)."""
        n_tasks = output.shape[0]
        if self.chunk_size is None or self.chunk_size >= n_tasks or not shared or self.uses_loop:
            return None
        head_tasks = [single_task(mask) for mask in masks if single_task(mask) is not None]
        keep = retain_graph or self.mode == "auto"
        try:
            return guarded(
                cut_rows_in_chunks,
                cut,
                output,
                heads,
                head_tasks,
                shared,
                self.chunk_size,
                keep,
            )
        except Exception as error:  # noqa: BLE001 -- vmap lacks a rule for some op of the graph
            self.fall_back(error, n_tasks)
            return None  # the caller runs the loop

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
        blocks = iter(self.vjp_rows([output], [rows], used, retain_graph) if used else [])
        return [next(blocks) if hit else None for hit in reached]

    def vjp_rows(
        self,
        outputs: Outputs,
        cotangents: Sequence[Tensor],
        inputs: Sequence[Tensor],
        retain_graph: bool,
        regenerate: Callable[[], list[Tensor]] | None = None,
    ) -> Blocks:
        """``[r, *x.shape]`` per input: row k is the backward of ``outputs`` seeded with row
        k of each cotangent; every input must be reached.

        With ``regenerate`` (cut edges as ``outputs``), ``cotangents`` is a list the caller
        hands over with its only reference: the rows are freed as soon as autograd has read
        them (:mod:`mtlopt.handed_seeds`), and ``regenerate()`` computes them again should
        the loop have to rerun.
        """
        n_rows = cotangents[0].shape[0]
        if self.uses_loop:
            return _loop_vjp(outputs, cotangents, inputs, retain_graph)
        # In auto mode the graph is kept so that the loop can rerun if vmap fails on this step
        # (a model can take another code path on a later batch). Its buffers are released
        # with the losses at the end of the user's iteration, as after a plain backward.
        keep = retain_graph or self.mode == "auto"
        try:
            if regenerate is None:
                blocks = seeded_vjp(outputs, cotangents, inputs, self.chunk_size, keep)
            else:
                blocks = handed_seed_vjp(
                    outputs,
                    cotangents,  # type: ignore[arg-type]
                    inputs,
                    self.chunk_size,
                    keep,
                )
        except Exception as error:  # noqa: BLE001 -- vmap lacks a rule for some op of the graph
            self.fall_back(error, n_rows)
            if regenerate is not None and any(rows is None for rows in cotangents):
                cotangents = regenerate()
            return _loop_vjp(outputs, cotangents, inputs, retain_graph)
        return blocks

    def fall_back(self, error: Exception, n_rows: int) -> None:
        """After the batched call failed: re-raise (a freed graph, or ``"batched"`` mode), or
        switch to the loop for good and warn once."""
        if _graph_freed(error):
            raise RuntimeError(FREED_GRAPH) from error
        if self.mode == "batched":
            raise error
        self.fallback_reason = f"{type(error).__name__}: {str(error).splitlines()[0]}"
        warnings.warn(
            "mtlopt: batched per-task gradients are not available for this model "
            f"({self.fallback_reason}); using a loop of {n_rows} backward passes "
            "instead (same results, slower). Pass jacobian='loop' to silence this.",
            RuntimeWarning,
            stacklevel=5,
        )


FREED_GRAPH = (
    "losses: their autograd graph was already freed by an earlier backward() or step(); "
    "compute the losses again for this step (or keep the graph with retain_graph=True)"
)


def _grad(
    outputs: Outputs | Tensor,
    inputs: Sequence[Tensor],
    seeds: Sequence[Tensor] | Tensor,
    retain: bool,
    **options: bool,
) -> tuple[Tensor | None, ...]:
    """``torch.autograd.grad`` with a clear message when the graph was already freed."""
    return guarded(torch.autograd.grad, outputs, inputs, seeds, retain_graph=retain, **options)


def guarded(function, *args, **kwargs):
    """Call ``function``; a graph freed by an earlier backward gets :data:`FREED_GRAPH`."""
    try:
        return function(*args, **kwargs)
    except RuntimeError as error:
        if _graph_freed(error):
            raise RuntimeError(FREED_GRAPH) from error
        raise


def _graph_freed(error: Exception) -> bool:
    text = str(error)
    return isinstance(error, RuntimeError) and (
        "backward through the graph a second time" in text or "have already been freed" in text
    )


def _loop_vjp(
    outputs: Outputs, cotangents: Sequence[Tensor], inputs: Sequence[Tensor], retain_graph: bool
) -> Blocks:
    n_rows = cotangents[0].shape[0]
    per_row = []
    for index in range(n_rows):
        keep = retain_graph or index < n_rows - 1
        seeds = [c[index] for c in cotangents]
        per_row.append(_grad(outputs, inputs, seeds, keep, materialize_grads=True))
    return [
        None if parts[0] is None else torch.stack(parts, 0)  # type: ignore[arg-type]
        for parts in zip(*per_row)
    ]
