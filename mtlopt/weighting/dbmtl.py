"""DB-MTL: dual balancing of loss scales (log transform) and gradient magnitudes."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .base import (
    Weighting,
    check_non_negative,
    check_state_layout,
    check_unit_interval,
    copy_tensor_state,
)
from .loss_balancing import check_losses_above

_LOG_EPS = 1e-8  # inside log(L + eps), as in LibMTL
_NORM_EPS = 1e-8  # in the denominator of the rescaling factors, as in LibMTL


class DBMTL(Weighting):
    r"""Dual-balancing multi-task learning: log-transformed losses, max-norm gradient balance.

    Lin, Jiang, Ye, Zhang, Chen, Chen, Liu, Tsang and Kwok, "Dual-Balancing for Multi-Task
    Learning", arXiv 2308.12029 (2023; Neural Networks 2025), Algorithm 1; LibMTL's
    ``DB_MTL`` (the authors' code).

    Loss-scale balancing: each task trains on ``log(L_i + 1e-8)``, whose gradient is
    ``g_i / (L_i + 1e-8)``; mtlopt returns ``1 / (L_i + 1e-8)`` as loss weights, so the
    per-task gradients reach :meth:`update_from_jacobian` already log-scaled and every task
    head gets its own log-loss gradient ``g_t / (L_t + 1e-8)``, as in LibMTL (where the heads
    accumulate the per-task log-loss backward passes).

    Gradient-magnitude balancing, on the group's shared parameters, at step ``k``::

        beta_k = beta / k^beta_sigma
        ghat_i <- beta_k ghat_i + (1 - beta_k) g_i / (L_i + 1e-8)     (ghat_i = 0 at start)
        alpha_i = max_j ||ghat_j|| / (||ghat_i|| + 1e-8)
        d = sum_i alpha_i ghat_i

    so every task contributes an update as long as the largest one. The buffers ``ghat`` start
    at zero without bias correction, as in LibMTL (the first update is ``(1 - beta)`` times
    the balanced gradient). The returned task weights are ``alpha`` (they multiply the EMA
    buffers, not the current gradients).

    Args:
        beta: EMA factor (``[0, 1]``; 0.9 as in LibMTL).
        beta_sigma: decay exponent of the EMA factor (``>= 0``; default 0.5, so that
            ``beta_k`` shrinks and the buffers follow the current gradients more and more
            closely). LibMTL's command-line default is 0 (a constant ``beta``).

    Memory: one buffer as large as the group's shared parameters times ``m`` (the Jacobian),
    kept per tensor (in float32 at least) and updated in place. Losses must be non-negative.
    """

    needs = "jacobian"
    stateful = True

    def __init__(self, beta: float = 0.9, beta_sigma: float = 0.5) -> None:
        super().__init__()
        self.beta = check_unit_interval("beta", beta)
        self.beta_sigma = check_non_negative("beta_sigma", beta_sigma)
        self.buffers: list[Tensor] | None = None
        self.steps = 0

    def hyperparameters(self) -> dict[str, Any]:
        return {"beta": self.beta, "beta_sigma": self.beta_sigma}

    def loss_weights(self, losses: Tensor) -> Tensor:
        self.check_n_tasks(losses.numel())
        check_losses_above(losses, 0.0, "DBMTL", False, "non-negative losses")
        return 1.0 / (losses + _LOG_EPS)

    def check_layout(self, jacobian: list[Tensor], masks: list[int] | None = None) -> None:
        check_state_layout("DBMTL keeps gradient buffers", self.buffers, jacobian)

    def _buffers_for(self, jacobian: list[Tensor]) -> list[Tensor]:
        if self.buffers is None:
            self.n_tasks = jacobian[0].shape[0]
            # Half-precision running averages would stall: keep them in float32 at least.
            self.buffers = [
                torch.zeros_like(block, dtype=torch.promote_types(block.dtype, torch.float32))
                for block in jacobian
            ]
        self.check_layout(jacobian)
        if self.buffers[0].device != jacobian[0].device:
            self.buffers = [b.to(jacobian[0].device) for b in self.buffers]
        return self.buffers

    def update_from_jacobian(
        self, jacobian: list[Tensor], losses: Tensor, masks: list[int]
    ) -> tuple[list[Tensor], Tensor | None]:
        if not jacobian:
            raise ValueError("DBMTL needs at least one shared parameter in its group")
        buffers = self._buffers_for(jacobian)
        self.steps += 1
        beta_k = self.beta / self.steps**self.beta_sigma
        m = jacobian[0].shape[0]
        squared_norms = torch.zeros(m, dtype=torch.float64, device=jacobian[0].device)
        for block, buffer in zip(jacobian, buffers):
            buffer.lerp_(block.to(buffer.dtype), 1.0 - beta_k)
            flat = buffer.reshape(m, -1)
            squared_norms += (flat * flat).sum(1, dtype=torch.float64)
        norms = squared_norms.sqrt()
        alpha = norms.amax() / (norms + _NORM_EPS)
        updates = [
            torch.tensordot(alpha.to(buffer.dtype), buffer, dims=1).to(block.dtype)
            for block, buffer in zip(jacobian, buffers)
        ]
        return updates, alpha

    def state_dict(self) -> dict[str, Any]:
        return {
            "n_tasks": self.n_tasks,
            "steps": self.steps,
            "buffers": None if self.buffers is None else [b.clone() for b in self.buffers],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        buffers = state["buffers"]
        self.steps = int(state["steps"])
        self.buffers = (
            None
            if buffers is None
            else [copy_tensor_state(None, b, f"buffers[{k}]") for k, b in enumerate(buffers)]
        )
