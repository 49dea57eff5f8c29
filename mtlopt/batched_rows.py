"""Batched vector-Jacobian products over the rows of their seeds, a chunk of rows at a time."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

Blocks = list[Tensor | None]


def run_chunked(
    vjp_for: Callable[[bool, slice], Callable[..., tuple[Tensor | None, ...]]],
    batched: list[Tensor],
    chunk_size: int | None,
    keep: bool,
) -> Blocks:
    """``vmap(vjp_for(retain, rows))`` over the rows of ``batched``, ``chunk_size`` rows at a
    time (``rows``: the slice of the rows that call maps over)."""
    n_rows = batched[0].shape[0]
    step = n_rows if chunk_size is None else chunk_size
    if step >= n_rows:
        return list(torch.func.vmap(vjp_for(keep, slice(0, n_rows)))(*batched))
    # Preallocated outputs: the transient memory is one chunk, not a second copy of J.
    blocks: Blocks = []
    for start in range(0, n_rows, step):
        last = start + step >= n_rows
        rows = slice(start, min(start + step, n_rows))
        chunk = torch.func.vmap(vjp_for(keep or not last, rows))(
            *[c[start : start + step] for c in batched]
        )
        if start == 0:
            blocks = [None if g is None else g.new_empty((n_rows, *g.shape[1:])) for g in chunk]
        for block, part in zip(blocks, chunk):
            if block is not None and part is not None:
                block[start : start + part.shape[0]].copy_(part)
    return blocks


def seeded_vjp(
    outputs: Sequence[Tensor] | Sequence[object],
    cotangents: Sequence[Tensor],
    inputs: Sequence[Tensor],
    chunk_size: int | None,
    keep: bool,
) -> Blocks:
    """``[r, *x.shape]`` per input: row k is the backward of ``outputs`` (tensors or
    gradient edges) seeded with row k of each cotangent, ``chunk_size`` rows at a time."""

    def vjp_for(retain: bool, rows: slice):
        def vjp(*seeds: Tensor) -> tuple[Tensor | None, ...]:
            return torch.autograd.grad(
                outputs, inputs, seeds, retain_graph=retain, materialize_grads=True
            )

        return vjp

    return run_chunked(vjp_for, list(cotangents), chunk_size, keep)
