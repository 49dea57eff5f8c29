"""MultiTaskOptimizer: any torch optimizer, driven by a multi-task weighting per param group."""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import checkpoint, loss_only
from .aggregation import GroupPlan, GroupResult
from .distributed import average_, resolve_process_group
from .features import check_features, representation_backward
from .gradients import (
    aggregate,
    blocks_of,
    build_plans,
    check_batches,
    extra_batch_gradients,
    needs_per_task,
    nonfinite_tasks,
    per_task_gradients,
)
from .jacobian import JacobianEngine
from .losses import (
    NonFiniteError,
    TaskLosses,
    check_finite_values,
    loss_values,
    prepare_losses,
)
from .step_wrapper import hooked_step, step_base, zero_grad_base
from .weighting import resolve
from .weighting.base import Weighting
from .weighting.baselines import Mean
from .workspace import RowsWorkspace

#: Key marking the internal param groups that hold a weighting's learnable tensors.
ROLE_KEY = "mtlopt_role"
LOSS_SCALES = "loss_scales"
_HOOK_DICTS = (
    "_optimizer_step_pre_hooks",
    "_optimizer_step_post_hooks",
    "_optimizer_state_dict_pre_hooks",
    "_optimizer_state_dict_post_hooks",
    "_optimizer_load_state_dict_pre_hooks",
    "_optimizer_load_state_dict_post_hooks",
)


_UNPICKLED = frozenset(
    {*_HOOK_DICTS, "step", "_opt_called", "_step_stats_hooks", "_process_group", "_rows_workspace"}
)


