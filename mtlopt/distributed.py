"""Averaging per-task gradients and loss values across ranks with torch.distributed.

Each rank differentiates its share of the batch; averaging the per-task gradients (not the
weighted update) gives every rank the Jacobian of the global mean losses, so every rank's
weighting sees the same input, keeps the same state and produces the same update.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


def resolve_process_group(option: Any) -> Any:
    """``None``: the default group if torch.distributed is initialised with several ranks;
    ``False``: none; a ProcessGroup: that one."""
    if option is False:
        return None
    if not torch.distributed.is_available():
        if option not in (None, False):
            raise ValueError("distributed: torch.distributed is not available in this build")
        return None
    if option is None or option is True:
        if not torch.distributed.is_initialized():
            if option is True:
                raise ValueError(
                    "distributed: True needs torch.distributed.init_process_group() first"
                )
            return None
        if torch.distributed.get_world_size() == 1:
            return None
        return torch.distributed.group.WORLD
    if isinstance(option, torch.distributed.ProcessGroup):
        return option
    raise TypeError(
        "distributed: expected None (auto), True, False or a ProcessGroup, "
        f"got {type(option).__name__}"
    )


def average_(tensors: list[Tensor], group: Any) -> None:
    """Replace each tensor by its mean over the ranks of ``group``, in one collective per
    dtype (the tensors are flattened into one buffer)."""
    if group is None or not tensors:
        return
    size = torch.distributed.get_world_size(group)
    by_dtype: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    for tensor in tensors:
        by_dtype.setdefault((tensor.dtype, tensor.device), []).append(tensor)
    for bucket in by_dtype.values():
        flat = _flatten_dense_tensors(bucket)
        torch.distributed.all_reduce(flat, group=group)
        flat.div_(size)
        for tensor, averaged in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
            tensor.copy_(averaged)
