"""The two-task toy problem of the CAGrad, Nash-MTL and FAMO papers (see shared methods.md)."""

from __future__ import annotations

import torch

EPS = 5e-6


def toy_losses(x: torch.Tensor, scale_first: float = 0.1) -> list[torch.Tensor]:
    """``[L1, L2]`` at ``x = (x1, x2)``; Nash-MTL and FAMO multiply ``L1`` by 0.1."""
    x1, x2 = x[0], x[1]
    f1 = torch.log(torch.clamp((0.5 * (-x1 - 7) - torch.tanh(-x2)).abs(), min=EPS)) + 6
    f2 = torch.log(torch.clamp((0.5 * (-x1 + 3) + torch.tanh(-x2) + 2).abs(), min=EPS)) + 6
    c1 = torch.clamp(torch.tanh(x2 / 2), min=0)
    c2 = torch.clamp(torch.tanh(-x2 / 2), min=0)
    f1_sq = ((-x1 + 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
    f2_sq = ((-x1 - 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
    return [scale_first * (c1 * f1 + c2 * f1_sq), c1 * f2 + c2 * f2_sq]
