"""Checking what the user passed as losses, before anything is touched."""

from __future__ import annotations

import functools
import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


class NonFiniteError(FloatingPointError):
    """A loss or a per-task gradient holds nan or inf (nothing was changed)."""


@dataclass
class TaskLosses:
    """The m losses in the forms the step needs."""

    output: Tensor  #: 1-D tensor of the m losses, in the graph (what autograd differentiates)
    values: Tensor  #: detached float64 copy of the loss values

    @property
    def n_tasks(self) -> int:
        return self.output.shape[0]

    @functools.cached_property
    def roots(self) -> list[object | None]:
        """Each task's own graph node, where reachability starts (read only by the paths
        that need per-task gradients)."""
        node = self.output.grad_fn
        n_tasks = self.n_tasks
        children = [] if node is None else [child for child, _ in node.next_functions]
        if type(node).__name__ == "StackBackward0" and len(children) == n_tasks:
            # torch.stack of scalars: entry i depends on input i only (a leaf input's edge
            # is its AccumulateGrad node, so a parameter used directly as a loss is found too).
            return children
        return [node] * n_tasks  # cannot tell the tasks apart: no task heads


def prepare_losses(losses: object, check_finite: bool = True) -> TaskLosses:
    """Validate ``losses`` and stack them; raise TypeError/ValueError/FloatingPointError."""
    if isinstance(losses, Tensor):
        return _from_tensor(losses, check_finite)
    if losses is None or isinstance(losses, (str, bytes)) or not isinstance(losses, Sequence):
        raise TypeError(
            "losses: expected a non-empty sequence of one-element tensors or a 1-D tensor, "
            f"got {type(losses).__name__}"
        )
    if len(losses) == 0:
        raise ValueError("losses: expected at least one task loss, got an empty sequence")
    # One pass, and the messages only built for a loss that fails (every step runs this).
    first = losses[0]
    device = first.device if isinstance(first, Tensor) else None
    dtype = first.dtype if isinstance(first, Tensor) else None
    mixed = False
    scalars = []
    with torch.enable_grad():  # (the reshapes below belong to the graph)
        for index, loss in enumerate(losses):
            if not (
                isinstance(loss, Tensor)
                and loss.numel() == 1
                and loss.is_floating_point()
                and loss.requires_grad
            ):
                _check_one(f"losses[{index}]", loss)
            mixed = mixed or loss.dtype is not dtype or loss.device != device
            # 0-d losses (the usual reduction's) go in as they are: a reshape would add a
            # view node per task to the backward pass.
            scalars.append(loss if loss.dim() == 0 else loss.reshape(()))
        if mixed:
            _refuse_mixed(losses)
        output = torch.stack(scalars)
    return _from_tensor(output, check_finite, checked=True)


def _refuse_mixed(losses: Sequence[Tensor]) -> None:
    devices = {loss.device for loss in losses}
    if len(devices) > 1:
        raise ValueError(
            f"losses: expected all losses on one device, got {sorted(map(str, devices))}"
        )
    dtypes = {loss.dtype for loss in losses}
    if len(dtypes) > 1:
        raise TypeError(
            f"losses: expected all losses of one dtype, got {sorted(map(str, dtypes))}; "
            "cast them (e.g. loss.float()) so that no task's gradient is silently promoted"
        )


def _from_tensor(losses: Tensor, check_finite: bool, checked: bool = False) -> TaskLosses:
    """``checked``: ``losses`` stacks losses that were validated one by one."""
    if not checked:
        if losses.dim() != 1 or losses.numel() == 0:
            raise ValueError(
                "losses: expected a 1-D tensor with one entry per task, got shape "
                f"{tuple(losses.shape)} (pass [loss] for a single task)"
            )
        _check_one("losses", losses, scalar=False)
    task_losses = TaskLosses(output=losses, values=losses.detach().double())
    if check_finite:
        check_finite_values(task_losses.values)
    return task_losses


def _check_one(name: str, loss: object, scalar: bool = True) -> None:
    if not isinstance(loss, Tensor):
        raise TypeError(f"{name}: expected a tensor, got {type(loss).__name__}")
    if scalar and loss.numel() != 1:
        raise ValueError(
            f"{name}: expected a one-element tensor (a scalar loss), got shape {tuple(loss.shape)}"
        )
    if not loss.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {loss.dtype}")
    if not loss.requires_grad:
        raise ValueError(
            f"{name}: has no autograd graph (requires_grad=False); compute the losses from the "
            "model's outputs with gradients enabled (not under torch.no_grad() or after .detach())"
        )


def check_finite_values(values: Tensor) -> None:
    """Raise NonFiniteError naming the tasks whose loss value is nan or inf."""
    # m numbers: one copy to the host and a Python test beat isfinite, all and bool (three
    # dispatched ops, the same single synchronisation).
    numbers = values.tolist()
    global _LAST_READ
    _LAST_READ = (weakref.ref(values), values._version, numbers)
    if not all(map(math.isfinite, numbers)):
        bad = [i for i, number in enumerate(numbers) if not math.isfinite(number)]
        raise NonFiniteError(
            f"losses: expected finite values, got {[numbers[i] for i in bad]} for task(s) "
            f"{bad}; nothing was changed"
        )


_LAST_READ: tuple[weakref.ref, int, list[float]] | None = None


def host_values(values: Tensor) -> list[float]:
    """``values.tolist()``, reusing the read that :func:`check_finite_values` made of this
    very tensor (unchanged since): a weighting that checks the step's losses on the host
    then costs a GPU no second wait."""
    last = _LAST_READ
    if last is not None and last[0]() is values and last[1] == values._version:
        return last[2]
    return values.tolist()


def loss_values(losses: object) -> Tensor | None:
    """Detached float64 values of losses computed without a graph (after the step), or None
    if any is not finite. Raises like :func:`prepare_losses` for the wrong kind of input."""
    if isinstance(losses, Tensor):
        if losses.dim() != 1 or losses.numel() == 0:
            raise ValueError(
                f"closure: expected a 1-D tensor of losses, got shape {tuple(losses.shape)}"
            )
        values = losses.detach().to(torch.float64)
    elif isinstance(losses, Sequence) and not isinstance(losses, (str, bytes)) and losses:
        for index, loss in enumerate(losses):
            if not isinstance(loss, Tensor) or loss.numel() != 1:
                raise ValueError(f"closure: losses[{index}] should be a one-element tensor")
        values = torch.stack([loss.detach().reshape(()).to(torch.float64) for loss in losses])
    else:
        raise TypeError(
            f"closure: expected it to return a sequence of losses, got {type(losses).__name__}"
        )
    return values if bool(torch.isfinite(values).all()) else None
