"""Positive solutions of ``G w = w^(-p)``: Nash-MTL's bargaining system (``p = 1``) and
FairGrad's alpha-fair system (``p = 1 / alpha``).

Both are the optimality condition of the strictly convex potential

    f(w) = 1/2 w^T G w - sum_i h(w_i),   h'(w) = w^(-p)   (h = log for p = 1),

over ``w > 0``, so the solver minimises ``f`` with Newton's method and a line search on
``f`` itself: globally convergent (a plain Newton iteration on the equations, in ``w`` or in
``log w``, is not), quadratic near the solution, and indifferent to the tasks' gradient
scales (Newton's iterates do not depend on a diagonal rescaling of ``w``; the start is the
exact solution for orthogonal gradients, ``w_i ~ G_ii^(-1/(1+p))``, scaled optimally).
Each iteration tries a Newton step in ``w`` and one in ``log w`` and keeps the better (see
:func:`_newton_step`). Fixed iteration count, no host synchronisation, float64 on the
Gramian's device; on the CPU the loop stops once a step moves no weight by more than
``CONVERGED`` relative (round-off: the fixed count would move them less than that again),
or, for ``p = 1``, once the Newton decrement proves the step just taken ended within
round-off (:data:`SETTLED_DECREMENT`). Reaching round-off takes about 20 iterations for
``p`` in ``[0.5, 2]`` and up to 40 for ``p`` in ``[0.1, 10]``, degenerate and badly scaled
Gramians included.

Degenerate Gramians. The system has a positive solution exactly when some direction ``d``
improves every task (``J d > 0``); otherwise (a zero gradient, opposite gradients, zero in
the convex hull of the gradients) ``f`` is unbounded below and the weights run off to
infinity. Two guards keep the result finite and meaningful:

* a task whose gradient is zero (below ``1e-150`` of the largest gradient norm) gets weight
  0: its utility ``g_i^T d`` is 0 whatever the update, so it cannot take part in the bargain;
* a ridge ``r * G_ii`` is added to the diagonal (``r = 1e-10`` of each task's own squared
  norm, so it does not depend on the tasks' scales). On a well-posed problem this moves the
  weights by about ``1e-10`` relative; on a degenerate one it bounds them (by
  ``r^(-1/(1+p))`` in units of ``1 / ||g_i||^(2/(1+p))``), and the update shrinks
  towards 0 at Pareto-stationary points instead of blowing up.

  A Gramian accumulated in float32 (or bfloat16) can be slightly indefinite where the exact
  one is singular (two opposite gradients: a determinant of ``-1e-8`` instead of 0), and
  ``1e-10`` does not cover that round-off. ``r`` is therefore the first of
  ``1e-10, 1e-8, ..., 1e-2`` for which the ridged system passes a Cholesky factorisation
  (``cholesky_ex``: no host synchronisation); on an exact or well-posed Gramian that is
  ``1e-10``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..nosync import at, upload
from . import host_linalg
from .bargaining_host import bargaining_on_host

#: Relative ridges on each task's squared gradient norm, tried in order: the first that makes
#: the system positive definite is used (see the module docstring).
RIDGES = (1e-10, 1e-8, 1e-6, 1e-4, 1e-2)
#: Step lengths tried by the line search: 1, 1/2, ..., 2^-(LINE_SEARCH_STEPS - 1).
LINE_SEARCH_STEPS = 40
#: Relative move of every weight below which the CPU loop stops (a few float64 ulps).
CONVERGED = 1e-15
#: For ``p = 1`` (Nash-MTL) ``f`` is self-concordant (a convex quadratic minus a sum of
#: logs), so a Newton step taken at a squared decrement ``lambda^2 < 1`` lands where the
#: next decrement is at most ``lambda^2 / (1 - lambda)^2``, and the weights are within about
#: that of the solution, relative (the Hessian's barrier term is ``diag(1 / w^2)``); a step
#: that decreases ``f`` further only gets closer. Below this ``lambda^2`` the weights are
#: within a few dozen ulps of the solution and the solve ends, without the iteration that
#: would only confirm it (3.3 -> 2.3 Newton steps per warm-started solve on the benchmark
#: MLP's representation, m = 10).
SETTLED_DECREMENT = 1e-14
#: Squared Newton decrement up to which the CPU takes the full Newton step in ``w`` without
#: a line search (when it keeps every weight positive and decreases ``f``): for ``p = 1``
#: ``f`` is self-concordant and ``lambda <= 1/2`` puts the full step inside the Dikin
#: ellipsoid, where it decreases ``f``.
FULL_STEP = 0.25
#: A gradient counts as zero below this fraction of the largest gradient norm.
ZERO_NORM = 1e-150


def _barrier(values: Tensor, power: float) -> Tensor:
    """``h(values)`` summed over the last dimension (``h' = w^(-p)``)."""
    if power == 1.0:
        return values.log().sum(-1)
    return (values.pow(1.0 - power) / (1.0 - power)).sum(-1)


def _barrier_change(weights: Tensor, ratios: Tensor, power: float) -> Tensor:
    """``sum_i h(w_i (1 + r_i)) - h(w_i)``, accurate when the ratios ``r`` are tiny."""
    if power == 1.0:
        return torch.log1p(ratios).sum(-1)
    exponent = 1.0 - power
    change = torch.expm1(exponent * torch.log1p(ratios)) * weights.pow(exponent) / exponent
    return change.sum(-1)


def _ray_minimum(directions: Tensor, gramian: Tensor, power: float) -> tuple[Tensor, Tensor]:
    """The minimiser of ``f`` on each ray ``t * direction`` (``t > 0``; one per row of
    ``directions``) and ``f`` there."""
    quadratic = ((directions @ gramian) * directions).sum(-1, keepdim=True)
    numerator = directions.pow(1.0 - power).sum(-1, keepdim=True)
    scale = (numerator / quadratic).pow(1.0 / (1.0 + power))
    points = scale * directions
    return points, (0.5 * scale**2 * quadratic).squeeze(-1) - _barrier(points, power)


def _equilibrated_solve(matrices: Tensor, rhs: Tensor) -> Tensor:
    """Solve a batch of symmetric positive definite systems after scaling to unit diagonal
    (the barrier's curvature spans many orders of magnitude)."""
    scale = matrices.diagonal(dim1=-2, dim2=-1).rsqrt()
    balanced = matrices * scale.unsqueeze(-1) * scale.unsqueeze(-2)
    solved, _ = torch.linalg.solve_ex(balanced, (scale * rhs).unsqueeze(-1))
    return scale * solved.squeeze(-1)


def _newton_step(weights: Tensor, gramian: Tensor, power: float) -> tuple[Tensor, Tensor]:
    """One step on ``f``: the better of a Newton step in ``w`` and one in ``y = log w``.

    The ``w`` step converges fast where the ridge bounds a degenerate problem (huge weights
    along a near-null direction); the ``log w`` step where the solution spans many orders of
    magnitude (small ``p``, very unequal gradient norms), a region the ``w`` step crosses
    only by repeated halving. In ``y`` the Hessian ``W G W + diag(w (G w) - (1 - p) w^(1-p))``
    need not be positive definite away from the solution; its diagonal term is raised to at
    least ``p w^(1-p)`` (its value at the solution), which keeps a descent direction and the
    quadratic convergence. Each direction gets a line search over halving step lengths; the
    candidate with the lowest ``f`` wins, and a step that does not decrease ``f`` is not
    taken.

    Returns the new weights and the squared Newton decrement of the ``w`` step at the old
    ones, ``lambda^2 = -grad^T step``.
    """
    g_w = gramian @ weights
    barrier_slope = weights.pow(-power)
    barrier_term = weights * barrier_slope  # w^(1-p)
    hessian_w = gramian + torch.diag(power * barrier_slope / weights)
    diagonal_y = torch.maximum(weights * g_w - (1.0 - power) * barrier_term, power * barrier_term)
    hessian_y = weights[:, None] * gramian * weights[None, :] + torch.diag(diagonal_y)
    gradient_y = weights * g_w - barrier_term
    steps = _equilibrated_solve(
        torch.stack([hessian_w, hessian_y]),
        -torch.stack([g_w - barrier_slope, gradient_y]),
    )
    lengths = torch.pow(
        0.5, torch.arange(LINE_SEARCH_STEPS, dtype=weights.dtype, device=weights.device)
    )[:, None]
    # Relative moves w_new / w - 1 of every candidate, for both directions.
    ratios = torch.cat([lengths * (steps[0] / weights), torch.expm1(lengths * steps[1])], dim=0)
    feasible = (ratios > -1.0).all(-1) & torch.isfinite(ratios).all(-1)
    ratios = torch.where(feasible[:, None], ratios, torch.zeros_like(ratios))
    moves = ratios * weights
    # f(w + move) - f(w) as differences, so tiny decreases near the solution are not lost.
    change = moves @ g_w + 0.5 * ((moves @ gramian) * moves).sum(-1)
    change = change - _barrier_change(weights.expand_as(ratios), ratios, power)
    change = torch.where(feasible & torch.isfinite(change), change, torch.inf)
    best = change.argmin()
    candidate = weights + at(moves, best)
    accept = (at(change, best) < 0) & torch.isfinite(candidate).all() & (candidate > 0).all()
    decrement = (barrier_slope - g_w) @ steps[0]
    return torch.where(accept, candidate, weights), decrement


def _full_newton_step(
    weights: Tensor, gramian: Tensor, power: float
) -> tuple[Tensor | None, Tensor]:
    """The CPU's cheap iteration: the full Newton step in ``w``, when it is safe to take.

    That is when the squared decrement ``lambda^2`` is at most :data:`FULL_STEP` (the
    quadratic phase, where the full step is what the line search of :func:`_newton_step`
    would accept), every weight stays positive and ``f`` decreases, all three read back on
    the host. Then one direction and one candidate replace two directions and
    ``2 x LINE_SEARCH_STEPS`` candidates: about 35 small tensor operations instead of 80.
    Returns the new weights (None if the step is not safe: the caller takes the full
    iteration) and ``lambda^2``.
    """
    g_w = gramian @ weights
    barrier_slope = weights.pow(-power)
    gradient = g_w - barrier_slope
    step = _equilibrated_solve(gramian + torch.diag(power * barrier_slope / weights), -gradient)
    decrement = -(gradient @ step)
    if not float(decrement) <= FULL_STEP:
        return None, decrement
    ratios = step / weights
    if not bool(((ratios > -1.0) & torch.isfinite(ratios)).all()):
        return None, decrement
    change = step @ g_w + 0.5 * (step @ gramian @ step) - _barrier_change(weights, ratios, power)
    if not float(change) < 0:
        return None, decrement
    return weights + step, decrement


def _converged(moved: Tensor, weights: Tensor, decrement: Tensor, power: float) -> bool:
    """Whether the step just taken ended the solve: it moved no weight by more than
    round-off (Newton's method converges quadratically, so later steps would move them
    less), or, for ``p = 1``, the Newton decrement before it was below
    :data:`SETTLED_DECREMENT`."""
    if power == 1.0 and float(decrement) <= SETTLED_DECREMENT:
        return True
    return bool((moved.abs() <= CONVERGED * weights).all())


def _ridged(system: Tensor, active: Tensor) -> Tensor:
    """``system + r diag(G_ii)`` (active tasks) with the smallest ``r`` of :data:`RIDGES` that
    leaves it positive definite (the last one if none does)."""
    diagonal = torch.where(active, system.diagonal(), 0.0)
    if host_linalg.reads_back(system):  # one factorisation, read back, usually suffices
        for ridge in RIDGES:
            candidate = system + torch.diag(ridge * diagonal)
            if int(torch.linalg.cholesky_ex(candidate).info) == 0:
                break
        return candidate
    ridges = upload(torch.tensor(RIDGES, dtype=system.dtype), system.device)
    candidates = system + torch.diag_embed(ridges[:, None] * diagonal)
    _, failures = torch.linalg.cholesky_ex(candidates)
    first_ok = torch.cat([failures != 0, failures.new_zeros(1, dtype=torch.bool)]).long().argmin()
    return at(candidates, first_ok.clamp(max=len(RIDGES) - 1))


def bargaining_weights(
    gramian: Tensor, power: float, iterations: int, initial: Tensor | None = None
) -> Tensor:
    """The positive ``w`` with ``G w = w^(-power)`` (float64 ``[m]`` on ``G``'s device).

    Args:
        gramian: the Gramian ``G = J J^T`` (``m x m``).
        power: the exponent ``p > 0`` (Nash-MTL: 1; FairGrad: ``1 / alpha``).
        iterations: Newton iterations (each with its own line search).
        initial: a previous solution to warm-start from; it is used only when, rescaled
            optimally along its ray, it has a lower potential than the cold start.

    Tasks with a zero gradient get weight 0; all weights are 0 if every gradient is zero.
    On the CPU with at most :data:`~mtlopt.solvers.host_linalg.HOST_MAX_TASKS` tasks the
    solve runs on Python floats first (:mod:`mtlopt.solvers.bargaining_host`).
    """
    if host_linalg.on_host(gramian):
        solved = bargaining_on_host(
            gramian.to(torch.float64).tolist(),
            power,
            iterations,
            None if initial is None else initial.to(torch.float64).tolist(),
            RIDGES,
            ZERO_NORM,
            CONVERGED,
            SETTLED_DECREMENT,
        )
        if solved is not None:
            return torch.tensor(solved, dtype=torch.float64)
    gramian = 0.5 * (gramian + gramian.T).to(torch.float64)
    m = gramian.shape[0]
    diagonal = gramian.diagonal().clamp(min=0)
    largest = diagonal.amax()
    active = diagonal > largest * ZERO_NORM**2
    active = active & (largest > 0)
    # The problem is scale-covariant: solve with max diag G = 1, rescale w at the end.
    unit = torch.where(largest > 0, largest, torch.ones_like(largest))
    normalised = gramian / unit
    both = active[:, None] & active[None, :]
    eye = torch.eye(m, dtype=torch.float64, device=gramian.device)
    # Zero-gradient tasks become decoupled dummies (their w = 1 is discarded at the end).
    system = _ridged(torch.where(both, normalised, eye), active)

    cold_direction = system.diagonal().pow(-1.0 / (1.0 + power))
    if initial is None:
        weights = _ray_minimum(cold_direction.unsqueeze(0), system, power)[0][0]
    else:
        previous = initial.to(device=gramian.device, dtype=torch.float64)
        usable = active & torch.isfinite(previous) & (previous > 0)
        warm_direction = torch.where(usable, previous, cold_direction)
        starts, potentials = _ray_minimum(
            torch.stack([cold_direction, warm_direction]), system, power
        )
        cold, warm = starts
        better = torch.isfinite(potentials[1]) & (potentials[1] < potentials[0])
        better = better & torch.isfinite(warm).all() & (warm > 0).all()
        weights = torch.where(better, warm, cold)

    on_cpu = host_linalg.reads_back(weights)
    for _ in range(iterations):
        stepped, decrement = _full_newton_step(weights, system, power) if on_cpu else (None, None)
        if stepped is None:
            stepped, decrement = _newton_step(weights, system, power)
        moved = stepped - weights
        weights = stepped
        # On the CPU, where reading a test back costs no synchronisation, stop once
        # converged (see SETTLED_DECREMENT), saving the iteration that would only confirm it.
        if on_cpu and _converged(moved, weights, decrement, power):
            break

    weights = weights * unit.pow(-1.0 / (1.0 + power))
    return torch.where(active, weights, torch.zeros_like(weights))
