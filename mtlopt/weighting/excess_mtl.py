"""ExcessMTL: robust task weighting by excess risk."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .base import Weighting, check_positive, check_state_layout, copy_tensor_state

_SQRT_EPS = 1e-7  # inside the square root of the AdaGrad denominator (Eq. 7)
_BASELINE_EPS = 1e-7  # added to the baseline before dividing


class ExcessMTL(Weighting):
    r"""Weights tasks by their estimated excess risk, with an exponentiated-gradient update.

    He, Zhou, Zhao and Bi, "Robust Multi-Task Learning with Excess Risks", ICML 2024
    (Eqs. 6, 7 and 9; Algorithm 1).

    Per group, ``S`` accumulates the squared per-task gradients of the group's shared
    parameters (the diagonal AdaGrad preconditioner of Eq. 7). Each step::

        S += J * J
        e_i = sum_k J_ik^2 / sqrt(S_ik + 1e-7)          (excess-risk proxy, Eq. 6)
        e  <- e / (r0 + 1e-7)                           (relative to the baseline r0)
        w  <- w * exp(eta e) / sum(...)                 (exponentiated gradient, Eq. 9)

    and the update of the shared parameters is ``d = w^T J``.

    Conventions:
        * ``w`` starts at ``1/m`` and stays on the simplex, as in the paper (the official code
          and LibMTL start at 1 and renormalise to sum ``m``, i.e. ``m`` times larger steps).
          The update runs in log space (``softmax(log w + eta e)``) so it cannot overflow.
        * Warm-up: for the first ``n_warmup_steps`` calls the weights stay uniform while
          ``S`` and ``e`` accumulate; the next call sets ``r0`` to the mean warm-up ``e`` and
          updates. The paper (App. C.1) recommends about 3 epochs of warm-up.
        * With ``n_warmup_steps = 0`` the first call's ``e`` becomes ``r0`` and that call keeps
          the uniform weights, as in the official code and LibMTL.

    Args:
        robust_step_size: ``eta``, the step of the exponentiated-gradient update (> 0).
        n_warmup_steps: calls before the weights start to move (>= 0).

    Memory: ``S`` is as large as the group's shared parameters times ``m`` (it is the size of
    the Jacobian), kept per tensor and updated in place.
    """

    needs = "jacobian"
    stateful = True

    def __init__(self, robust_step_size: float = 1.0, n_warmup_steps: int = 0) -> None:
        super().__init__()
        self.robust_step_size = check_positive("robust_step_size", robust_step_size)
        if isinstance(n_warmup_steps, bool) or not isinstance(n_warmup_steps, int):
            raise TypeError(
                f"n_warmup_steps: expected a non-negative int, got {type(n_warmup_steps).__name__}"
            )
        if n_warmup_steps < 0:
            raise ValueError(f"n_warmup_steps: expected a non-negative int, got {n_warmup_steps}")
        self.n_warmup_steps = n_warmup_steps
        self.squared_grad_sums: list[Tensor] | None = None
        self.log_weights: Tensor | None = None
        self.baseline: Tensor | None = None
        self.warmup_sum: Tensor | None = None
        self.calls = 0

    def hyperparameters(self) -> dict[str, Any]:
        return {"robust_step_size": self.robust_step_size, "n_warmup_steps": self.n_warmup_steps}

    @property
    def weights(self) -> Tensor | None:
        """The current task weights (on the simplex), or None before the first call."""
        return None if self.log_weights is None else self.log_weights.exp()

    def _initialise(self, jacobian: list[Tensor]) -> None:
        m = jacobian[0].shape[0] if jacobian else 0
        device = jacobian[0].device
        self.n_tasks = m
        # Half-precision sums of squares would overflow or stall: keep them in float32 at least.
        self.squared_grad_sums = [
            torch.zeros_like(block, dtype=torch.promote_types(block.dtype, torch.float32))
            for block in jacobian
        ]
        self.log_weights = torch.full((m,), -math.log(m), dtype=torch.float64, device=device)
        self.warmup_sum = torch.zeros(m, dtype=torch.float64, device=device)

    def check_layout(self, jacobian: list[Tensor]) -> None:
        holder = "ExcessMTL keeps squared-gradient sums"
        check_state_layout(holder, self.squared_grad_sums, jacobian)

    def _sums_on_device(self, jacobian: list[Tensor]) -> list[Tensor]:
        self.check_layout(jacobian)
        sums = self.squared_grad_sums
        assert sums is not None
        device = jacobian[0].device
        if sums and sums[0].device != device:
            sums = self.squared_grad_sums = [s.to(device) for s in sums]
        return sums

    def excess_risks(self, jacobian: list[Tensor]) -> Tensor:
        """Accumulate ``S`` in place and return ``e`` (Eq. 6) as float64."""
        sums = self._sums_on_device(jacobian)
        m = jacobian[0].shape[0]
        risks = torch.zeros(m, dtype=torch.float64, device=jacobian[0].device)
        for block, acc in zip(jacobian, sums):
            block = block.to(acc.dtype)
            acc.addcmul_(block, block)
            scaled = acc.add(_SQRT_EPS).rsqrt_().mul_(block).mul_(block)
            risks += scaled.reshape(m, -1).sum(1, dtype=torch.float64)
        return risks

    def weights_from_jacobian(self, jacobian: list[Tensor], losses: Tensor) -> Tensor:
        if not jacobian:
            raise ValueError("ExcessMTL needs at least one shared parameter in its group")
        if self.squared_grad_sums is None:
            self._initialise(jacobian)
        assert self.log_weights is not None and self.warmup_sum is not None
        if self.log_weights.device != jacobian[0].device:
            self.log_weights = self.log_weights.to(jacobian[0].device)
            self.warmup_sum = self.warmup_sum.to(jacobian[0].device)
            self.baseline = None if self.baseline is None else self.baseline.to(jacobian[0].device)
        risks = self.excess_risks(jacobian)
        self.calls += 1
        if self.calls <= self.n_warmup_steps:
            self.warmup_sum += risks
            return self.log_weights.exp()
        if self.baseline is None:
            if self.n_warmup_steps == 0:
                self.baseline = risks
                return self.log_weights.exp()
            self.baseline = self.warmup_sum / self.n_warmup_steps
        relative = risks / (self.baseline + _BASELINE_EPS)
        self.log_weights = torch.log_softmax(self.log_weights + self.robust_step_size * relative, 0)
        return self.log_weights.exp()

    def state_dict(self) -> dict[str, Any]:
        def clone(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.clone()

        return {
            "n_tasks": self.n_tasks,
            "calls": self.calls,
            "log_weights": clone(self.log_weights),
            "baseline": clone(self.baseline),
            "warmup_sum": clone(self.warmup_sum),
            "squared_grad_sums": None
            if self.squared_grad_sums is None
            else [s.clone() for s in self.squared_grad_sums],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)

        def load(name: str) -> Tensor | None:
            value = state[name]
            return None if value is None else copy_tensor_state(None, value, name)

        sums = state["squared_grad_sums"]
        self.calls = int(state["calls"])
        self.log_weights = load("log_weights")
        self.baseline = load("baseline")
        self.warmup_sum = load("warmup_sum")
        self.squared_grad_sums = (
            None
            if sums is None
            else [copy_tensor_state(None, s, f"squared_grad_sums[{k}]") for k, s in enumerate(sums)]
        )
