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
the Jacobian (ExcessMTL, AdaTask, MoCo, ...) or read several batches are refused.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor

from .aggregation import GroupPlan, GroupResult, gramian, scale_gramian
from .gradients import nonfinite_rows
from .jacobian import JacobianEngine
from .losses import NonFiniteError, TaskLosses
from .reachability import GraphMasks, task_masks
from .weighting.base import combine


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
) -> dict[int, GroupResult]:
    """The groups' updates, with the weightings run on the representation's Gramian.

    Parameters that ``features`` depends on (below it) get the backward pass of each
    group's ``d_z``; the others (above it: heads, shared layers after the representation)
    get their per-task gradients combined as in the ordinary mode.
    """
    params = [p for plan in plans for p in plan.params]
    below_masks = task_masks([features.grad_fn], params)
    above = [p for p, mask in zip(params, below_masks) if mask == 0]
    is_below = {id(p) for p, mask in zip(params, below_masks) if mask != 0}
    graph = GraphMasks(task_losses.roots)
    with torch.enable_grad():
        blocks = engine.task_rows(task_losses.output, graph, [features, *above], True)
    z_jacobian, above_blocks = blocks[0], dict(zip(map(id, above), blocks[1:]))
    if z_jacobian is None:
        raise ValueError("features: no loss depends on the representation passed as features")
    # The representation's Gramian once: its diagonal is the finiteness check of z's
    # gradients, and each group's (loss-weighted) Gramian is a rescaling of it.
    z_gramian = gramian([z_jacobian])
    heads = [block for block in blocks[1:] if block is not None]
    if not bool(torch.isfinite(z_gramian.diagonal()).all()) or nonfinite_rows([[heads]]):
        raise NonFiniteError(
            "losses: the per-task gradients of the representation are not finite; "
            "nothing was changed"
        )
    masks = dict(zip(map(id, above), graph.of(above)))
    results: dict[int, GroupResult] = {}
    directions: list[tuple[GroupPlan, list[Tensor], Tensor]] = []
    # Gramian and loss weightings keep small state: a copy restores it if a gradient below
    # the representation turns out not finite.
    saved = [(plan.weighting, copy.deepcopy(plan.weighting.state_dict())) for plan in plans]
    for plan in plans:
        plan.masks = [masks.get(id(p), 0) for p in plan.params]
        plan.split([above_blocks.get(id(p)) for p in plan.params])
        scale = plan.loss_weights
        if plan.weighting.needs == "losses":
            assert scale is not None, f"{plan.weighting!r} returned no loss weights"
            weights, product = scale, None
        else:
            product = scale_gramian(z_gramian, scale)
            weights = plan.weighting.weights_from_gramian(product, task_losses.values)
        applied = (
            weights if (scale is None or plan.weighting.needs == "losses") else weights * scale
        )
        updates = list(plan.head_updates)
        updates.extend((plan.params[k], combine(applied, block)) for k, block in plan.shared)
        results[plan.index] = GroupResult(updates=updates, weights=weights, gramian=product)
        below = [p for p in plan.params if id(p) in is_below]
        if below:
            directions.append((plan, below, combine(applied, z_jacobian)))
    with torch.enable_grad():
        for k, (plan, below, d_z) in enumerate(directions):
            keep = retain_graph or k < len(directions) - 1
            grads = torch.autograd.grad(features, below, d_z, retain_graph=keep, allow_unused=True)
            reached = [(p, g) for p, g in zip(below, grads) if g is not None]
            if nonfinite_rows([[[g.unsqueeze(0) for _, g in reached]]]):
                for weighting, state in saved:
                    weighting.load_state_dict(state)
                raise NonFiniteError(
                    "losses: the gradients below the representation are not finite; "
                    "nothing was changed"
                )
            results[plan.index].updates.extend(reached)
    return results
