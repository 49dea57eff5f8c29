"""Representation mode: per-task gradients with respect to a shared representation.

``opt.step(losses, features=z)`` differentiates the m losses with respect to ``z`` (the
output of the shared encoder, MGDA-UB's idea; LibMTL's ``rep_grad``) and the parameters
above it, lets each group's weighting turn the representation's per-task gradients into an
update ``d_z``, and sends ``d_z`` through the encoder in one ordinary backward pass. The
per-task work is confined to the small part of the graph above ``z``, so a step costs about
one plain backward whatever the number of tasks.

The weights are computed from the representation's Gramian rather than the parameters', an
approximation that MGDA-UB bounds (Sener and Koltun, NeurIPS 2018, Theorem 1). It suits
weightings that read the Gramian or the losses; weightings that keep per-tensor state over
the Jacobian (ExcessMTL, AdaTask, MoCo, ...) or read several batches are refused. ``z``
must lie on every path from the parameters below it to the losses: a parameter that also
reaches the losses around ``z`` would get its gradient through ``z`` only, so it is refused.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .aggregation import GroupPlan, GroupResult, gramian
from .features_single_pass import (
    NOT_FINITE_Z,
    head_update,
    host_gramians,
    single_pass,
    undo_weighing,
    weigh,
)
from .features_single_pass import applies as single_pass_applies
from .finiteness import all_finite
from .jacobian import JacobianEngine
from .losses import NonFiniteError, TaskLosses
from .reachability import GraphMasks, single_task
from .solvers.host_linalg import reads_back
from .task_cut import find_cut
from .weighting.base import combine, snapshot
from .workspace import RowsWorkspace


def check_features(features: object, plans: list[GroupPlan]) -> Tensor:
    """Validate ``features`` and the groups' weightings for representation mode."""
    if not isinstance(features, Tensor):
        raise TypeError(
            f"features: expected a tensor (the shared representation), got {type(features).__name__}"
        )
    if features.grad_fn is None:
        raise ValueError(
            "features: expected the shared representation computed by the model, with its "
            "graph (got a leaf tensor or a tensor without graph)"
        )
    for plan in plans:
        if plan.weighting.needs == "jacobian" or plan.weighting.n_batches > 1:
            raise ValueError(
                f"features: {plan.weighting!r} needs the parameters' per-task gradients (or "
                "several batches); representation mode supports weightings that read the "
                "Gramian or the losses"
            )
    return features


