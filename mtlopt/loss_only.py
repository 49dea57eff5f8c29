"""The loss-only step as one ordinary backward, straight into ``.grad``.

When every group's weighting only rescales the losses, and all groups use the same factors
``c``, every parameter's update is the gradient of ``sum_i c_i L_i``: one plain backward pass,
which autograd accumulates into ``.grad`` exactly as ``loss.backward()`` does (no copies, no
bookkeeping per tensor). It is taken only while no parameter has a ``.grad`` yet (after
``zero_grad()``, the usual case), so that a non-finite result is undone exactly by setting
the gradients back to None.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .aggregation import GroupPlan, GroupResult
from .finiteness import all_finite
from .jacobian import guarded
from .losses import NonFiniteError, TaskLosses


def applies(plans: list[GroupPlan]) -> bool:
    """Whether :func:`backward_into_grad` can serve this step."""
    if not plans or any(plan.weighting.needs != "losses" for plan in plans):
        return False
    first = plans[0].loss_weights
    if first is None or any(
        plan.loss_weights is not first and not torch.equal(plan.loss_weights, first)
        for plan in plans[1:]
    ):
        return False
    return all(p.grad is None for plan in plans for p in plan.params)


def backward_into_grad(
    task_losses: TaskLosses, plans: list[GroupPlan], retain_graph: bool
) -> dict[int, GroupResult]:
    """Run the backward; raise NonFiniteError (with every ``.grad`` None again) if a
    gradient is not finite."""
    params = [p for plan in plans for p in plan.params]
    output = task_losses.output
    weights = plans[0].loss_weights.to(device=output.device, dtype=output.dtype)
    with torch.enable_grad():
        guarded(_backward, output, weights, params, retain_graph)
    grads = [p.grad for p in params if p.grad is not None]
    if not all_finite(grads):
        for p in params:
            p.grad = None
        raise NonFiniteError(
            "losses: the gradients of the loss-weighted sum are not finite (nan or inf); "
            "nothing was changed"
        )
    # The gradients are in .grad already: the results carry no updates to write.
    return {plan.index: GroupResult(updates=[], weights=plan.loss_weights) for plan in plans}


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
