"""torch.optim's wrappers around ``step`` and ``zero_grad``, with profiler ranges on demand.

``torch.optim.Optimizer`` wraps every subclass's ``step`` to run the step hooks and to open a
``record_function`` range for the profiler, and ``zero_grad`` opens one too. Opening a range
costs tens of microseconds inside a training step even when no profiler listens (two
dispatched ops, with the caches cold after the backward pass). Here:

* :func:`hooked_step` wraps the multi-task optimizer's own ``step``;
* :func:`step_base` steps the base optimizer through the step function torch wrapped;
* :func:`zero_grad_base` sets the base optimizer's gradients to None.

They run the same hooks in the same order, with the same argument replacement, errors and
entry point for Python tracing, and open the same ranges only while a profiler is enabled on
this thread (``torch.autograd._profiler_enabled()``, the test torch itself uses in RPC and data
pipes). Anything else (a step or ``zero_grad`` of the base optimizer's own, one set on the
instance, a step wrapped by something other than torch) is called as it is. Observers that
attach without enabling the profiler (on-demand Kineto tracing, a standalone
execution-trace observer) see the steps' operations but not these named ranges.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from itertools import chain
from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks


def hooked_step(func: Callable[..., Any]) -> Callable[..., Any]:
    """``func`` (an optimizer class's ``step``) with step hooks and an on-demand profiler range."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        self = args[0]
        if not torch.autograd._profiler_enabled():
            return _run_with_hooks(func, self, args, kwargs)
        name = f"Optimizer.step#{type(self).__name__}.step"
        with torch.autograd.profiler.record_function(name):
            return _run_with_hooks(func, self, args, kwargs)

    return wrapper


def _run_with_hooks(func: Callable[..., Any], self: Any, args: tuple, kwargs: dict) -> Any:
    for pre_hook in chain(
        _global_optimizer_pre_hooks.values(), self._optimizer_step_pre_hooks.values()
    ):
        result = pre_hook(self, args, kwargs)
        if result is not None:
            if not (isinstance(result, tuple) and len(result) == 2):
                raise RuntimeError(
                    f"{func} must return None or a tuple of (new_args, new_kwargs), but got "
                    f"{result}."
                )
            args, kwargs = result
    out = func(*args, **kwargs)
    self._optimizer_step_code()
    for post_hook in chain(
        self._optimizer_step_post_hooks.values(), _global_optimizer_post_hooks.values()
    ):
        post_hook(self, args, kwargs)
    return out


# The code object of torch's step wrapper: a class's ``step`` runs it exactly when torch
# wrapped that class's step function (``__wrapped__``) and nothing wrapped it since.
_TORCH_STEP_WRAPPER = Optimizer.profile_hook_step(lambda *args, **kwargs: None).__code__


def step_base(optimizer: Optimizer) -> Any:
    """``optimizer.step()``, with torch's profiler range opened only while a profiler runs."""
    step = type(optimizer).step
    raw = getattr(step, "__wrapped__", None)
    if (
        raw is None
        or getattr(step, "__code__", None) is not _TORCH_STEP_WRAPPER
        or "step" in vars(optimizer)
        or torch.autograd._profiler_enabled()
    ):
        return optimizer.step()
    return _run_with_hooks(raw, optimizer, (optimizer,), {})


def zero_grad_base(optimizer: Optimizer, set_to_none: bool) -> None:
    """``optimizer.zero_grad(set_to_none)``; torch's own with ``set_to_none`` and no profiler
    running comes down to setting every ``.grad`` to None, done here without its range."""
    if (
        not set_to_none
        or type(optimizer).zero_grad is not Optimizer.zero_grad
        or "zero_grad" in vars(optimizer)
        or torch.autograd._profiler_enabled()
    ):
        optimizer.zero_grad(set_to_none=set_to_none)
        return
    for group in optimizer.param_groups:
        for param in group["params"]:
            if param.grad is not None:
                param.grad = None
