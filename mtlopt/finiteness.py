"""Whether tensors hold only finite values, in one pass and one host synchronisation."""

from __future__ import annotations

import torch
from torch import Tensor


def all_finite(tensors: list[Tensor], also: Tensor | None = None) -> bool:
    """Whether every entry of ``tensors`` (and of ``also``) is finite, in one host sync.

    One fused pass over all the tensors: the check GradScaler runs on every step
    (``_amp_foreach_non_finite_check_and_unscale_`` with a scale of one, which leaves the
    values as they are), per device; a sparse tensor is checked through its stored values.
    Where that kernel cannot run, each tensor is tested on its own.
    """
    dense = [_stored_values(t) for t in tensors]
    if also is not None:
        dense.append(also)
    by_device: dict[torch.device, list[Tensor]] = {}
    for tensor in dense:
        by_device.setdefault(tensor.device, []).append(tensor)
    flags = []
    try:
        for device, group in by_device.items():
            flag = torch.zeros(1, dtype=torch.float32, device=device)
            torch._amp_foreach_non_finite_check_and_unscale_(group, flag, _one_on(device))
            flags.append(flag)
    except (RuntimeError, NotImplementedError, AttributeError):
        return all(bool(torch.isfinite(t).all()) for t in dense)
    return not any(bool(flag) for flag in flags)  # one sync per device (usually one)


def _stored_values(tensor: Tensor) -> Tensor:
    if tensor.layout == torch.strided:
        return tensor
    return tensor._values() if tensor.layout == torch.sparse_coo else tensor.values()


_ONES: dict[torch.device, Tensor] = {}


def _one_on(device: torch.device) -> Tensor:
    """A float32 one on ``device``, made once (the check's unit scale, never written)."""
    one = _ONES.get(device)
    if one is None:
        one = _ONES[device] = torch.ones(1, dtype=torch.float32, device=device)
    return one
