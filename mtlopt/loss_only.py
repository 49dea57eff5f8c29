"""The loss-only step as one ordinary backward, straight into ``.grad``.

When every group's weighting only rescales the losses, and all groups use the same factors
``c``, every parameter's update is the gradient of ``sum_i c_i L_i``: one plain backward pass,
which autograd accumulates into ``.grad`` exactly as ``loss.backward()`` does (no copies, no
bookkeeping per tensor). It is taken only while no parameter has a ``.grad`` yet (after
``zero_grad()``, the usual case), so that a non-finite result is undone exactly by setting
the gradients back to None.

:func:`sole_group_backward` is the same step for the usual case (one param group, a list of
0-d losses) with the least Python work: on a small model the bookkeeping of the general path
(plans, rows, results) costs about as much as the few operations themselves. It only
recognises that case; anything else, bad input included, goes to the general path, which
names the problem.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from .aggregation import GroupPlan, GroupResult
from .finiteness import all_finite
from .jacobian import guarded
from .losses import NonFiniteError, TaskLosses, check_finite_values
from .weighting.base import Weighting


def applies(plans: list[GroupPlan]) -> bool:
    """Whether :func:`backward_into_grad` can serve this step."""
    if not plans or any(plan.weighting.needs != "losses" for plan in plans):
        return False
    if len(distinct_rows(plans)) != 1:
        return False
    return all(p.grad is None for plan in plans for p in plan.params)


def distinct_rows(plans: list[GroupPlan]) -> list[Tensor]:
    """The distinct vectors of loss weights of loss-only ``plans`` (one backward row each),
    with each plan's ``row`` set to its vector's index; computed once per step.

    The weights are compared on the host after one read of them all (``torch.equal`` per
    pair would make a GPU wait once per pair).
    """
    if plans[0].rows is not None:
        return plans[0].rows
    weights = [plan.loss_weights for plan in plans]
    assert all(w is not None for w in weights), "a loss-only weighting returned no loss weights"
    if all(w is weights[0] for w in weights):
        keys: list[Any] = [0] * len(weights)
    else:
        keys = [tuple(row) for row in torch.stack(weights).tolist()]
    row_of: dict[Any, int] = {}
    rows: list[Tensor] = []
    for plan, key, vector in zip(plans, keys, weights):
        if key not in row_of:
            row_of[key] = len(rows)
            rows.append(vector)
        plan.row = row_of[key]
    for plan in plans:
        plan.rows = rows
    return rows


def backward_into_grad(
    task_losses: TaskLosses, plans: list[GroupPlan], retain_graph: bool
) -> dict[int, GroupResult]:
    """Run the backward; raise NonFiniteError (with every ``.grad`` None again) if a
    gradient is not finite."""
    params = [p for plan in plans for p in plan.params]
    _into_grad(task_losses.output, plans[0].loss_weights, params, retain_graph)
    # The gradients are in .grad already: the results carry no updates to write.
    return {plan.index: GroupResult(updates=[], weights=plan.loss_weights) for plan in plans}


class SoleGroupStep(NamedTuple):
    """What :func:`sole_group_backward` did: the loss values (float64, checked finite) and the
    loss weights it applied."""

    values: Tensor
    weights: Tensor


def stacked_scalars(losses: object) -> Tensor | None:
    """``torch.stack(losses)`` for a non-empty list or tuple of 0-d floating-point tensors of
    one dtype and device that require grad; None for anything else (the general path then
    validates ``losses`` and names what is wrong)."""
    if not (type(losses) is list or type(losses) is tuple) or not losses:
        return None
    first = losses[0]
    if not isinstance(first, Tensor) or not first.is_floating_point():
        return None
    dtype = first.dtype
    for loss in losses:
        if not (
            isinstance(loss, Tensor)
            and loss.dtype is dtype
            and loss.requires_grad
            and loss.dim() == 0
        ):
            return None
    try:
        with torch.enable_grad():
            return torch.stack(losses)
    except RuntimeError:  # losses on several devices
        return None


def sole_group_backward(
    group: dict[str, Any], output: Tensor, retain_graph: bool
) -> SoleGroupStep | NonFiniteError | None:
    """The loss-only step of the optimizer's only param group, as :func:`backward_into_grad`,
    for ``output`` from :func:`stacked_scalars`.

    Returns None, with nothing touched and nothing read, where the general path must run (a
    parameter with a ``.grad`` already, no trainable parameter, a weighting that returns no
    weights of the losses' shape). Returns, not raises, the NonFiniteError of non-finite
    losses (before anything moves) or gradients (with ``.grad`` None again), so that the
    caller can tell it from one that a weighting raises; raises what the general path raises
    at the same point otherwise (``check_n_tasks``'s ValueError, the weighting's errors).
    """
    params = []
    for param in group["params"]:  # one pass: a model may have hundreds of tensors
        if param.requires_grad:
            if param.grad is not None:
                return None
            params.append(param)
    if not params:
        return None
    weighting: Weighting = group["weighting"]
    values = output.detach().double()
    try:
        check_finite_values(values)
    except NonFiniteError as error:
        return error
    weighting.check_n_tasks(output.shape[0])
    weights = weighting.loss_weights(values)
    if not isinstance(weights, Tensor) or weights.shape != values.shape:
        return None
    try:
        _into_grad(output, weights, params, retain_graph)
    except NonFiniteError as error:
        return error
    return SoleGroupStep(values, weights)


def _into_grad(output: Tensor, weights: Tensor, params: list[Tensor], retain_graph: bool) -> None:
    """Accumulate the gradient of ``weights . output`` into the (None) ``.grad`` of
    ``params``; raise NonFiniteError, with every ``.grad`` None again, if it is not finite."""
    weights = weights.to(device=output.device, dtype=output.dtype)
    with torch.enable_grad():
        guarded(_backward, output, weights, params, retain_graph)
    if not all_finite([grad for p in params if (grad := p.grad) is not None]):
        for p in params:
            p.grad = None
        raise NonFiniteError(
            "losses: the gradients of the loss-weighted sum are not finite (nan or inf); "
            "nothing was changed"
        )


def _backward(output: Tensor, weights: Tensor, params: list[Tensor], retain_graph: bool) -> None:
    """``torch.autograd.backward(output, weights, inputs=params)``.

    Where that function would only normalise its arguments and call the engine (inputs
    given, weights of the output's shape, no ``__torch_function__`` override or mode, no
    functorch transform active), the engine is
    called directly: the normalisation costs tens of microseconds a step, a few percent of a
    small model's backward. Otherwise (DTensor, a TorchFunctionMode, ...) the public
    function runs, with its dispatch and its errors.
    """
    direct = (
        _engine_run_backward is not None
        and params
        and weights.shape == output.shape
        and not torch._C._are_functorch_transforms_active()
        and not torch.overrides.has_torch_function((output, *params))
    )
    if not direct:
        torch.autograd.backward(output, weights, retain_graph=retain_graph, inputs=params)
        return
    _engine_run_backward(
        (output,),
        (weights,),
        bool(retain_graph),
        False,
        tuple(params),
        allow_unreachable=True,
        accumulate_grad=True,
    )


try:
    from torch.autograd.graph import _engine_run_backward
except ImportError:  # a torch without it: the public function serves
    _engine_run_backward = None