class MultiTaskOptimizer(Optimizer):
    """Wraps a torch optimizer so that ``step(losses)`` trains on several task losses.

    Each param group of the base optimizer is one aggregation group with its own weighting:
    the one named under the group's ``"weighting"`` key, or a fresh copy of ``weighting``.
    ``param_groups``, ``state`` and ``defaults`` are the base optimizer's, so LR schedulers,
    hooks, ``add_param_group`` and gradient clipping work on the wrapper as on any optimizer.

    Per step, per-task gradients are computed only if some group's weighting needs them, with
    one batched vector-Jacobian product (``torch.func.vmap`` over autograd, ``chunk_size``
    tasks at a time, with an automatic loop fallback). Then, per group:

    * parameters reached by several losses (shared) get the weighting's update;
    * a parameter reached by one loss only (a task head, found from the autograd graph) gets
      that task's gradient, scaled by the task's loss weight for loss-balancing weightings;
    * a parameter reached by no loss keeps ``.grad`` unchanged (None after ``zero_grad``).

    Gradients are accumulated into ``.grad`` like ``loss.backward()`` does.

    Args:
        optimizer: the base optimizer (any ``torch.optim.Optimizer``).
        weighting: default weighting, copied into every group that names none (default Mean).
        chunk_size: at most this many tasks are differentiated at once (bounds memory).
        jacobian: ``"auto"`` (batched, loop fallback), ``"batched"`` or ``"loop"``.
        nonfinite: what a nan or inf in the losses or per-task gradients does: ``"raise"``
            a ``FloatingPointError`` (default) or ``"skip"`` the step (counted in
            ``skipped_steps``); either way no parameter, gradient or state moves.
        distributed: average loss values and per-task gradients across ranks before the
            weightings run, so every rank computes the global Jacobian's update: ``None``
            (default) does so when torch.distributed is initialised with several ranks,
            ``False`` never, a ProcessGroup over that group. Every rank must pass the same
            number of losses and build its weightings with the same seeds.
    """

    #: torch.optim's step wrapper (step hooks, profiler range), with the range opened only
    #: while a profiler runs.
    profile_hook_step = staticmethod(hooked_step)

    def __init__(
        self,
        optimizer: Optimizer,
        weighting: Weighting | str | None = None,
        *,
        chunk_size: int | None = None,
        jacobian: str = "auto",
        nonfinite: str = "raise",
        distributed: Any = None,
    ) -> None:
        if not isinstance(optimizer, Optimizer) or isinstance(optimizer, MultiTaskOptimizer):
            raise TypeError(
                "optimizer: expected a torch.optim.Optimizer (not a MultiTaskOptimizer), "
                f"got {type(optimizer).__name__}"
            )
        weighting = resolve(weighting) or Mean()
        if nonfinite not in ("raise", "skip"):
            raise ValueError(f"nonfinite: expected 'raise' or 'skip', got {nonfinite!r}")
        self.nonfinite = nonfinite
        self._process_group = resolve_process_group(distributed)
        #: Steps skipped because of nan/inf values (``nonfinite="skip"`` or a GradScaler).
        self.skipped_steps = 0
        self._skip_pending = False
        self.optimizer = optimizer
        self.weighting = weighting
        self._engine = JacobianEngine(chunk_size, jacobian)
        self._rows_workspace = RowsWorkspace()  # representation mode's rows (kept on CPU)
        #: Per param group index: what the last step produced (task weights, and the Gramian
        #: with per-task gradient norms and cosines where the weighting read it).
        self.last_step: dict[int, GroupResult] = {}
        self._step_stats_hooks: OrderedDict[int, Callable[..., None]] = OrderedDict()
        for name in _HOOK_DICTS:
            setattr(self, name, OrderedDict())
        self._patch_step_function()
        self._attach_weightings()

    # ------------------------------------------------------------------ delegation
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self.optimizer.state = value

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.optimizer.defaults = value

    @property
    def chunk_size(self) -> int | None:
        return self._engine.chunk_size

    def __getstate__(self) -> dict[str, Any]:
        # Hooks are not pickled (as in torch.optim), nor the step wrapper an LR scheduler
        # installs on the instance (it holds a weak reference to this object).
        return {k: v for k, v in self.__dict__.items() if k not in _UNPICKLED}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        for name in _HOOK_DICTS:
            self.__dict__.setdefault(name, OrderedDict())
        self.__dict__.setdefault("_step_stats_hooks", OrderedDict())
        self.__dict__.setdefault("_process_group", resolve_process_group(None))
        self.__dict__.setdefault("_rows_workspace", RowsWorkspace())
        self._patch_step_function()

    def __repr__(self) -> str:
        lines = [
            f"{type(self).__name__}({type(self.optimizer).__name__}, weighting={self.weighting!r})"
        ]
        for index, group in enumerate(self.param_groups):
            what = "loss scales" if _is_internal(group) else repr(group["weighting"])
            lines.append(f"  group {index}: {len(group['params'])} tensor(s), {what}")
        return "\n".join(lines)

    # ------------------------------------------------------------------ groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the base optimizer; it gets its own weighting like the others."""
        weighting = resolve(param_group.get("weighting"), "param_group['weighting']")
        if weighting is not None:
            param_group["weighting"] = weighting
            if any(weighting is g.get("weighting") for g in self.param_groups):
                raise ValueError(
                    "param_group['weighting']: this weighting instance already serves another "
                    "group; give each group its own instance (state is per group)"
                )
        self.optimizer.add_param_group(param_group)
        self._attach_weightings()

    def _attach_weightings(self) -> None:
        seen: dict[int, int] = {}
        for index, group in enumerate(self.param_groups):
            if _is_internal(group):
                continue
            weighting = resolve(group.get("weighting"), f"param_groups[{index}]['weighting']")
            if weighting is None:
                weighting = self.weighting.spawn()
            group["weighting"] = weighting
            if id(weighting) in seen:
                raise ValueError(
                    f"param_groups[{index}]['weighting']: the same weighting instance serves "
                    f"groups {seen[id(weighting)]} and {index}; give each group its own "
                    "instance (state is per group)"
                )
            seen[id(weighting)] = index
            self._register_learnable(weighting)
            if weighting.expects_plain_sgd and not _is_plain_sgd(self.optimizer, group):
                warnings.warn(
                    f"param_groups[{index}]: {weighting!r} writes a finished (Adam-like) step "
                    f"direction; wrap torch.optim.SGD without momentum, dampening or nesterov, "
                    f"not {type(self.optimizer).__name__} with these options, or the base "
                    "optimizer adapts the step a second time",
                    UserWarning,
                    stacklevel=3,
                )

    def _register_learnable(self, weighting: Weighting) -> None:
        known = {id(p) for g in self.param_groups for p in g["params"]}
        new = [p for p in weighting.learnable_parameters() if id(p) not in known]
        if new:
            group = {**weighting.parameter_group_options(), "params": new, ROLE_KEY: LOSS_SCALES}
            self.optimizer.add_param_group(group)

    def weightings(self) -> list[Weighting | None]:
        """The weighting of every param group (None for internal loss-scale groups)."""
        return [None if _is_internal(g) else g["weighting"] for g in self.param_groups]

    # ------------------------------------------------------------------ the step
    def zero_grad(self, set_to_none: bool = True) -> None:
        zero_grad_base(self.optimizer, set_to_none)

    def step(  # type: ignore[override]
        self,
        losses: Sequence[Tensor] | Tensor | Callable[[], Any] | None = None,
        closure: Callable[[], Any] | None = None,
        *,
        features: Tensor | None = None,
    ) -> Any:
        """Compute and write the multi-task gradients of ``losses``, then step the base optimizer.

        ``losses``: a non-empty sequence of scalar losses or a 1-D tensor of them. Without
        losses, the base optimizer steps on the ``.grad`` already there (after
        :meth:`backward`). ``closure``: a callable that draws a batch, recomputes and returns
        the losses (it must not call backward itself); it may also be passed as the first
        argument. ``features``: the shared representation, for representation mode (see
        :meth:`backward`). Weightings that read several mini-batches per step (SDMGrad, MoDo) call it
        once per batch; weightings that learn from the loss decrease (FAMO) call it once more
        after the base step, under ``torch.no_grad()``. A closure that returns None (one that
        only re-evaluates the model, as Lightning's does after :meth:`backward`) steps on the
        ``.grad`` already there. Returns the first closure result.
        """
        if callable(losses) and closure is None:
            losses, closure = None, losses
        result = None
        if closure is not None:
            if losses is not None:
                raise ValueError("step: pass either losses or a closure, not both")
            with torch.enable_grad():
                result = closure()
                # A closure returning None (torch's convention, and Lightning's after
                # opt.backward(losses)) leaves the step to the .grad already there.
                extra = [] if result is None else [closure() for _ in range(self._n_batches() - 1)]
            if result is None:
                committed = not self._skip_pending
            else:
                committed = self.backward(result, extra_batches=extra)
        elif losses is not None:
            committed = self.backward(losses, features=features)
        else:
            committed = not self._skip_pending
        self._skip_pending = False
        if not committed:
            return result  # non-finite values under nonfinite="skip": nothing moves
        step_base(self.optimizer)
        if closure is not None and result is not None:
            self._observe_after_step(closure)
        return result

    def backward(
        self,
        losses: Sequence[Tensor] | Tensor,
        retain_graph: bool = False,
        *,
        extra_batches: Sequence[Sequence[Tensor] | Tensor] = (),
        scaler: torch.amp.GradScaler | None = None,
        features: Tensor | None = None,
    ) -> bool:
        """Write the multi-task gradients of ``losses`` into ``.grad`` without stepping.

        Use it to clip or inspect gradients, then call ``step()``. ``extra_batches``: the
        losses of further mini-batches, for weightings that read several per step (their
        count is ``n_batches - 1``). ``scaler``: a ``torch.amp.GradScaler``; pass the
        *unscaled* losses, mtlopt scales them for the backward pass, hands the weightings
        unscaled per-task gradients, and writes scaled gradients to ``.grad`` so that
        ``scaler.unscale_(opt)``, ``scaler.step(opt)`` and ``scaler.update()`` work as usual;
        on overflow it leaves every weighting's state alone and marks ``.grad`` so that the
        scaler skips the step and lowers its scale.

        ``features``: the shared representation ``z`` (the encoder's output that every task
        head reads). The weightings then run on the per-task gradients with respect to ``z``
        (MGDA-UB's idea), and one ordinary backward pass carries the result through the
        encoder: a step costs about one plain backward whatever the number of tasks. Suits
        weightings that read the Gramian (loss-only weightings ignore ``features``). Every
        path from the encoder to the losses must pass through ``z``.

        Returns True if gradients were written, False if the step was skipped (non-finite
        values under ``nonfinite="skip"`` or a scaler). Bad input raises before any
        parameter, gradient or state changes.
        """
        scaler = scaler if scaler is not None and scaler.is_enabled() else None
        if scaler is None and features is None and not extra_batches:
            committed = self._sole_group_backward(losses, retain_graph)
            if committed is not None:
                return committed
        return self._general_backward(losses, retain_graph, extra_batches, scaler, features)

    def _general_backward(
        self,
        losses: Sequence[Tensor] | Tensor,
        retain_graph: bool,
        extra_batches: Sequence[Sequence[Tensor] | Tensor],
        scaler: torch.amp.GradScaler | None,
        features: Tensor | None,
    ) -> bool:
        """:meth:`backward` for every case (``scaler`` None or enabled)."""
        task_losses = prepare_losses(losses, check_finite=False)
        extra = [prepare_losses(batch, check_finite=False) for batch in extra_batches]
        # Called inside an autocast region (Lightning's bf16-mixed runs training_step in
        # one), the weightings' products would run in half precision: they must not.
        with _autocast_off(task_losses.output.device.type):
            return self._backward(task_losses, extra, retain_graph, scaler, features)

    def _sole_group_backward(self, losses: object, retain_graph: bool) -> bool | None:
        """The usual loss-only step (one param group whose weighting reads the losses alone
        and one batch, a list of 0-d losses, no ``.grad`` yet, no autocast, no DDP) with the
        least work; None, with nothing touched, where the general path must run (see
        :mod:`mtlopt.loss_only`)."""
        if self._process_group is not None or _any_autocast():
            return None
        found = None
        for index, group in enumerate(self.param_groups):
            if not _is_internal(group):
                if found is not None:
                    return None
                found = (index, group)
        if found is None:
            return None
        index, group = found
        weighting = group["weighting"]
        if weighting.needs != "losses" or weighting.n_batches != 1:
            return None
        output = loss_only.stacked_scalars(losses)
        if output is None:
            return None
        done = loss_only.sole_group_backward(group, output, retain_graph)
        if done is None:
            return None
        if isinstance(done, NonFiniteError):
            return self._skip_non_finite(done, None)
        results = {index: GroupResult(updates=[], weights=done.weights)}
        with torch.no_grad():
            self._after_commit([weighting], results, done.values, output.device, None)
        self._skip_pending = False
        return True

    def _backward(
        self,
        task_losses: TaskLosses,
        extra: list[TaskLosses],
        retain_graph: bool,
        scaler: torch.amp.GradScaler | None,
        features: Tensor | None,
    ) -> bool:
        # Averaged first, so that every rank takes the same decision below.
        average_([t.values for t in (task_losses, *extra)], self._process_group)
        try:
            # The main batch last: its read is the one the weightings reuse (host_values).
            for batch in (*extra, task_losses):
                check_finite_values(batch.values)
        except NonFiniteError as error:
            return self._skip_non_finite(error, scaler)
        groups = [(i, g) for i, g in enumerate(self.param_groups) if not _is_internal(g)]
        plans = build_plans(groups, task_losses)
        check_batches(plans, task_losses, extra)
        if features is not None:
            check_features(features, plans)
            if needs_per_task(plans):  # loss-only weightings need no representation rows
                return self._representation_backward(
                    task_losses, plans, features, scaler, retain_graph
                )
        scale = None
        if scaler is not None:
            # The scale as a tensor (no host synchronisation), applied in the graph.
            output = task_losses.output
            scale = scaler.scale(torch.ones((), dtype=torch.float32, device=output.device))
            for batch in (task_losses, *extra):
                batch.roots  # noqa: B018 -- read from the unscaled stack, before it is wrapped
                with torch.enable_grad():
                    batch.output = batch.output * scale.to(batch.output.dtype)
        if (
            scaler is None
            and self._process_group is None
            and not extra
            and loss_only.applies(plans)
        ):
            try:
                results = loss_only.backward_into_grad(task_losses, plans, retain_graph)
            except NonFiniteError as error:
                return self._skip_non_finite(error, None)
            with torch.no_grad():
                self._commit(plans, results, task_losses, None, False)
            self._skip_pending = False
            return True
        with torch.enable_grad():
            jacobian = per_task_gradients(self._engine, task_losses, plans, retain_graph)
            extra_jacobians = [extra_batch_gradients(self._engine, b, plans) for b in extra]
        with torch.no_grad():
            average_(blocks_of([jacobian, *extra_jacobians]), self._process_group)
            unscale = scale is not None and needs_per_task(plans)
            if unscale:  # an overflow stays inf: the check below still sees it
                for block in blocks_of([jacobian, *extra_jacobians]):
                    block.div_(scale.to(block.dtype))
            for plan, blocks in zip(plans, jacobian):
                plan.split(blocks)
                plan.compute_gramian()
            bad = nonfinite_tasks(plans, jacobian, extra_jacobians)
            if bad:
                what = f"task(s) {bad}" if needs_per_task(plans) else "the loss-weighted gradient"
                error = NonFiniteError(
                    f"losses: the gradients of {what} are not finite (nan or inf); "
                    "nothing was changed"
                )
                return self._skip_non_finite(error, scaler)
            for plan in plans:
                shared = [block for _, block in plan.shared]
                plan.weighting.check_layout(shared, [plan.masks[k] for k, _ in plan.shared])
            results = {
                plan.index: aggregate(
                    plan, jacobian[k], [e[k] for e in extra_jacobians], task_losses.values
                )
                for k, plan in enumerate(plans)
            }
            self._commit(plans, results, task_losses, scale, unscale)
        self._skip_pending = False
        return True

    def _representation_backward(
        self,
        task_losses: TaskLosses,
        plans: list[GroupPlan],
        features: Tensor,
        scaler: torch.amp.GradScaler | None,
        retain_graph: bool,
    ) -> bool:
        if scaler is not None or self._process_group is not None:
            raise ValueError(
                "features: representation mode does not support a GradScaler or "
                "torch.distributed yet; pass the losses alone"
            )
        try:
            results = representation_backward(
                self._engine, task_losses, plans, features, retain_graph, self._rows_workspace
            )
        except NonFiniteError as error:
            return self._skip_non_finite(error, None)
        with torch.no_grad():
            self._commit(plans, results, task_losses, None, False)
        self._skip_pending = False
        return True

    def _n_batches(self) -> int:
        return max((w.n_batches for w in self.weightings() if w is not None), default=1)

    def _skip_non_finite(self, error: NonFiniteError, scaler: torch.amp.GradScaler | None) -> bool:
        """Raise (the default), or skip the step without moving any state."""
        if scaler is not None:
            # Let the scaler see the overflow: it skips the step and lowers its scale.
            target = next(
                (p for g in self.param_groups if not _is_internal(g) for p in g["params"]), None
            )
            if target is not None:
                if target.grad is None:
                    target.grad = torch.full_like(target, float("inf"))
                else:
                    target.grad.fill_(float("inf"))
        elif self.nonfinite == "raise":
            raise error
        else:
            self._skip_pending = True
        self.skipped_steps += 1
        return False

    def _observe_after_step(self, closure: Callable[[], Any]) -> None:
        """Show the losses re-evaluated after the step to weightings that learn from them."""
        wanting = [w for w in self.weightings() if w is not None and w.wants_losses_after_step]
        if not wanting:
            return
        with torch.no_grad():
            values = loss_values(closure())
        if values is None:
            warnings.warn(
                "mtlopt: the losses re-evaluated after the step are not finite; the weightings' "
                "post-step update was skipped",
                RuntimeWarning,
                stacklevel=3,
            )
            return
        for weighting in wanting:
            weighting.observe(values, after_step=True)

    def _commit(
        self,
        plans: list[GroupPlan],
        results: dict[int, GroupResult],
        task_losses: TaskLosses,
        scale: Tensor | None,
        rescale_updates: bool,
    ) -> None:
        """Write the updates into ``.grad`` (the loss-only path's results carry none: its
        backward wrote them), then let the weightings see the step."""
        for result in results.values():
            for param, update in result.updates:
                if update.shape != param.shape:
                    update = update.reshape(param.shape)
                if rescale_updates:
                    update = update * scale.to(update.dtype)
                if param.grad is None:
                    param.grad = update
                else:
                    param.grad.add_(update)
        for result in results.values():
            # last_step is for logging: holding the updates would keep this step's gradients
            # alive after zero_grad(), next to the next step's (n more floats at its peak).
            result.updates = []
        weightings = [plan.weighting for plan in plans]
        self._after_commit(
            weightings, results, task_losses.values, task_losses.output.device, scale
        )

    def _after_commit(
        self,
        weightings: list[Weighting],
        results: dict[int, GroupResult],
        values: Tensor,
        device: torch.device,
        scale: Tensor | None,
    ) -> None:
        """With ``.grad`` written: the weightings' own gradients and their view of the step's
        loss ``values``, then ``last_step`` and the stats hooks."""
        n_tasks = values.shape[0]
        for weighting in weightings:
            if weighting.ensure_parameters(n_tasks):
                self._register_learnable(weighting)
            if weighting.learnable_parameters():
                self._place_learnable(weighting, device)
                self._accumulate_learnable(weighting, values, scale)
            weighting.observe(values, after_step=False)
        self.last_step = results
        if self._step_stats_hooks:
            for hook in list(self._step_stats_hooks.values()):
                hook(self, results)

    def register_step_stats_hook(
        self, hook: Callable[[MultiTaskOptimizer, dict[int, GroupResult]], None]
    ) -> torch.utils.hooks.RemovableHandle:
        """Call ``hook(opt, last_step)`` after every committed multi-task backward.

        ``last_step`` maps each group's index to its :class:`~mtlopt.aggregation.GroupResult`
        (``weights``, ``gramian``, ``grad_norms``, ``cosines``): log them without recomputing
        anything. Returns a handle whose ``remove()`` unregisters the hook.
        """
        handle = torch.utils.hooks.RemovableHandle(self._step_stats_hooks)
        self._step_stats_hooks[handle.id] = hook
        return handle

    @staticmethod
    def _accumulate_learnable(weighting: Weighting, values: Tensor, scale: Tensor | None) -> None:
        """The weighting's own gradients, scaled like every other ``.grad`` under a scaler."""
        if scale is None:
            weighting.accumulate_parameter_grads(values)
            return
        # Under a scaler only what this step adds is scaled: keep what was there apart.
        tensors = weighting.learnable_parameters()
        before = [None if t.grad is None else t.grad.clone() for t in tensors]
        weighting.accumulate_parameter_grads(values)
        for tensor, old in zip(tensors, before):
            if tensor.grad is not None:
                added = tensor.grad if old is None else tensor.grad - old
                tensor.grad = added * scale.to(added.dtype) + (0 if old is None else old)

    def _place_learnable(self, weighting: Weighting, device: torch.device) -> None:
        """Move a weighting's learnable tensors to the losses' device before they have
        optimizer state (they are created on the CPU before the device is known)."""
        for tensor in weighting.learnable_parameters():
            if tensor.device != device and not self.state.get(tensor):
                tensor.data = tensor.data.to(device)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict plus every group's weighting state ("mtlopt").

        Holds only tensors and Python scalars: loads with ``torch.load(weights_only=True)``.
        """
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        state = self.optimizer.state_dict()
        state["param_groups"] = [
            {k: v for k, v in group.items() if k != "weighting"} for group in state["param_groups"]
        ]
        state["mtlopt"] = checkpoint.build(self.weightings())
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, state)
            if result is not None:
                state = result
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output; a checkpoint that does not fit raises
        ValueError naming what differs, and leaves this optimizer unchanged."""
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        state_dict = dict(state_dict)
        weightings = [w for w in self.weightings() if w is not None]
        saved = checkpoint.check(state_dict.pop("mtlopt", None), self.weightings())
        checkpoint.check_group_sizes(state_dict, self.param_groups)
        backup = [copy.deepcopy(w.state_dict()) for w in weightings]
        groups = list(self.param_groups)
        try:
            for weighting, item in zip(weightings, saved):
                weighting.load_state_dict(item["state"])
                self._register_learnable(weighting)
            self.optimizer.load_state_dict(state_dict)
        except Exception:
            for weighting, old in zip(weightings, backup):
                weighting.load_state_dict(old)
            self.optimizer.param_groups = groups
            raise
        # The base optimizer rebuilt its group dicts from the checkpoint: re-attach weightings.
        internal = iter(weightings)
        for group in self.param_groups:
            if not _is_internal(group):
                group["weighting"] = next(internal)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)


def _autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast turned off for ``device_type``; nothing to enter when it is off already
    (entering ``torch.autocast`` costs tens of microseconds a step)."""
    if _autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _any_autocast() -> bool:
    """Whether autocast is on for any device (one call, no device to look up)."""
    probe = getattr(torch._C, "_is_any_autocast_enabled", None)
    if probe is None:  # older torch: the devices this library runs on
        return any(_autocast_enabled(kind) for kind in ("cpu", "cuda"))
    return probe()


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4: one flag per device kind
        return torch.is_autocast_enabled() or torch.is_autocast_cpu_enabled()


def _is_plain_sgd(optimizer: Optimizer, group: dict[str, Any]) -> bool:
    return (
        type(optimizer) is torch.optim.SGD
        and not group.get("momentum", 0)
        and not group.get("dampening", 0)
        and not group.get("nesterov", False)
    )


def _is_internal(group: dict[str, Any]) -> bool:
    return group.get(ROLE_KEY) == LOSS_SCALES
