"""Tensor operations that, written the obvious way, make a GPU wait for the host (more often).

``benchmarks/sync_sites.py`` lists the synchronising calls of a CUDA step;
``tests/test_device_syncs.py`` keeps them out in CI (no GPU there).
"""

from __future__ import annotations

import torch
from torch import Tensor


def at(values: Tensor, index: Tensor) -> Tensor:
    """``values[index]`` along the first dimension, for a 0-dim integer tensor ``index``.

    Plain ``values[index]`` turns a 0-dim index into a Python int, which waits for the
    device (80 waits in one CAGrad solve); ``index_select`` stays on the device.
    """
    return values.index_select(0, index.reshape(1)).squeeze(0)


def upload(tensor: Tensor, device: torch.device) -> Tensor:
    """A CPU tensor (a random draw, a constant) copied to ``device`` without waiting.

    A blocking copy from pageable memory synchronises the stream; a non-blocking one stages
    the bytes before returning (so ``tensor`` may be freed at once) and lets the device run
    on. On the CPU it is ``tensor`` itself.
    """
    return tensor.to(device, non_blocking=True)


def host_copies(tensors: list[Tensor]) -> list[Tensor]:
    """CPU copies of small floating-point tensors of one device (flags, Gramians), in one
    read: one wait, not one each. (They travel as float64: exact for these.)"""
    payload = torch.cat([t.reshape(-1).double() for t in tensors]).cpu()
    copies, offset = [], 0
    for t in tensors:
        copies.append(payload[offset : offset + t.numel()].reshape(t.shape).to(t.dtype))
        offset += t.numel()
    return copies
