"""Nash-MTL's and FairGrad's system ``G w = w^(-p)`` on the host, for the CPU and few tasks.

The same problem as :mod:`mtlopt.solvers.bargaining` (its module docstring has the
derivation, the zero-gradient tasks, the ridge and the warm start), solved on Python floats
(:mod:`mtlopt.solvers.host_linalg`): Newton's method on the convex potential
``f(w) = 1/2 w^T G w - sum_i h(w_i)`` in ``w``, with a backtracking (Armijo) line search
from the full step, stopped by the same two tests as the tensor loop on the CPU. On the
benchmark MLP's representation (m = 10, warm-started as in training) this takes 0.1 ms
against 0.25 for the tensor loop, and 0.38 ms against 0.8 inside a training step, where
the backward pass has just evicted the caches that torch's dispatch relies on.

Where this plain Newton iteration is not enough (an indefinite Hessian in floating point, no
decrease along the step, or no convergence within the iterations: weights spanning many
orders of magnitude, which the tensor loop's step in ``log w`` crosses faster) it returns
None and the caller solves with the tensor loop from the start: the answer is always one of
the two exact solvers'.
"""

from __future__ import annotations

import math

from .host_linalg import Matrix, cholesky, cholesky_solve, dot, matvec, symmetrised

#: Sufficient decrease of the line search (Armijo), and how many halvings it tries.
ARMIJO = 1e-4
HALVINGS = 40
#: A Newton step moving no weight by more than this, relative, is in the quadratic phase's
#: last iterations: ``f`` changes by round-off along it, so it skips the line search.
TINY_STEP = 1e-8


def bargaining_on_host(
    gramian: Matrix,
    power: float,
    iterations: int,
    initial: list[float] | None,
    ridges: tuple[float, ...],
    zero_norm: float,
    converged: float,
    settled_decrement: float,
) -> list[float] | None:
    """:func:`mtlopt.solvers.bargaining.bargaining_weights` on Python floats (its constants
    passed in), or None where the tensor loop must decide (see the module docstring)."""
    m = len(gramian)
    symmetric = symmetrised(gramian)
    diagonal = [max(symmetric[i][i], 0.0) for i in range(m)]
    largest = max(diagonal)
    # (A sum that overflows only sends a finite problem to the tensor loop.)
    if not 0.0 < largest < math.inf or not math.isfinite(sum(map(sum, symmetric))):
        return None
    active = [d > largest * zero_norm**2 for d in diagonal]
    system = [
        [symmetric[i][j] / largest if active[i] and active[j] else float(i == j) for j in range(m)]
        for i in range(m)
    ]
    system = _ridged(system, active, ridges)
    weights = _start(system, active, power, initial)
    if weights is None:
        return None
    for _ in range(iterations):
        stepped = _newton_step(weights, system, power)
        if stepped is None:
            return None
        new_weights, decrement = stepped
        moved = all(abs(a - b) <= converged * a for a, b in zip(new_weights, weights))
        weights = new_weights
        if moved or (power == 1.0 and decrement <= settled_decrement):
            scale = largest ** (-1.0 / (1.0 + power))
            return [w * scale if on else 0.0 for w, on in zip(weights, active)]
    return None


def _ridged(system: Matrix, active: list[bool], ridges: tuple[float, ...]) -> Matrix:
    """``system + r diag(G_ii)`` (active tasks) for the first ``r`` that passes Cholesky
    (the last one if none does), as the tensor solver."""
    diagonal = [system[i][i] if on else 0.0 for i, on in enumerate(active)]
    candidate = system
    for ridge in ridges:
        candidate = [row[:] for row in system]
        for i, value in enumerate(diagonal):
            candidate[i][i] += ridge * value
        if cholesky(candidate) is not None:
            break
    return candidate


def _barrier(values: list[float], power: float) -> float:
    if power == 1.0:
        return sum(map(math.log, values))
    return sum(v ** (1.0 - power) for v in values) / (1.0 - power)


def _ray_minimum(direction: list[float], system: Matrix, power: float) -> tuple[list[float], float]:
    """The minimiser of ``f`` on the ray ``t * direction`` and ``f`` there."""
    quadratic = dot(direction, matvec(system, direction))
    numerator = sum(d ** (1.0 - power) for d in direction)
    scale = (numerator / quadratic) ** (1.0 / (1.0 + power))
    point = [scale * d for d in direction]
    return point, 0.5 * scale * scale * quadratic - _barrier(point, power)


def _start(
    system: Matrix, active: list[bool], power: float, initial: list[float] | None
) -> list[float] | None:
    """The cold start (exact for orthogonal gradients), or the previous solution where it is
    better on its ray; None if the values are not usable."""
    try:
        cold_direction = [system[i][i] ** (-1.0 / (1.0 + power)) for i in range(len(system))]
        cold, cold_value = _ray_minimum(cold_direction, system, power)
        if initial is not None:
            direction = [
                w if on and math.isfinite(w) and w > 0.0 else c
                for w, on, c in zip(initial, active, cold_direction)
            ]
            warm, warm_value = _ray_minimum(direction, system, power)
            usable = all(math.isfinite(w) and w > 0.0 for w in warm)
            if usable and math.isfinite(warm_value) and warm_value < cold_value:
                return warm
    except (ValueError, ZeroDivisionError, OverflowError):
        return None
    return cold if all(math.isfinite(w) and w > 0.0 for w in cold) else None


def _barrier_change(weights: list[float], ratios: list[float], power: float) -> float:
    """``sum_i h(w_i (1 + r_i)) - h(w_i)``, accurate for tiny ratios."""
    if power == 1.0:
        return sum(map(math.log1p, ratios))
    exponent = 1.0 - power
    return (
        sum(math.expm1(exponent * math.log1p(r)) * w**exponent for w, r in zip(weights, ratios))
        / exponent
    )


def _newton_step(
    weights: list[float], system: Matrix, power: float
) -> tuple[list[float], float] | None:
    """One damped Newton step in ``w`` and the squared decrement before it, or None."""
    g_w = matvec(system, weights)
    slopes = [w ** (-power) for w in weights]
    gradient = [a - b for a, b in zip(g_w, slopes)]
    hessian = [row[:] for row in system]
    for i, (w, slope) in enumerate(zip(weights, slopes)):
        hessian[i][i] += power * slope / w
    factor = cholesky(hessian)
    if factor is None:
        return None
    step = [-x for x in cholesky_solve(factor, gradient)[0]]
    decrement = -dot(gradient, step)
    if not math.isfinite(decrement) or decrement < 0.0:
        return None
    if decrement == 0.0:
        return weights, 0.0
    along_g, curvature = dot(step, g_w), dot(step, matvec(system, step))
    if max(abs(d / w) for d, w in zip(step, weights)) <= TINY_STEP:
        # Converged but for round-off: f's change is noise at this size. Take the step
        # if it decreases f, else stay (the caller's test then sees no move), as the
        # tensor loop does.
        ratios = [d / w for d, w in zip(step, weights)]
        change = along_g + 0.5 * curvature - _barrier_change(weights, ratios, power)
        stepped = [w * (1.0 + r) for w, r in zip(weights, ratios)] if change < 0 else weights
        return stepped, decrement
    length = 1.0
    for _ in range(HALVINGS):
        ratios = [length * d / w for d, w in zip(step, weights)]
        if min(ratios) > -1.0:
            change = length * along_g + 0.5 * length * length * curvature
            change -= _barrier_change(weights, ratios, power)
            if change <= -ARMIJO * length * decrement:
                return [w * (1.0 + r) for w, r in zip(weights, ratios)], decrement
        length *= 0.5
    return None
