"""Representation mode in one backward pass, for heads that read the representation.

When the tasks' heads read ``z`` directly (the cut between task-only and shared nodes is
``z`` itself) and one group at most has parameters below ``z``, the whole step is one
ordinary backward pass of the losses, as in plain training:

* hooks on the heads' nodes that feed ``z`` record each task's gradient of ``z`` (or, for
  heads that read ``z`` through a matrix product, its two small factors:
  :mod:`mtlopt.factored_rows`) and stop it there (autograd does not sum them);
* a pre-hook on ``z``'s node, which autograd runs once every head is done, forms the
  Gramian of the rows, runs the groups' weightings on it and hands ``d_z`` to the encoder;
* the heads' parameters get their task's gradient and the encoder's get ``d_z``'s, from the
  same pass.

Against the two passes of the general path (heads, then ``d_z`` through the encoder), this
saves a second traversal of the graph by autograd: 1.65x -> 1.43x a plain step on the
benchmark MLP at m = 10 (IMTL-G). The numbers are the general path's.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .aggregation import GroupPlan, GroupResult, gramian, scale_gramian
from .factored_rows import FactoredRows
from .finiteness import all_finite, few_finite
from .host_solve import wants_host_copy, weights_on
from .jacobian import guarded
from .losses import NonFiniteError, TaskLosses
from .nosync import host_copies
from .reachability import leaves_below, single_task
from .solvers.host_linalg import reads_back
from .task_cut import CrossingRows, TaskCut, cut_is_the_input, hold_crossings
from .weighting.base import Weighting, combine, snapshot
from .workspace import RowsWorkspace

NOT_FINITE_Z = (
    "losses: the per-task gradients of the representation are not finite; nothing was changed"
)


def applies(cut: TaskCut | None, features: Tensor, plans: list[GroupPlan], above: dict) -> bool:
    """Whether :func:`single_pass` serves this step: the cut is ``z`` alone, every
    parameter above it is one task's and not also below it, and one group at most has
    parameters below it (the general path handles, or refuses, the rest)."""
    if cut is None or not cut_is_the_input(cut.targets, [features]):
        return False
    if any(single_task(mask) is None for mask in above.values()):  # a shared layer above z
        return False
    if sum(any(id(p) not in above for p in plan.params) for plan in plans) > 1:
        return False
    return not above.keys() & leaves_below(features.grad_fn)  # a head weight tied below


def weigh(
    plan: GroupPlan, z_gramian: Tensor, losses: Tensor, on_host: dict[int, Tensor]
) -> tuple[Tensor, Tensor | None, Tensor]:
    """A group's task weights, the Gramian it read, and the weights to apply to the rows
    of unweighted per-task gradients (times the loss weights, if any). ``on_host``: the
    CPU copies of :func:`host_gramians`, by group."""
    scale = plan.loss_weights
    if plan.weighting.needs == "losses":
        assert scale is not None, f"{plan.weighting!r} returned no loss weights"
        return scale, None, scale
    product = scale_gramian(z_gramian, scale)
    weights = weights_on(plan.weighting, product, on_host.get(plan.index), losses)
    return weights, product, weights if scale is None else weights * scale


def host_gramians(plans: list[GroupPlan], z_gramian: Tensor) -> dict[int, Tensor]:
    """CPU copies of the (loss-weighted) Gramians of the groups whose weighting runs on the
    host (:mod:`mtlopt.host_solve`), all in one read; NonFiniteError if one is not finite
    (the CPU solvers need finite input, and the check is free on the copies)."""
    hosted = [
        plan
        for plan in plans
        if plan.weighting.needs == "gramian" and wants_host_copy(plan.weighting, z_gramian)
    ]
    if not hosted:
        return {}
    products = [scale_gramian(z_gramian, plan.loss_weights) for plan in hosted]
    copies = host_copies(products)
    if not all(few_finite(copy.diagonal()) for copy in copies):
        raise NonFiniteError(NOT_FINITE_Z)
    return {plan.index: copy for plan, copy in zip(hosted, copies)}


def undo_weighing(
    saved: list[tuple[Weighting, dict]], error: Exception, z_unchecked_and_bad: Callable[[], bool]
) -> None:
    """Restore the weightings' states after ``error``, and raise NonFiniteError instead if
    z's rows, which a device does not check before weighing, are not finite (a weighting fed
    nan may fail first). A setup error (ValueError, TypeError) stays what it is."""
    for weighting, state in saved:
        weighting.load_state_dict(state)
    if not isinstance(error, (ValueError, TypeError)) and z_unchecked_and_bad():
        raise NonFiniteError(NOT_FINITE_Z) from error


def head_update(grad: Tensor, task: int, scale: Tensor | None) -> Tensor:
    """A task head's update: its task's gradient, times the task's loss weight if any."""
    return grad if scale is None else grad * scale[task].to(grad.dtype)


