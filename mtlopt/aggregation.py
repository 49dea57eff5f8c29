"""From per-task gradients to each parameter's update, for one param group."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .reachability import single_task
from .weighting.base import Weighting, combine


@dataclass
class GroupPlan:
    """One aggregation group: its weighting and the parameters the step will update."""

    index: int  #: position in ``param_groups``
    weighting: Weighting
    params: list[Tensor]
    loss_weights: Tensor | None = None  #: float64 ``[m]`` factors, or None for none
    masks: list[int] = field(default_factory=list)  #: tasks reaching each param (bit masks)
    row: int | None = None  #: loss-only path: which loss-weighted row this group reads


@dataclass
class GroupResult:
    """What one group's step produced (kept for logging, no recomputation needed)."""

    updates: list[tuple[Tensor, Tensor]]  #: (parameter, gradient to accumulate)
    weights: Tensor | None  #: task weights applied to the shared parameters (float64)


def gramian(blocks: list[Tensor]) -> Tensor:
    """``J J^T`` in float64, summed tensor by tensor (no concatenated copy of J)."""
    m = blocks[0].shape[0]
    total = torch.zeros(m, m, dtype=torch.float64, device=blocks[0].device)
    for block in blocks:
        flat = block.reshape(m, -1)
        total += (flat @ flat.T).to(torch.float64)
    return total


def aggregate_per_task(plan: GroupPlan, jacobian: list[Tensor | None], losses: Tensor) -> GroupResult:
    """A group whose weighting reads the Gramian or the per-task gradients.

    Parameters reached by several losses go through the weighting; a parameter reached by one
    loss (a task head) gets that task's gradient, times its loss weight if the weighting has
    one; an unreached parameter gets nothing.
    """
    scale = plan.loss_weights
    shared: list[tuple[Tensor, Tensor]] = []
    shared_masks: list[int] = []
    updates: list[tuple[Tensor, Tensor]] = []
    for param, block, mask in zip(plan.params, jacobian, plan.masks):
        if block is None or mask == 0:
            continue
        task = single_task(mask)
        if task is None or plan.weighting.aggregates_task_heads:
            shared.append((param, block))
            shared_masks.append(mask)
        elif scale is None:
            updates.append((param, block[task].clone()))
        else:
            updates.append((param, block[task] * scale[task].to(block.dtype)))
    weights = None
    if shared:
        blocks = [block for _, block in shared]
        if scale is not None:
            blocks = [block * scale.to(block.dtype).reshape(-1, *[1] * (block.dim() - 1)) for block in blocks]
        if plan.weighting.needs == "gramian":
            weights = plan.weighting.weights_from_gramian(gramian(blocks), losses)
            applied = weights if scale is None else weights * scale
            combined = [combine(applied, block) for _, block in shared]
        else:
            combined, weights = plan.weighting.update_from_jacobian(blocks, losses, shared_masks)
        updates.extend((param, update) for (param, _), update in zip(shared, combined))
    return GroupResult(updates=updates, weights=weights)


def aggregate_loss_only(plan: GroupPlan, jacobian: list[Tensor | None]) -> GroupResult:
    """A loss-balancing group: every parameter gets ``sum_i c_i g_i`` (heads: ``c_t g_t``).

    ``jacobian`` holds per-task gradients, or, when ``plan.row`` is set, one row per
    parameter that the backward pass already weighted with the loss weights.
    """
    assert plan.loss_weights is not None, f"{plan.weighting!r} returned no loss weights"
    updates = [
        (param, block[0] if plan.row is not None else combine(plan.loss_weights, block))
        for param, block in zip(plan.params, jacobian)
        if block is not None
    ]
    return GroupResult(updates=updates, weights=plan.loss_weights)
