"""Small m x m linear-algebra problems, solved in torch on the Gramian's device (float64)."""

from __future__ import annotations

import torch
from torch import Tensor


def pinv_solve(matrix: Tensor, rhs: Tensor, rtol: float) -> Tensor:
    """``pinv(matrix) @ rhs`` for a symmetric positive semi-definite ``matrix``.

    Eigenvalues below ``rtol * largest`` are treated as zero, so a rank-deficient Gramian
    (duplicate, collinear or zero gradients) gets the least-norm solution instead of noise.
    """
    eigenvalues, eigenvectors = torch.linalg.eigh(matrix)
    cutoff = rtol * eigenvalues.abs().max()
    keep = eigenvalues > cutoff
    inverse = torch.where(keep, 1.0 / torch.where(keep, eigenvalues, 1.0), 0.0)
    return eigenvectors @ (inverse * (eigenvectors.T @ rhs))


def gramian_rtol(source_dtype: torch.dtype, n_tasks: int) -> float:
    """Relative cut-off for eigenvalues of a Gramian computed in ``source_dtype``."""
    return max(n_tasks, 1) * torch.finfo(source_dtype).eps * 10