class MaterialisedRows:
    """z's rows themselves, copied as they arrive into ``workspace``'s buffer, behind
    :class:`mtlopt.factored_rows.FactoredRows`'s interface (for heads it does not serve)."""

    def __init__(self, n_tasks: int, features: Tensor, workspace: RowsWorkspace) -> None:
        self._crossing = CrossingRows(1, range(n_tasks))  # one target: z
        self._crossing.fill(0, workspace.rows(n_tasks, features.detach()))
        self.crossed = self._crossing.crossed
        self._rows: Tensor | None = None

    def gramian(self) -> Tensor:
        self._rows = self._crossing.take(0)
        assert self._rows is not None  # filled in before the backward
        return gramian([self._rows])

    def direction(self, weights: Tensor) -> Tensor:
        assert self._rows is not None, "gramian() takes the rows first"
        return combine(weights, self._rows)


def single_pass(
    cut: TaskCut,
    task_losses: TaskLosses,
    plans: list[GroupPlan],
    features: Tensor,
    above: dict[int, int],
    retain_graph: bool,
    workspace: RowsWorkspace,
) -> dict[int, GroupResult]:
    """The groups' updates from one backward pass (see the module's docstring). z's rows
    come as the heads' factors, or are written into ``workspace``'s buffer; nothing
    returned refers to either."""
    n_tasks = task_losses.n_tasks
    factored = FactoredRows.for_cut(cut, features, n_tasks)
    if factored is not None:
        workspace.release()  # no rows this step: hold no buffer for them
    crossing = factored or MaterialisedRows(n_tasks, features, workspace)
    below_plan = next((p for p in plans if any(id(q) not in above for q in p.params)), None)
    below = [] if below_plan is None else [p for p in below_plan.params if id(p) not in above]
    # With nothing below z to differentiate, autograd would not compute the heads'
    # gradients of z at all: ask for z's own (unused) so that its rows exist.
    wanted = below if below or factored is not None else [features]
    heads = list(dict.fromkeys(p for plan in plans for p in plan.params if id(p) in above))
    saved = [(plan.weighting, snapshot(plan.weighting.state_dict())) for plan in plans]
    weighed: dict[int, tuple[Tensor, Tensor | None, Tensor]] = {}
    # One edge into z passes its gradient on, so that autograd runs z's node (a pre-hook
    # cannot turn "no gradient" into one); the pre-hook replaces it by d_z.
    passing = (cut.feeders[0][0], cut.feeders[0][2][0][0])

    z_diagonal: list[Tensor] = []  # set once z's rows are in

    def weigh_all() -> Tensor | None:
        z_gramian = crossing.gramian()
        z_diagonal.append(z_gramian.diagonal())
        # Free on the CPU; a GPU would wait, so there the check after the backward covers it.
        if reads_back(z_gramian) and not few_finite(z_diagonal[0]):
            raise NonFiniteError(NOT_FINITE_Z)
        on_host = host_gramians(plans, z_gramian)
        for plan in plans:
            weighed[plan.index] = weigh(plan, z_gramian, task_losses.values, on_host)
        return None if below_plan is None else crossing.direction(weighed[below_plan.index][2])

    def swap_in_direction(grad_outputs: tuple[Tensor | None, ...]) -> tuple:
        replaced = list(grad_outputs)
        replaced[features.output_nr] = weigh_all()
        return tuple(replaced)

    handles = hold_crossings(cut, crossing, range(n_tasks), passing)
    handles.append(features.grad_fn.register_prehook(swap_in_direction))  # type: ignore[union-attr]
    output = task_losses.output
    try:
        with torch.enable_grad():
            grads = guarded(
                torch.autograd.grad,
                output, [*heads, *wanted], torch.ones_like(output),
                retain_graph=retain_graph, allow_unused=True,
            )  # fmt: skip
        if not weighed:  # nothing below z was differentiated: z's node did not run
            weigh_all()
        deferred = z_diagonal[0] if not reads_back(z_diagonal[0]) else None
        if not all_finite([g for g in grads if g is not None], also=deferred):
            raise NonFiniteError(
                "losses: the gradients below the representation or of the heads are not finite; "
                "nothing was changed"
            )
    except Exception as error:
        undo_weighing(
            saved,
            error,
            lambda: (
                bool(z_diagonal) and not reads_back(z_diagonal[0]) and not few_finite(z_diagonal[0])
            ),
        )
        raise
    finally:
        for handle in handles:
            handle.remove()
    found = dict(zip(map(id, [*heads, *below]), grads))
    results = {}
    for plan in plans:
        weights, product, _ = weighed[plan.index]
        updates = []
        for param in plan.params:
            grad = found.get(id(param))
            if grad is None:
                continue
            if id(param) in above:
                task = single_task(above[id(param)])
                assert task is not None  # applies() admits one-task parameters only above z
                grad = head_update(grad, task, plan.loss_weights)
            updates.append((param, grad))
        results[plan.index] = GroupResult(updates=updates, weights=weights, gramian=product)
    return results
