"""One multi-task backward: plans per group, per-task gradients, checks, aggregation.

Pure orchestration over :mod:`jacobian` (autograd), :mod:`reachability` (which losses reach
which parameter) and :mod:`aggregation` (the weightings); it changes no state of its own.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .aggregation import (
    GroupPlan,
    GroupResult,
    aggregate_cross_batch,
    aggregate_loss_only,
    aggregate_per_task,
)
from .finiteness import all_finite_reading
from .host_solve import wants_host_copy
from .jacobian import JacobianEngine
from .loss_only import distinct_rows
from .losses import TaskLosses
from .reachability import GraphMasks
from .weighting.base import Weighting

Jacobian = list[list[Tensor | None]]  #: per group, per parameter: a block or None


def build_plans(
    groups: list[tuple[int, dict[str, Any]]], task_losses: TaskLosses
) -> list[GroupPlan]:
    """One plan per aggregation group (index, group dict); raises before any state moves."""
    plans = []
    for index, group in groups:
        weighting: Weighting = group["weighting"]
        weighting.check_n_tasks(task_losses.n_tasks)
        params = [p for p in group["params"] if p.requires_grad]
        scale = weighting.loss_weights(task_losses.values)
        if scale is not None and (
            not isinstance(scale, torch.Tensor) or scale.shape != task_losses.values.shape
        ):
            raise ValueError(
                f"{weighting!r}: loss_weights should return a tensor of shape "
                f"({task_losses.n_tasks},) or None, got "
                f"{tuple(scale.shape) if isinstance(scale, torch.Tensor) else type(scale).__name__}"
            )
        plans.append(GroupPlan(index, weighting, params, scale))
    if plans and not any(plan.params for plan in plans):
        raise ValueError(
            "param_groups: no parameter of the optimizer requires grad (all frozen), so there "
            "is nothing to differentiate; unfreeze some or skip the step"
        )
    return plans


def check_batches(plans: list[GroupPlan], task_losses: TaskLosses, extra: list[TaskLosses]) -> None:
    """Raise ValueError unless ``extra`` holds as many further batches as the plans read."""
    needy = max(plans, key=lambda plan: plan.weighting.n_batches, default=None)
    wanted = 1 if needy is None else needy.weighting.n_batches
    if len(extra) != wanted - 1:
        raise ValueError(
            f"extra_batches: {needy.weighting if needy else 'the step'!r} reads {wanted} "
            f"mini-batch(es) per step, so {wanted - 1} extra batch(es) of losses are expected, "
            f"got {len(extra)}; call opt.step(closure) with a closure that draws a fresh batch "
            "and returns its losses"
        )
    for index, batch in enumerate(extra):
        if batch.n_tasks != task_losses.n_tasks:
            raise ValueError(
                f"extra_batches[{index}]: expected {task_losses.n_tasks} losses (as in the "
                f"first batch), got {batch.n_tasks}"
            )


def needs_per_task(plans: list[GroupPlan]) -> bool:
    return any(plan.weighting.needs != "losses" for plan in plans)


def per_task_gradients(
    engine: JacobianEngine, task_losses: TaskLosses, plans: list[GroupPlan], retain_graph: bool
) -> Jacobian:
    """Per group, per parameter: ``[m, *shape]`` per-task gradients, or ``[1, *shape]``
    loss-weighted rows when no group needs per-task gradients (one ordinary backward)."""
    inputs = [p for plan in plans for p in plan.params]
    output = task_losses.output
    if needs_per_task(plans):
        graph = GraphMasks(task_losses.roots)
        masks = graph.of(inputs)
        flat = engine.task_rows(output, graph, inputs, retain_graph, masks)
        for plan, plan_masks in zip(plans, _split(masks, plans)):
            plan.masks = plan_masks
    else:
        # Loss-only: one backward per distinct vector of loss weights (usually one).
        distinct = distinct_rows(plans)
        rows = torch.stack(distinct).to(device=output.device, dtype=output.dtype)
        flat = engine.rows_vjp(output, inputs, rows, retain_graph)
        row_of = [plan.row for plan in plans for _ in plan.params]
        flat = [None if b is None else b[row : row + 1] for b, row in zip(flat, row_of)]
    return _split(flat, plans)


def extra_batch_gradients(
    engine: JacobianEngine, task_losses: TaskLosses, plans: list[GroupPlan]
) -> Jacobian:
    """Per-task gradients of a further mini-batch, for the groups that read several."""
    wanted = [plan if plan.weighting.n_batches > 1 else None for plan in plans]
    inputs = [p for plan in wanted if plan is not None for p in plan.params]
    graph = GraphMasks(task_losses.roots)
    flat = iter(engine.task_rows(task_losses.output, graph, inputs) if inputs else [])
    return [[] if plan is None else [next(flat) for _ in plan.params] for plan in wanted]


def _split(flat: list[Any], plans: list[GroupPlan]) -> list[list[Any]]:
    per_group, offset = [], 0
    for plan in plans:
        per_group.append(flat[offset : offset + len(plan.params)])
        offset += len(plan.params)
    return per_group


def blocks_of(jacobians: list[Jacobian]) -> list[Tensor]:
    """Every per-parameter block of several Jacobians (None entries left out)."""
    return [
        block
        for jacobian in jacobians
        for group in jacobian
        for block in group
        if block is not None
    ]


def nonfinite_tasks(plans: list[GroupPlan], jacobian: Jacobian, extra: list[Jacobian]) -> list[int]:
    """The tasks whose per-task gradients hold a nan or inf; empty if none.

    Run after :meth:`GroupPlan.compute_gramian`: a Gramian's diagonal ``sum_k J_ik^2`` is not
    finite when row ``i`` of its blocks is not, so those blocks are not read again; the
    others (task heads, Jacobian weightings, extra batches) get one fused finiteness pass
    (:func:`mtlopt.finiteness.all_finite`). Only if something is not finite are the rows
    inspected one by one."""
    gramians, covered = [], set()
    for plan in plans:
        if plan.gramian is not None:
            gramians.append(plan.gramian.diagonal())
            covered.update(id(block) for _, block in plan.shared)
    every = blocks_of([jacobian, *extra])
    rest = [block for block in every if id(block) not in covered]
    hosted = [plan for plan in plans if wants_host_copy(plan.weighting, plan.gramian)]
    finite, copies = all_finite_reading([*rest, *gramians], [p.gramian for p in hosted])
    for plan, copy in zip(hosted, copies):
        plan.gramian_host = copy
    if finite:
        return []
    flat = [block.reshape(block.shape[0], -1) for block in every]
    finite = torch.stack([torch.isfinite(block).all(1) for block in flat]).all(0)
    return [i for i, ok in enumerate(finite.tolist()) if not ok]


def aggregate(
    plan: GroupPlan, blocks: list[Tensor | None], extra: list[list[Tensor | None]], losses: Tensor
) -> GroupResult:
    """The group's updates from its blocks (``plan.split`` must have run)."""
    if plan.weighting.needs == "losses":
        return aggregate_loss_only(plan, blocks)
    if plan.weighting.n_batches > 1:
        return aggregate_cross_batch(plan, extra, losses)
    return aggregate_per_task(plan, losses)
