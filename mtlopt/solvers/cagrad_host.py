"""CAGrad's first active-set attempt on the host, for the CPU and few tasks.

:func:`mtlopt.solvers.cagrad_cpu.solve_on_cpu` first runs its active-set method from the
uniform weights, which usually proves the answer within a few Newton steps on the full
face. Each step there is some 30 small tensor operations (0.8 ms of a training step at
m = 10, where the backward pass has just evicted the caches torch's dispatch relies on).
This is the same method, step for step, on Python floats
(:mod:`mtlopt.solvers.host_linalg`): the same Newton steps on the face, ratio test, Armijo
damping, convergence model and duality certificate (see :func:`cagrad_cpu._active_set`
for the method). Only the returns differ in kind: where the tensor version would turn to
an eigendecomposition (a face whose Hessian is singular, dependent tasks) this one returns
None, and the caller runs the tensor version; every answer returned is certified.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from .host_linalg import Matrix, cholesky, cholesky_solve, dot, matvec, symmetrised


class Limits(NamedTuple):
    """The tensor version's constants (:mod:`mtlopt.solvers.cagrad_cpu` documents them)."""

    active_set_steps: int
    smooth_quadratic: float
    undamped: float
    face_converged: float
    gap_tolerance: float
    cholesky_pivot: float
    armijo: float
    damping_floor: float


def active_set_on_host(
    gramian: Matrix, linear: list[float], radius: float, limits: Limits
) -> list[float] | None:
    """``cagrad_cpu._active_set`` from the uniform weights on every task, on Python floats:
    certified weights, or None."""
    m = len(gramian)
    free = [True] * m
    weights = [1.0 / m] * m
    previous = math.inf
    changed = True
    index: list[int] = []
    sub_gramian: Matrix = []
    sub_linear: list[float] = []
    sub: list[float] = []
    for _ in range(limits.active_set_steps):
        if changed:
            index = [i for i in range(m) if free[i]]
            sub_gramian = [[gramian[i][j] for j in index] for i in index]
            sub_linear = [linear[i] for i in index]
            sub = [weights[i] for i in index]
            changed = False
        smooth = _smooth_gradient(sub_gramian, sub, sub_linear, radius, limits)
        if smooth is None:
            return None
        g_w, quadratic, curvature, gradient = smooth
        # The Hessian curvature (G - g_w g_w^T / q) plus shift 1 1^T (cagrad_cpu's
        # _tangent_newton explains the shift).
        outer, shift = curvature / quadratic, curvature or 1.0
        system = [
            [curvature * a - outer * g_i * g_j + shift for a, g_j in zip(row, g_w)]
            for row, g_i in zip(sub_gramian, g_w)
        ]
        step = _tangent_newton(system, gradient, limits.cholesky_pivot)
        if step is None:
            return None
        length = max(map(abs, step))
        if not math.isfinite(length):
            return None
        ratio, block = 1.0, -1  # ratio test: the longest feasible fraction of the step
        for i, (w_i, d_i) in enumerate(zip(sub, step)):
            if d_i < 0.0 and w_i + ratio * d_i <= 0.0:
                ratio, block = w_i / -d_i, i
        if length > limits.undamped:
            slopes = (dot(step, g_w), dot(step, matvec(sub_gramian, step)), dot(step, sub_linear))
            damped = _damped_length(ratio, slopes, quadratic, radius, limits)
            if damped is None:
                return None
            if damped < ratio:
                sub = [w + damped * d for w, d in zip(sub, step)]
                previous = math.inf
                continue
        if block >= 0:
            leaving = [w + d <= 0.0 for w, d in zip(sub, step)]
            leaving[block] = True
            sub = [0.0 if out else w + ratio * d for w, d, out in zip(sub, step, leaving)]
            weights = _spread(sub, index, m)
            for i, out in zip(index, leaving):
                free[i] = free[i] and not out
            changed, previous = True, math.inf
            continue
        sub = [w + d for w, d in zip(sub, step)]
        # Newton's method converges quadratically: the next step is about
        # length * (length / previous)^2.
        converged = length <= limits.face_converged or (
            previous < math.inf and length * (length / previous) ** 2 <= limits.face_converged
        )
        previous = length
        if not converged:
            continue
        weights = _spread(sub, index, m)
        smooth = _smooth_gradient(gramian, weights, linear, radius, limits)
        if smooth is None:
            return None
        gradient = smooth[3]
        # Weak duality with d = g_0 + r g_w / ||g_w||: f* >= min_i gradient_i, f(w) = w^T gradient.
        value = dot(weights, gradient)
        if value - min(gradient) <= limits.gap_tolerance:
            return weights
        violators = [g < value - limits.gap_tolerance and not f for g, f in zip(gradient, free)]
        if not any(violators):
            return None
        free = [f or v for f, v in zip(free, violators)]
        changed, previous = True, math.inf
    return None


