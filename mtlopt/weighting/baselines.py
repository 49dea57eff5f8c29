"""The two baselines: every task counts the same."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Weighting


class Mean(Weighting):
    """Equal weighting: the update is the gradient of ``(1/m) sum_i L_i``.

    Needs the losses only, so a step costs one ordinary backward pass. Task heads get
    ``(1/m) grad L_t``, exactly as ``(sum(losses) / m).backward()`` would give.
    """

    needs = "losses"

    def loss_weights(self, losses: Tensor) -> Tensor:
        return torch.full_like(losses, 1.0 / losses.numel())


class Sum(Weighting):
    """Plain sum: the update is the gradient of ``sum_i L_i`` (``sum(losses).backward()``)."""

    needs = "losses"

    def loss_weights(self, losses: Tensor) -> Tensor:
        return torch.ones_like(losses)