def representation_backward(
    engine: JacobianEngine,
    task_losses: TaskLosses,
    plans: list[GroupPlan],
    features: Tensor,
    retain_graph: bool,
    workspace: RowsWorkspace,
) -> dict[int, GroupResult]:
    """The groups' updates, with the weightings run on the representation's Gramian.

    Parameters above ``features`` (task heads, shared layers after the representation) get
    their per-task gradients combined as in the ordinary mode; the others get the backward
    pass of each group's ``d_z`` from the representation (None if it does not reach them).
    Only the graph above the representation is walked: the encoder's is left to autograd.
    ``workspace``: where the one-pass path writes z's rows.
    """
    graph = GraphMasks(task_losses.roots, stop=features.grad_fn)
    params = list(dict.fromkeys(p for plan in plans for p in plan.params))
    above = [p for p, mask in zip(params, graph.of(params)) if mask]
    z_mask = graph.of([features])[0]
    if not z_mask:
        raise ValueError("features: no loss depends on the representation passed as features")
    masks = dict(zip(map(id, above), graph.of(above)))
    cut = find_cut(graph) if task_losses.n_tasks > 1 else None
    if engine.chunk_size is None and single_pass_applies(cut, features, plans, masks):
        assert cut is not None  # applies() needs one
        return single_pass(cut, task_losses, plans, features, masks, retain_graph, workspace)
    with torch.enable_grad():
        blocks = engine.task_rows(
            task_losses.output, graph, [features, *above], True, [z_mask, *masks.values()], False
        )
    z_jacobian, above_blocks = blocks[0], dict(zip(map(id, above), blocks[1:]))
    task = single_task(z_mask)
    if task is not None:  # one task reaches z (say m = 1): its gradient came without rows
        rows = z_jacobian.new_zeros((task_losses.n_tasks, *z_jacobian.shape))
        rows[task] = z_jacobian
        z_jacobian = rows
    # The representation's Gramian once: its diagonal is the finiteness check of z's
    # gradients, and each group's (loss-weighted) Gramian is a rescaling of it.
    z_gramian = gramian([z_jacobian])
    above_grads = [block for block in blocks[1:] if block is not None]
    # The CPU reads values back for free, so it checks before any weighting runs; a GPU
    # would wait twice, so there one check after the backward covers everything (a weighting
    # fed non-finite values has its state restored below).
    check_first = reads_back(z_gramian)
    if check_first and not all_finite(above_grads, also=z_gramian.diagonal()):
        raise NonFiniteError(NOT_FINITE_Z)
    results: dict[int, GroupResult] = {}
    directions: list[tuple[GroupPlan, Tensor]] = []
    # Gramian and loss weightings keep small state: a copy restores it if a gradient
    # turns out not finite.
    saved = [(plan.weighting, snapshot(plan.weighting.state_dict())) for plan in plans]
    try:
        on_host = host_gramians(plans, z_gramian)
        for plan in plans:
            weights, product, applied = weigh(plan, z_gramian, task_losses.values, on_host)
            results[plan.index] = GroupResult(
                updates=_above_updates(plan, masks, above_blocks, applied),
                weights=weights,
                gramian=product,
            )
            directions.append((plan, combine(applied, z_jacobian)))
        below = _add_below_updates(directions, features, masks, results, retain_graph)
        rows = [] if check_first else above_grads
        if not all_finite([*rows, *below], also=None if check_first else z_gramian.diagonal()):
            raise NonFiniteError(NOT_FINITE_BELOW)
    except Exception as error:
        undo_weighing(
            saved,
            error,
            lambda: not check_first and not all_finite(above_grads, also=z_gramian.diagonal()),
        )
        raise
    return results


NOT_FINITE_BELOW = (
    "losses: the gradients below the representation are not finite; nothing was changed"
)


def _above_updates(
    plan: GroupPlan,
    masks: dict[int, int],
    blocks: dict[int, Tensor | None],
    applied: Tensor,
) -> list[tuple[Tensor, Tensor]]:
    """A task head gets its task's gradient (times its loss weight); a shared parameter
    above the representation gets its rows combined with the group's weights."""
    updates = []
    for param in plan.params:
        block = blocks.get(id(param))
        if block is None:
            continue
        task = single_task(masks[id(param)])
        if task is None:
            updates.append((param, combine(applied, block)))
        else:
            updates.append((param, head_update(block, task, plan.loss_weights)))
    return updates


def _add_below_updates(
    directions: list[tuple[GroupPlan, Tensor]],
    features: Tensor,
    above: dict[int, int],
    results: dict[int, GroupResult],
    retain_graph: bool,
) -> list[Tensor]:
    """Send each group's ``d_z`` through the encoder to the group's parameters below it,
    adding them to the groups' results; return them all (the caller checks that they are
    finite)."""
    below: list[Tensor] = []
    with torch.enable_grad():
        for k, (plan, d_z) in enumerate(directions):
            keep = retain_graph or k < len(directions) - 1
            grads = torch.autograd.grad(
                features, plan.params, d_z, retain_graph=keep, allow_unused=True
            )
            reached = [(p, g) for p, g in zip(plan.params, grads) if g is not None]
            crossing = [p for p, _ in reached if id(p) in above]
            if crossing:
                raise ValueError(
                    f"features: {len(crossing)} parameter(s) of group {plan.index} (shape "
                    f"{tuple(crossing[0].shape)}, ...) reach the losses both through the "
                    "representation and around it; pass as features a tensor that every "
                    "path from the encoder to the losses goes through"
                )
            results[plan.index].updates.extend(reached)
            below.extend(g for _, g in reached)
    return below
