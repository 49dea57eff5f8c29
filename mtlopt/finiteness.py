"""Whether tensors hold only finite values, in one pass and one host synchronisation."""

from __future__ import annotations

import math
import threading

import torch
from torch import Tensor

from .nosync import host_copies


def all_finite(tensors: list[Tensor], also: Tensor | None = None) -> bool:
    """Whether every entry of ``tensors`` (and of ``also``) is finite, in one host sync.

    One fused pass over all the tensors: the check GradScaler runs on every step
    (``_amp_foreach_non_finite_check_and_unscale_`` with a scale of one, which leaves the
    values as they are), per device; a sparse tensor is checked through its stored values.
    Where that kernel cannot run, each tensor is tested on its own.
    """
    dense = list(tensors) if also is None else [*tensors, also]
    if not dense:
        return True
    device = dense[0].device
    # The usual case (dense tensors on one device) skips the per-tensor Python work below,
    # which costs as much as the check itself on a model of a few hundred thousand weights.
    if device.type == "cpu":  # a flag, where comparing devices makes an object per tensor
        odd = any(t.layout is not _STRIDED or not t.is_cpu for t in dense)
    else:
        odd = any(t.layout is not _STRIDED or t.device != device for t in dense)
    if odd:
        return _all_finite_mixed(dense)
    try:
        return not _found_non_finite(dense, device)
    except (RuntimeError, NotImplementedError, AttributeError):
        return all(bool(torch.isfinite(t).all()) for t in dense)


def all_finite_reading(tensors: list[Tensor], read: list[Tensor]) -> tuple[bool, list[Tensor]]:
    """:func:`all_finite` of ``tensors``, and CPU copies of the small tensors ``read``
    (Gramians), in one synchronisation: the flag and the values come back in one copy."""
    if not read:
        return all_finite(tensors), []
    device = read[0].device
    dense = list(tensors)
    if any(t.layout != _STRIDED or t.device != device for t in [*dense, *read]):
        return all_finite(dense), [t.to("cpu", copy=True) for t in read]  # rare: mixed
    try:
        flag = _non_finite_flag(dense, device) if dense else torch.zeros(1, device=device)
    except (RuntimeError, NotImplementedError, AttributeError):  # no fused kernel: as all_finite
        return all_finite(dense), [t.to("cpu", copy=True) for t in read]
    flag_copy, *copies = host_copies([flag, *read])
    return bool(flag_copy == 0), copies


def few_finite(tensor: Tensor) -> bool:
    """Whether a small tensor (a Gramian's diagonal, say) holds only finite values: one copy
    to the host and a Python test, the same single synchronisation as :func:`all_finite`
    for a fraction of its ops (which cost tens of microseconds right after a backward)."""
    return all(map(math.isfinite, tensor.reshape(-1).tolist()))


def _all_finite_mixed(tensors: list[Tensor]) -> bool:
    """:func:`all_finite` for sparse tensors or several devices: one check per device."""
    by_device: dict[torch.device, list[Tensor]] = {}
    for tensor in map(_stored_values, tensors):
        by_device.setdefault(tensor.device, []).append(tensor)
    try:
        flags = [_found_non_finite(group, device) for device, group in by_device.items()]
    except (RuntimeError, NotImplementedError, AttributeError):
        return all(bool(torch.isfinite(t).all()) for t in map(_stored_values, tensors))
    return not any(flags)  # one sync per device (usually one)


def _found_non_finite(tensors: list[Tensor], device: torch.device) -> bool:
    return bool(_non_finite_flag(tensors, device))


def _non_finite_flag(tensors: list[Tensor], device: torch.device) -> Tensor:
    """A one-element tensor on ``device``: nonzero if some entry of ``tensors`` is not finite
    (this thread's reused buffer: read it before the next check)."""
    flag = _flag_on(device)
    flag.zero_()
    torch._amp_foreach_non_finite_check_and_unscale_(tensors, flag, _one_on(device))
    return flag


_STRIDED = torch.strided


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


_FLAGS = threading.local()


def _flag_on(device: torch.device) -> Tensor:
    """This thread's float32 flag on ``device``, made once (zeroing it is cheaper than
    allocating one; per thread, so that optimizers stepping in parallel threads do not
    share it)."""
    flags = getattr(_FLAGS, "by_device", None)
    if flags is None:
        flags = _FLAGS.by_device = {}
    flag = flags.get(device)
    if flag is None:
        with torch.inference_mode(False):  # a normal tensor, writable in any mode
            flag = flags[device] = torch.zeros(1, dtype=torch.float32, device=device)
    return flag
