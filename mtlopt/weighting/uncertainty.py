"""Uncertainty weighting (UW): learnable homoscedastic-uncertainty loss weights."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .base import Weighting, check_positive


class UW(Weighting):
    r"""Uncertainty weighting: each task's loss is scaled by a learned precision.

    Kendall, Gal and Cipolla, "Multi-Task Learning Using Uncertainty to Weigh Losses for Scene
    Geometry and Semantics", CVPR 2018 (Eqs. 7 and 10).

    Each task has a log-variance ``s_i = log sigma_i^2`` (zeros at start). The objective is::

        sum_i exp(-s_i) L_i + s_i

    so the model's loss weights are ``c_i = exp(-s_i)`` and each ``s_i`` receives the gradient
    ``1 - exp(-s_i) L_i`` (written in closed form, no extra backward). The optimum is
    ``exp(s_i) = L_i``, i.e. ``c_i = 1 / L_i``.

    Factors: the paper's regression form (Eq. 7) is ``L_i / (2 sigma_i^2) + log sigma_i =
    (1/2)(exp(-s_i) L_i + s_i)``; its classification form (Eq. 10) is ``L_i / sigma_i^2 +
    log sigma_i = exp(-s_i) L_i + s_i / 2``. mtlopt uses one form for every task, twice the
    regression form (the form of most re-implementations; equal weights of 1 at the start,
    like :class:`~mtlopt.weighting.Sum`). LibMTL uses the regression form with ``s``
    starting at -0.5 (weights 0.82 at the start); Nash-MTL's and FAMO's code the regression
    form with ``s = 0`` (weights 0.5). All have the same optimum ``exp(s_i) = L_i``; they
    differ by a constant factor on the model's step (and on the scales' step). UW is
    :class:`~mtlopt.weighting.IMTLL` with ``s = -s_IMTL``.

    The log-variances are trained by the base optimizer as an extra param group that inherits
    its defaults (``lr`` overrides the learning rate), so LR schedulers and checkpoints cover
    them. The group exists from construction (empty until the number of tasks is known).
    Task heads get ``exp(-s_t) grad L_t``.

    Args:
        lr: learning rate of the log-variances' param group (default: the base optimizer's).
        n_tasks: create the log-variances at construction (otherwise on the first step).
    """

    needs = "losses"
    stateful = True

    def __init__(self, lr: float | None = None, n_tasks: int | None = None) -> None:
        super().__init__()
        self.lr = None if lr is None else check_positive("lr", lr)
        if n_tasks is not None and (
            isinstance(n_tasks, bool) or not isinstance(n_tasks, int) or n_tasks < 1
        ):
            raise ValueError(f"n_tasks: expected a positive int or None, got {n_tasks!r}")
        self.log_variances = torch.nn.Parameter(torch.zeros(0))
        if n_tasks is not None:
            self.ensure_parameters(n_tasks)

    def hyperparameters(self) -> dict[str, Any]:
        return {"lr": self.lr}

    def precisions(self, losses: Tensor) -> Tensor:
        """``exp(-s)`` in float64 (ones before the log-variances exist)."""
        if self.log_variances.numel() == 0:
            return torch.ones_like(losses)
        s = self.log_variances.detach().to(device=losses.device, dtype=torch.float64)
        return (-s).exp()

    def loss_weights(self, losses: Tensor) -> Tensor:
        self.check_n_tasks(losses.numel())
        return self.precisions(losses)

    def learnable_parameters(self) -> list[Tensor]:
        return [self.log_variances]

    def ensure_parameters(self, n_tasks: int) -> list[Tensor]:
        if self.log_variances.numel() == 0:
            self.n_tasks = n_tasks
            self.log_variances.data = torch.zeros(n_tasks).to(self.log_variances)
        return []

    def parameter_group_options(self) -> dict[str, Any]:
        return {} if self.lr is None else {"lr": self.lr}

    def accumulate_parameter_grads(self, losses: Tensor) -> None:
        s = self.log_variances
        grad = (1.0 - self.precisions(losses) * losses).to(device=s.device, dtype=s.dtype)
        s.grad = grad if s.grad is None else s.grad.add_(grad)

    def state_dict(self) -> dict[str, Any]:
        return {"n_tasks": self.n_tasks, "log_variances": self.log_variances.detach().clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.check_state_dict(state)
        saved = state["log_variances"]
        if not isinstance(saved, Tensor) or saved.dim() != 1:
            raise ValueError(f"state_dict: log_variances should be a 1-D tensor, got {saved!r}")
        if self.log_variances.numel() not in (0, saved.numel()):
            raise ValueError(
                f"state_dict: log_variances has {saved.numel()} entries, this {self!r} has "
                f"{self.log_variances.numel()} (another number of tasks)"
            )
        super().load_state_dict(state)
        with torch.no_grad():
            self.log_variances.data = saved.detach().to(self.log_variances).clone()
