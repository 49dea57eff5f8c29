"""From per-task gradients to each parameter's update, for one param group."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .host_solve import weights_on
from .reachability import single_task
from .row_products import row_products
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
    #: loss-only path: the step's distinct rows of loss weights, shared by all its plans.
    rows: list[Tensor] | None = None
    #: After :meth:`split`: (position in ``params``, per-task block) of the shared tensors.
    shared: list[tuple[int, Tensor]] = field(default_factory=list)
    #: After :meth:`split`: the updates of the task heads (parameter, its task's gradient).
    head_updates: list[tuple[Tensor, Tensor]] = field(default_factory=list)
    #: After :meth:`compute_gramian`: ``J J^T`` of the (loss-weighted) shared tensors.
    gramian: Tensor | None = None
    #: Its CPU copy, where the weighting runs on the host (see :mod:`mtlopt.host_solve`).
    gramian_host: Tensor | None = None

    def compute_gramian(self) -> None:
        """The Gramian of a weighting that reads one, ahead of any weighting (the optimizer
        checks its diagonal for non-finite rows instead of reading the blocks again)."""
        self.gramian = self.gramian_host = None
        if self.shared and self.weighting.needs == "gramian" and self.weighting.n_batches == 1:
            product = gramian([block for _, block in self.shared])
            self.gramian = scale_gramian(product, self.loss_weights)

    def split(self, jacobian: list[Tensor | None]) -> None:
        """Sort the group's per-task blocks into shared tensors and task heads.

        A parameter reached by several losses is shared; a parameter reached by one loss (a
        task head) gets that task's gradient, times its loss weight if the weighting has one;
        an unreached parameter gets nothing. On the loss-only path (``row`` set) there are
        no per-task blocks to sort.
        """
        self.shared, self.head_updates = [], []
        if self.row is not None:
            return
        keep_heads = self.weighting.aggregates_task_heads
        for position, (param, block, mask) in enumerate(zip(self.params, jacobian, self.masks)):
            if block is None or mask == 0:
                continue
            task = single_task(mask)
            if task is None or keep_heads:
                self.shared.append((position, block))
            elif self.loss_weights is None:
                self.head_updates.append((param, block[task].clone()))
            else:
                self.head_updates.append(
                    (param, block[task] * self.loss_weights[task].to(block.dtype))
                )


@dataclass
class GroupResult:
    """What one group's step produced (kept for logging, no recomputation needed)."""

    #: (parameter, gradient to accumulate); emptied once written into ``.grad``
    updates: list[tuple[Tensor, Tensor]]
    weights: Tensor | None  #: task weights applied to the shared parameters (float64)
    #: ``J J^T`` of the shared parameters, when the weighting read it (float64)
    gramian: Tensor | None = None

    @property
    def grad_norms(self) -> Tensor | None:
        """Per-task gradient norms over the group's shared parameters, if the Gramian was read."""
        return None if self.gramian is None else self.gramian.diagonal().clamp(min=0).sqrt()

    @property
    def cosines(self) -> Tensor | None:
        """Pairwise cosines of the per-task gradients (0 where a gradient is zero)."""
        norms = self.grad_norms
        if norms is None:
            return None
        outer = torch.outer(norms, norms)
        return torch.where(outer > 0, self.gramian / torch.where(outer > 0, outer, 1.0), 0.0)


def gramian(blocks: list[Tensor], others: list[Tensor] | None = None) -> Tensor:
    """``J J^T`` (or ``J K^T``) in float64, summed tensor by tensor (no concatenated copy).

    Half-precision blocks are multiplied in float32 so that the products cannot overflow.
    """
    m = blocks[0].shape[0]
    total = torch.zeros(m, m, dtype=torch.float64, device=blocks[0].device)
    for k, block in enumerate(blocks):
        flat = _matmul_ready(block.reshape(m, -1))
        other = flat if others is None else _matmul_ready(others[k].reshape(m, -1))
        total += row_products(flat, other).to(torch.float64)
    return total


def _matmul_ready(flat: Tensor) -> Tensor:
    return flat.float() if flat.dtype in (torch.float16, torch.bfloat16) else flat


def scale_gramian(product: Tensor, scale: Tensor | None) -> Tensor:
    """The Gramian of the rows scaled by ``scale`` (the loss weights): ``D G D``, with no
    scaled copy of the blocks."""
    return product if scale is None else product * torch.outer(scale, scale).to(product.dtype)


def scale_rows(block: Tensor, scale: Tensor | None) -> Tensor:
    """Row ``i`` of ``block`` times ``scale[i]`` (the loss weights), or ``block`` itself."""
    if scale is None:
        return block
    return block * scale.to(block.dtype).reshape(-1, *[1] * (block.dim() - 1))


def aggregate_per_task(plan: GroupPlan, losses: Tensor) -> GroupResult:
    """A group whose weighting reads the Gramian or the per-task gradients (after ``split``)."""
    updates = list(plan.head_updates)
    weights = product = None
    if plan.shared:
        params = [plan.params[position] for position, _ in plan.shared]
        if plan.weighting.needs == "gramian":
            if plan.gramian is None:
                plan.compute_gramian()
            product = plan.gramian
            weights = weights_on(plan.weighting, product, plan.gramian_host, losses)
            # sum_i w_i (c_i g_i) = sum_i (w_i c_i) g_i: the loss weights need no scaled copy.
            applied = weights if plan.loss_weights is None else weights * plan.loss_weights
            combined = [combine(applied, block) for _, block in plan.shared]
        else:
            blocks = [scale_rows(block, plan.loss_weights) for _, block in plan.shared]
            masks = [plan.masks[position] for position, _ in plan.shared]
            combined, weights = plan.weighting.update_from_jacobian(blocks, losses, masks)
        updates.extend(zip(params, combined))
    return GroupResult(updates=updates, weights=weights, gramian=product)


def aggregate_cross_batch(
    plan: GroupPlan, extra: list[list[Tensor | None]], losses: Tensor
) -> GroupResult:
    """A group whose weighting reads several mini-batches: cross-batch Gramians of the shared
    tensors (batch 0 decides which tensors are shared); the update uses batch 0."""
    updates = list(plan.head_updates)
    weights = None
    if plan.shared:
        first = [scale_rows(block, plan.loss_weights) for _, block in plan.shared]
        batches = [first] + [
            [
                torch.zeros_like(block)
                if blocks[position] is None
                else scale_rows(blocks[position], plan.loss_weights)
                for (position, _), block in zip(plan.shared, first)
            ]
            for blocks in extra
        ]
        b, m = len(batches), first[0].shape[0]
        cross = torch.zeros(b, b, m, m, dtype=torch.float64, device=first[0].device)
        for p in range(b):
            for q in range(p, b):
                product = gramian(batches[p], batches[q])
                cross[p, q] = product
                cross[q, p] = product.T
        weights = plan.weighting.weights_from_cross_gramians(cross, losses)
        params = [plan.params[position] for position, _ in plan.shared]
        updates.extend(zip(params, (combine(weights, block) for block in first)))
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
