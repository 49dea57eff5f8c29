"""Plain reference helpers shared by the method tests: explicit per-task gradient loops and
list arithmetic, independent of the library's batched code."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from .conftest import Net, make_batch


def dot(a, b):  # noqa: ANN001, ANN201
    return sum(x * y for x, y in zip(a, b))


def norm(a):  # noqa: ANN001, ANN201
    return math.sqrt(dot(a, a))


def rows_of(jacobian: torch.Tensor) -> list[list[float]]:
    """An ``m x n`` tensor as a list of m per-task gradient vectors."""
    flat = jacobian.detach().to(torch.float64).reshape(jacobian.shape[0], -1)
    return [[float(v) for v in row] for row in flat]


def weighted_sum(weights, rows):  # noqa: ANN001, ANN201
    return [sum(weights[i] * rows[i][k] for i in range(len(rows))) for k in range(len(rows[0]))]


def task_gradients(losses, params) -> list[torch.Tensor]:  # noqa: ANN001
    """Per task, its flattened gradient over ``params`` (zeros where a loss does not reach),
    by one autograd call per task."""
    rows = []
    for loss in losses:
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        rows.append(
            torch.cat(
                [(torch.zeros_like(p) if g is None else g).flatten() for p, g in zip(params, grads)]
            )
        )
    return rows


def per_task_grads(losses, params) -> torch.Tensor:  # noqa: ANN001
    """:func:`task_gradients` stacked into an ``m x n`` tensor."""
    return torch.stack(task_gradients(losses, params))


def double_net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net().double()


def batch64(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = make_batch(step)
    return x.double(), y.double()


def encoder_params(net: Net) -> list[torch.Tensor]:
    return list(net.encoder.parameters())


def head_params(net: Net, task: int) -> list[torch.Tensor]:
    return list(net.heads[task].parameters())


def flat_grad(params) -> torch.Tensor:  # noqa: ANN001
    return torch.cat([p.grad.flatten() for p in params])


def simplex_minimum(
    value: Callable[[np.ndarray], float],
    gradient: Callable[[np.ndarray], np.ndarray] | None,
    m: int,
) -> np.ndarray:
    """SLSQP over the simplex from several starts; the best result, projected back onto it
    (scipy, a generic solver, as the independent reference for the simplex problems)."""
    import scipy.optimize  # a test-only dependency

    best = None
    for start in [np.full(m, 1.0 / m)] + [0.9 * np.eye(m)[i] + 0.1 / m for i in range(m)]:
        result = scipy.optimize.minimize(
            value,
            start,
            jac=gradient,
            method="SLSQP",
            bounds=[(0.0, None)] * m,
            constraints=[
                {"type": "eq", "fun": lambda w: w.sum() - 1.0, "jac": lambda w: np.ones(m)}
            ],
            options={"ftol": 1e-15, "maxiter": 2000},
        )
        candidate = np.clip(result.x, 0.0, None)
        candidate = candidate / candidate.sum()
        if best is None or value(candidate) < value(best):
            best = candidate
    return best
