"""The wrapper torch.optim puts around ``step``, with its profiler range opened on demand.

``torch.optim.Optimizer`` wraps every subclass's ``step`` to run the step hooks and to open a
``record_function`` range for the profiler. Opening that range costs tens of microseconds
even when no profiler listens (two dispatched ops), and the base optimizer's own ``step``
opens one too. This wrapper runs the same hooks in the same order, with the same argument
replacement, errors and entry point for Python tracing, and opens the same range only while
a profiler is enabled on this thread (``torch.autograd._profiler_enabled()``, the test torch
itself uses in RPC and data pipes). Observers that attach without enabling the profiler
(on-demand Kineto tracing, a standalone execution-trace observer) do not see the wrapper's
range; they still see the base optimizer's, which torch's own wrapper opens.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from itertools import chain
from typing import Any

import torch
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
