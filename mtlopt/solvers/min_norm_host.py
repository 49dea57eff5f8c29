"""MGDA's min-norm point on the host, for the CPU and few tasks.

When the gradients barely conflict, every weight of the min-norm point of their convex hull
is positive and the optimum is the simplex's whole face: ``w = Q^-1 1 / (1^T Q^-1 1)`` with
``Q`` the Gramian scaled to a unit largest diagonal (plus the faces' ridge). On the CPU
:func:`mtlopt.solvers.min_norm.nonnegative_qp` tries that face first with about 20 small
tensor operations (0.36 ms inside a training step, where the backward pass has just evicted
the caches torch's dispatch relies on); here it is one Cholesky solve on Python floats
(:mod:`mtlopt.solvers.host_linalg`). Where a weight comes out negative (the optimum lies on
a smaller face) or ``Q`` fails Cholesky (dependent gradients), this returns None and the
caller pivots as before.
"""

from __future__ import annotations

import math

from .host_linalg import Matrix, cholesky, cholesky_solve, symmetrised


def min_norm_on_host(gramian: Matrix, ridge: float) -> list[float] | None:
    """The min-norm weights when all are positive, else None (see the module docstring)."""
    m = len(gramian)
    largest = max(gramian[i][i] for i in range(m))
    if not 0.0 < largest < math.inf:
        return None
    quadratic = [[g / largest for g in row] for row in symmetrised(gramian)]
    for i in range(m):
        quadratic[i][i] += ridge
    factor = cholesky(quadratic)
    if factor is None:
        return None
    (solution,) = cholesky_solve(factor, [1.0] * m)
    total = sum(solution)
    if not 0.0 < total < math.inf:
        return None
    weights = [x / total for x in solution]
    return weights if min(weights) >= 0.0 else None
