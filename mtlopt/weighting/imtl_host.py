"""IMTL-G's weights on the host, for the CPU and few tasks.

:func:`mtlopt.weighting.imtl.imtl_g_weights` solves ``K x = 1`` with ``K`` the cosine
matrix of the task gradients, through a pseudo-inverse (an eigendecomposition, eigenvalues
below ``rtol`` of the largest dropped): about 40 small tensor operations, 0.37 ms inside a
training step where the backward pass has just evicted the caches torch's dispatch relies
on. When no eigenvalue is that small the pseudo-inverse is the inverse, and ``K x = 1`` is
one Cholesky solve on Python floats (:mod:`mtlopt.solvers.host_linalg`). That is certified
without the eigenvalues: ``lambda_max <= trace(K) = m`` (unit diagonal) and
``lambda_min >= 1 / trace(K^-1) = 1 / ||L^-1||_F^2``. Where the bound does not prove it (or
a gradient is zero, or Cholesky fails) this returns None and the caller takes the tensor
path.
"""

from __future__ import annotations

import math
from operator import mul

from ..solvers.host_linalg import Matrix, cholesky, cholesky_solve


def imtl_g_on_host(gramian: Matrix, rtol: float) -> list[float] | None:
    """IMTL-G's weights (summing to 1) from the Gramian, or None (see the module docstring)."""
    m = len(gramian)
    norms = [math.sqrt(max(gramian[i][i], 0.0)) for i in range(m)]
    largest = max(norms)
    if not (0.0 < largest < math.inf) or min(norms) <= largest * 1e-150:
        return None  # a zero gradient: the tensor path gives it weight 0
    cosines = [[g / (n_i * n_j) for g, n_j in zip(row, norms)] for row, n_i in zip(gramian, norms)]
    factor = cholesky(cosines)
    if factor is None or not _well_conditioned(factor, rtol):
        return None
    (scaled,) = cholesky_solve(factor, [1.0] * m)
    v = [x / n for x, n in zip(scaled, norms)]
    total = sum(v)
    if not abs(total) > 1e-12 * sum(map(abs, v)) or not math.isfinite(total):
        return None
    return [x / total for x in v]


def _well_conditioned(factor: Matrix, rtol: float) -> bool:
    """Whether every eigenvalue of ``K = L L^T`` (unit diagonal) exceeds ``rtol`` times the
    largest: ``1 / ||L^-1||_F^2 > rtol m`` suffices."""
    m = len(factor)
    inverse_square = 0.0  # ||L^-1||_F^2, column by column of L^-1 (forward substitution)
    for j in range(m):
        column = [0.0] * m
        column[j] = 1.0 / factor[j][j]
        for i in range(j + 1, m):
            row = factor[i]
            # Whole-row product: the entries not yet computed are still 0.
            column[i] = -sum(map(mul, row, column)) / row[i]
        inverse_square += sum(map(mul, column, column))
    return inverse_square * rtol * m < 1.0
