"""Dense linear algebra on Python floats, for the solvers' host paths (CPU, few tasks).

The weightings' problems are ``m x m`` with ``m`` the number of tasks. On the CPU, torch
spends microseconds dispatching each small operation, several times that when the step's
backward pass has just evicted the caches (an ``m = 10`` Newton iteration is 35 operations:
0.2 ms there). The same arithmetic on Python floats is a few hundred multiplications, and
pays no dispatch: the host paths use these helpers up to :data:`HOST_MAX_TASKS` tasks, where
the ``O(m^3)`` Python work is still the cheaper side.
"""

from __future__ import annotations

import math
from operator import mul

Matrix = list[list[float]]

#: Above this many tasks the host paths leave the work to torch (Python's O(m^3) grows).
HOST_MAX_TASKS = 16
#: Take the CPU's shortcuts: values read back to the host (free there) and the host paths.
#: Off, the CPU runs the synchronisation-free tensor code of other devices (the tests
#: compare the two).
HOST_READS = True


def reads_back(tensor: object) -> bool:
    """Whether code may read ``tensor``'s values back to the host at no cost (the CPU)."""
    return HOST_READS and tensor.device.type == "cpu"  # type: ignore[attr-defined]


def on_host(gramian: object) -> bool:
    """Whether the problem of this ``m x m`` Gramian (or ``[..., m]`` tensor) takes its host
    path: on the CPU, with at most :data:`HOST_MAX_TASKS` tasks."""
    return reads_back(gramian) and gramian.shape[-1] <= HOST_MAX_TASKS  # type: ignore[attr-defined]


def symmetrised(matrix: Matrix) -> Matrix:
    """``(A + A^T) / 2``."""
    return [
        [0.5 * (a + b) for a, b in zip(row, column)] for row, column in zip(matrix, zip(*matrix))
    ]


# sum(map(mul, ...)) runs its loop in C: about twice as fast as a generator expression.


def dot(u: list[float], v: list[float]) -> float:
    """``u^T v``."""
    return sum(map(mul, u, v))


def matvec(matrix: Matrix, vector: list[float]) -> list[float]:
    """``A v`` (``A`` by rows)."""
    return [sum(map(mul, row, vector)) for row in matrix]


def cholesky(matrix: Matrix) -> Matrix | None:
    """The lower factor ``L`` with ``L L^T = matrix``, or None unless every pivot is
    positive and finite (not positive definite in floating point)."""
    n = len(matrix)
    factor = [[0.0] * n for _ in range(n)]
    for j in range(n):
        row_j = factor[j]
        # Whole-row products: the entries not yet computed are still 0 (no slicing).
        pivot = matrix[j][j] - sum(map(mul, row_j, row_j))
        if not (pivot > 0.0 and pivot < math.inf):
            return None
        diagonal = math.sqrt(pivot)
        row_j[j] = diagonal
        for i in range(j + 1, n):
            row_i = factor[i]
            row_i[j] = (matrix[i][j] - sum(map(mul, row_i, row_j))) / diagonal
    return factor


def cholesky_solve(factor: Matrix, *rhs: list[float]) -> list[list[float]]:
    """``x`` with ``L L^T x = b`` for each right-hand side ``b`` (forward then backward
    substitution); the products run over whole rows, the unknowns not yet found being 0."""
    n = len(factor)
    upper = [list(column) for column in zip(*factor)]  # L^T by rows
    solutions = []
    for b in rhs:
        forward = [0.0] * n
        for i in range(n):
            forward[i] = (b[i] - sum(map(mul, factor[i], forward))) / factor[i][i]
        solution = [0.0] * n
        for i in range(n - 1, -1, -1):
            solution[i] = (forward[i] - sum(map(mul, upper[i], solution))) / upper[i][i]
        solutions.append(solution)
    return solutions