def _smooth_gradient(
    gramian: Matrix, weights: list[float], linear: list[float], radius: float, limits: Limits
) -> tuple[list[float], float, float, list[float]] | None:
    """``g_w = G w``, ``q = ||g_w||^2``, ``r / sqrt(q)`` and the objective's gradient
    ``c + r g_w / sqrt(q)``; None where ``q`` is below the smooth range."""
    g_w = matvec(gramian, weights)
    quadratic = dot(weights, g_w)
    if not quadratic > limits.smooth_quadratic:
        return None
    curvature = radius / math.sqrt(quadratic)
    return g_w, quadratic, curvature, [a + curvature * b for a, b in zip(linear, g_w)]


def _spread(sub: list[float], index: list[int], m: int) -> list[float]:
    """The face's weights, normalised to sum 1, on all ``m`` tasks (0 off the face)."""
    total = sum(sub)
    weights = [0.0] * m
    for i, w in zip(index, sub):
        weights[i] = w / total
    return weights


def _tangent_newton(
    system: Matrix, gradient: list[float], pivot_floor: float
) -> list[float] | None:
    """``x`` with ``H x + nu 1 = -gradient``, ``1^T x = 0`` (``cagrad_cpu._tangent_newton``)
    from ``system = H + shift 1 1^T``, through Cholesky; None where that factorisation is
    not trusted."""
    factor = cholesky(system)
    if factor is None:
        return None
    if min(factor[i][i] ** 2 / system[i][i] for i in range(len(system))) <= pivot_floor:
        return None
    mean = sum(gradient) / len(gradient)
    solved_gradient, solved_ones = cholesky_solve(
        factor, [g - mean for g in gradient], [1.0] * len(gradient)
    )
    along_gradient, along_ones = sum(solved_gradient), sum(solved_ones)
    if along_ones == 0.0:
        return None
    ratio = along_gradient / along_ones
    return [-(a - ratio * b) for a, b in zip(solved_gradient, solved_ones)]


def _damped_length(
    longest: float,
    slopes: tuple[float, float, float],
    quadratic: float,
    radius: float,
    limits: Limits,
) -> float | None:
    """``cagrad_cpu._damped_length`` from the step's three slopes."""
    slope_q, curvature_q, slope_b = slopes
    norm = math.sqrt(quadratic)
    derivative = slope_b + radius * slope_q / norm
    if not derivative < 0.0:
        return None
    length = longest
    while length > limits.damping_floor:
        d_quadratic = length * (2.0 * slope_q + length * curvature_q)
        new_norm = math.sqrt(max(quadratic + d_quadratic, 0.0))
        change = length * slope_b + radius * d_quadratic / (new_norm + norm)
        if change <= limits.armijo * length * derivative:
            return length
        length *= 0.5
    return None


def cagrad_weights_on_host(
    gramian: Matrix, c: float, divisor: float, zero_direction: float, limits: Limits
) -> list[float] | None:
    """:class:`mtlopt.weighting.CAGrad`'s weights from its first active-set attempt, the
    whole chain on Python floats (the Gramian normalised, the inner problem set up as
    :func:`mtlopt.solvers.cagrad.conflict_averse_weights` does, the update's weights as
    ``weighting.cagrad._conflict_averse_update``); None wherever the tensor chain would take
    another branch (a zero Gramian or a zero task, ``c = 0``, a possibly zero ``g_w``) or the
    active set declines."""
    m = len(gramian)
    largest = max(gramian[i][i] for i in range(m))
    if m < 2 or not 0.0 < largest < math.inf:
        return None
    unit = [[g / largest for g in row] for row in gramian]  # CAGrad's _normalised
    radius = c * math.sqrt(max(sum(map(sum, unit)) / (m * m), 0.0))  # c ||g_0||
    symmetric = symmetrised(unit)
    if any(not any(row) for row in symmetric) or radius == 0.0:
        return None
    linear = [sum(row) / m / (1.0 + radius) for row in symmetric]
    inner = radius / (1.0 + radius)
    # solve_on_cpu's zero-direction shortcut applies: leave it to the tensor chain.
    outer = inner / (1.0 - inner)
    if outer * outer >= sum(linear) / m / (1.0 - inner) or abs(min(linear)) <= limits.gap_tolerance:
        return None
    weights = active_set_on_host(symmetric, linear, inner, limits)
    if weights is None:
        return None
    norm = math.sqrt(max(dot(weights, matvec(unit, weights)), 0.0))
    scale = radius / norm if norm > zero_direction else 0.0
    return [(1.0 / m + scale * w) / divisor for w in weights]
