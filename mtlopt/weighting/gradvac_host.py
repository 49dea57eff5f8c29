"""GradVac's sequential sweeps on the host, for the CPU and few tasks.

The vectorised loop in :mod:`mtlopt.weighting.gradvac` runs ``m - 1`` sweeps of about 30
small tensor operations each; at m = 10 the per-operation cost of torch (microseconds)
dominates: 0.75 ms for 2,500 multiplications. On the CPU, with at most
:data:`HOST_MAX_TASKS` tasks, the same sweeps run here on Python floats (float64, like the
tensors), row by row (rows are independent: row ``i`` only reads ``C[i]`` and ``G``), in
a fraction of the time. Each row keeps ``C[i] G`` and ``||g_i'||^2`` up to date instead of
recomputing ``C G`` (an ``O(m)`` update per correction); the numbers agree with the
vectorised loop to round-off (tested).
"""

from __future__ import annotations

import math

#: Above this many tasks the vectorised loop is as fast (Python's O(m^3) work grows).
HOST_MAX_TASKS = 32


def gradvac_sweeps(
    gramian: list[list[float]],
    orders: list[list[int]],
    targets: list[list[float]],
    beta: float,
    eps: float,
) -> tuple[list[float], list[list[float]]]:
    """The task weights ``C.sum(0)`` and the updated target cosines ``phi_hat``.

    ``orders[i]``: the other tasks in the order row ``i`` visits them; ``targets``:
    ``phi_hat`` before the step (not modified). Eqs. 5-6 of the paper, as in
    :meth:`GradVac.weights_from_gramian`.
    """
    m = len(gramian)
    norms = [math.sqrt(max(gramian[k][k], 0.0)) for k in range(m)]
    weights = [0.0] * m
    updated = [list(row) for row in targets]
    for i in range(m):
        row = [0.0] * m  # C[i]
        row[i] = 1.0
        row_g = list(gramian[i])  # C[i] G
        square = gramian[i][i]  # C[i] G C[i]^T = ||g_i'||^2
        for j in orders[i]:
            norm_i = math.sqrt(max(square, 0.0))
            norm_j = norms[j]
            dot = row_g[j]
            phi = min(max(dot / (norm_i * norm_j + eps), -1.0), 1.0)
            target = targets[i][j]
            if phi < target and norm_i > 0 and norm_j > 0:
                sin_target = math.sqrt(max(1.0 - target * target, 0.0))
                sin_phi = math.sqrt(max(1.0 - phi * phi, 0.0))
                coef = norm_i * (target * sin_phi - phi * sin_target) / (norm_j * sin_target + eps)
                row[j] += coef
                # ||g + c g_j||^2 = ||g||^2 + 2 c <g, g_j> + c^2 ||g_j||^2
                # ||g + c g_j||^2 = ||g||^2 + 2 c <g, g_j> + c^2 ||g_j||^2
                square += coef * (2.0 * dot + coef * gramian[j][j])
                row_g = [a + coef * b for a, b in zip(row_g, gramian[j])]
            updated[i][j] = (1.0 - beta) * target + beta * phi
        for k in range(m):
            weights[k] += row[k]
    return weights, updated
