"""A buffer for representation mode's per-task rows, kept from one CPU step to the next."""

from __future__ import annotations

from torch import Tensor


class RowsWorkspace:
    """The ``[m, *z.shape]`` rows of each task's gradient of the representation, reused.

    On the CPU a freed block of a few megabytes often goes back to the operating system,
    and the next step's block of the same size faults its pages in again, one per 4 KiB,
    inside the copies that fill it: on the benchmark MLP (m = 10, 5 MB of rows) 0 to 280
    faults a step depending on the heap's state, up to 0.16 ms. Kept, the buffer is
    already mapped. Other devices allocate afresh: their caching allocators already reuse
    the memory, which is then free for the forward pass. One shape at a time (the latest
    step's); the price is ``m x |z|`` elements held between CPU steps.
    """

    def __init__(self) -> None:
        self._buffer: Tensor | None = None

    def rows(self, n_tasks: int, like: Tensor) -> Tensor:
        """Uninitialised ``[n_tasks, *like.shape]`` rows of ``like``'s dtype and device;
        the same tensor again on the next call on the CPU, so the caller must be done
        with them by then."""
        shape = (n_tasks, *like.shape)
        if like.device.type != "cpu":
            return like.new_empty(shape)
        buffer = self._buffer
        if buffer is None or buffer.shape != shape or buffer.dtype != like.dtype:
            self._buffer = None  # free the old one before allocating its successor
            buffer = self._buffer = like.new_empty(shape)
        return buffer

    def release(self) -> None:
        """Drop the kept buffer (a step that needs no rows: the heads' factors serve)."""
        self._buffer = None
