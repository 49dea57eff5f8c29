"""The shared machinery of weightings that learn one value per task (IMTL-L, UW, GradNorm).

The values form a tensor trained by the base optimizer as an extra param group, so LR
schedulers, gradient clipping and checkpoints cover them. The tensor exists from
construction, empty until the first step tells the number of tasks (or sized at once with
``n_tasks``), so the param group is in place before any scheduler is built.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from ..losses import host_values
from ..solvers.host_linalg import reads_back
from .base import Weighting, check_positive, check_positive_int


class LearnedPerTask(Weighting, register=False):
    """Base class: one learnable value per task, named :attr:`parameter_name`.

    Args:
        lr: learning rate of the values' param group (default: the base optimizer's).
        n_tasks: size the values at construction (otherwise on the first step).
    """

    stateful = True
    #: The state-dict key (and attribute) of the learned values.
    parameter_name: ClassVar[str] = "values"
    #: Each value at the start.
    initial_value: ClassVar[float] = 0.0

    def __init__(self, lr: float | None = None, n_tasks: int | None = None) -> None:
        super().__init__()
        self.lr = None if lr is None else check_positive("lr", lr)
        self.parameter = torch.nn.Parameter(torch.zeros(0))
        self._once: tuple[Tensor, tuple[int, int, int], tuple[Tensor, Tensor | None]] | None = None
        if n_tasks is not None:
            self.ensure_parameters(check_positive_int("n_tasks", n_tasks))

    def hyperparameters(self) -> dict[str, Any]:
        return {"lr": self.lr}

    def learned(self, losses: Tensor) -> Tensor | None:
        """The values in float64 on the losses' device, or None before they exist."""
        if self.parameter.numel() == 0:
            return None
        return self.parameter.detach().to(device=losses.device, dtype=torch.float64)

    def step_terms(self, losses: Tensor) -> tuple[Tensor, Tensor | None]:
        """This step's loss weights (float64) and the values' gradient (in the values' dtype
        and device; None before the values exist), from :meth:`terms`.

        Both are computed before the backward pass and reused while ``losses`` and the
        values are the same objects at the same version: after the backward, each small op
        runs with cold caches (several microseconds, a few percent of a loss-only step
        together), so the gradient is made up front and only written at commit.
        """
        values = self.parameter
        key = (values._version, values.data_ptr(), values.numel())
        cached = self._once
        if cached is not None and cached[0] is losses and cached[1] == key:
            return cached[2]
        result: tuple[Tensor, Tensor | None] | None = None
        if values.numel() == 0:
            result = (torch.ones_like(losses), None)
        elif reads_back(losses) and values.device.type == "cpu":
            result = self._host_step_terms(losses)
        if result is None:
            weights, grad = self.terms(self.learned(losses), losses)  # type: ignore[arg-type]
            result = (weights, grad.to(device=values.device, dtype=values.dtype))
        self._once = (losses, key, result)
        return result

    def _host_step_terms(self, losses: Tensor) -> tuple[Tensor, Tensor] | None:
        """:meth:`step_terms` from :meth:`host_terms` on Python floats (the CPU: the loss
        values were read already); None where a subclass has no host form or it overflows."""
        try:
            found = self.host_terms(self.parameter.tolist(), host_values(losses))
        except OverflowError:  # math.exp past float64's range: the tensors give inf
            return None
        if found is None:
            return None
        weights, grad = found
        parameter = self.parameter
        return torch.tensor(weights, dtype=torch.float64), torch.tensor(grad, dtype=parameter.dtype)

    def terms(self, values: Tensor, losses: Tensor) -> tuple[Tensor, Tensor]:
        """The loss weights and the values' gradient (float64) for ``values`` (float64)."""
        raise NotImplementedError(f"{type(self).__name__} defines no terms")

    def host_terms(
        self, values: list[float], losses: list[float]
    ) -> tuple[list[float], list[float]] | None:
        """:meth:`terms` on Python floats, or None (the tensor form serves). On the CPU a
        loss-only step then spends two small tensor constructions on its scales instead of
        some seven operations, each costing several microseconds right after the forward
        pass."""
        return None

    def accumulate_parameter_grads(self, losses: Tensor) -> None:
        _, grad = self.step_terms(losses)
        self._once = None  # the gradient becomes .grad, which may then change in place
        if grad is not None:
            self.add_parameter_grad(grad)

    def learnable_parameters(self) -> list[Tensor]:
        return [self.parameter]

    def ensure_parameters(self, n_tasks: int) -> list[Tensor]:
        if self.parameter.numel() == 0:
            self.n_tasks = n_tasks
            self.parameter.data = torch.full((n_tasks,), self.initial_value).to(self.parameter)
        return []

    def parameter_group_options(self) -> dict[str, Any]:
        return {} if self.lr is None else {"lr": self.lr}

    def add_parameter_grad(self, grad: Tensor) -> None:
        """Accumulate ``grad`` (any float dtype) into the values' ``.grad``."""
        grad = grad.to(device=self.parameter.device, dtype=self.parameter.dtype)
        current = self.parameter.grad
        self.parameter.grad = grad if current is None else current.add_(grad)

    def state_dict(self) -> dict[str, Any]:
        return {"n_tasks": self.n_tasks, self.parameter_name: self.parameter.detach().clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.check_state_dict(state)
        name = self.parameter_name
        saved = state[name]
        if not isinstance(saved, Tensor) or saved.dim() != 1:
            raise ValueError(f"state_dict: {name} should be a 1-D tensor, got {saved!r}")
        if self.parameter.numel() not in (0, saved.numel()):
            raise ValueError(
                f"state_dict: {name} has {saved.numel()} entries, this {self!r} has "
                f"{self.parameter.numel()} (another number of tasks)"
            )
        super().load_state_dict(state)
        with torch.no_grad():
            self.parameter.data = saved.detach().to(self.parameter).clone()
