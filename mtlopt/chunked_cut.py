"""The task cut, ``chunk_size`` tasks at a time: memory that scales with the chunk.

With the whole cut at once (:mod:`mtlopt.task_cut`), stage 1 records every task's gradient
across the cut, ``m`` rows per cut edge, before stage 2 runs. With ``chunk_size = c``, each
chunk differentiates only its own tasks' losses through their heads (so every head still
runs once) and sends its ``c`` rows through the shared layers at once; the rows are freed
as soon as autograd has read them (:mod:`mtlopt.handed_seeds`). Besides the Jacobian
itself, the memory held at any time is then one chunk's rows and activation gradients.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from .batched_rows import Blocks
from .handed_seeds import handed_seed_vjp
from .task_cut import TaskCut, backward_through_heads, cut_is_the_input


def cut_rows_in_chunks(
    cut: TaskCut,
    output: Tensor,
    heads: Sequence[Tensor],
    head_tasks: Sequence[int],
    shared: Sequence[Tensor],
    chunk_size: int,
    keep: bool,
) -> tuple[Blocks, Blocks]:
    """The heads' gradients and the shared inputs' ``[m, *x.shape]`` rows, chunk by chunk.

    ``head_tasks[k]``: the task of ``heads[k]``. ``keep``: keep the graph after the last
    chunk. Exceptions of the batched calls propagate (the caller falls back to the loop).
    """
    n_tasks = output.shape[0]
    head_grads: Blocks = [None] * len(heads)
    blocks = [x.new_empty((n_tasks, *x.shape)) for x in shared]
    for start in range(0, n_tasks, chunk_size):
        tasks = range(start, min(start + chunk_size, n_tasks))
        mine = [k for k, task in enumerate(head_tasks) if task in tasks]
        mine_heads = [heads[k] for k in mine]
        grads, targets, held = backward_through_heads(cut, output, mine_heads, n_tasks, tasks)
        for k, grad in zip(mine, grads):
            head_grads[k] = grad
        if not held:  # these tasks do not reach the shared layers
            for block in blocks:
                block[tasks.start : tasks.stop].zero_()
            continue
        if cut_is_the_input(targets, shared):
            parts: Blocks = held
        else:
            last = tasks.stop == n_tasks
            parts = handed_seed_vjp(targets, held, shared, None, keep or not last)
        for block, part in zip(blocks, parts):
            block[tasks.start : tasks.stop].copy_(part)  # type: ignore[arg-type]
        del parts
    return head_grads, blocks
