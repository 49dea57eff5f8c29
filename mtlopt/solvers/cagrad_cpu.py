"""CAGrad's inner problem on the CPU: stop as soon as the answer is proven.

The problem and the barrier path are those of :mod:`mtlopt.solvers.cagrad`. Reading a value
back costs nothing on the CPU, so this solver stops as soon as it can *prove* its answer,
and otherwise does what the fixed path does:

* **Certificate.** For weights with ``g_w != 0``, ``d = g_0 + r g_w / ||g_w||`` lies in
  CAGrad's ball, so weak duality gives ``f* >= min_i g_i^T d = min_i grad_i`` (``grad`` the
  gradient of ``f`` at ``w``), while ``f(w) = w^T grad`` (``f`` is 1-homogeneous). Hence
  ``f(w) - f* <= sum_i w_i (grad_i - min_j grad_j)``, computable from ``G``. Weights are
  returned early only if this bound is at most ``GAP_TOLERANCE``, the fixed path's own
  final gap ``(m + 2) / tau_last`` (normalised units), so an early answer always meets the
  full path's stated accuracy, and it is the end of a converged Newton iteration (weights
  to round-off where the minimiser is unique). The bound is only trusted where
  ``||g_w||^2 >= SMOOTH_QUADRATIC``: rounding in ``r G w / ||g_w||`` grows like
  ``1 / ||g_w||``.
* **Active set.** The candidates come from Newton's method on ``f`` restricted to a face
  of the simplex (smooth there): a step that would leave the simplex stops where the first
  weight reaches zero (those the full step would make negative leave the face), long
  steps are damped (Armijo), and at a face's minimiser the certificate either proves
  optimality or names the tasks to add back. It starts from the uniform weights (unless
  many tasks are linearly dependent), then from the end of each barrier stage on the
  support that stage suggests (the weights that did not halve over it: along the path
  inactive weights shrink like ``1 / tau``). How the candidates are found only decides
  how fast the solver is; only the certificate decides what it returns.
* **Barrier stages** end early once Newton's method has settled: no decrease found (the
  remaining steps of the stage would repeat the same no-op) or a full step with
  ``lambda^2 <= NEWTON_SETTLED`` (``psi`` is self-concordant, so the next decrement would
  be of order ``lambda^4``, below round-off). Steps with ``lambda <= 1/2`` skip the line
  search (the full step decreases ``psi`` and keeps every weight positive), others search
  the same step lengths in order and stop at the first rise (``psi`` is convex along the
  step). If no stage ends in a certificate, the answer is the barrier's with the fixed
  path's polish, as elsewhere.
* **Exact reductions.** Tasks whose gradient is exactly zero are set aside (the minimum
  is the other tasks' if it is negative, else 0 on these: ``f`` is 1-homogeneous);
  ``r = 0`` gives the best vertex; and weights with ``g_w = 0`` (``f = 0``) are returned
  where ``d = (1 - t) g_0`` proves ``f* >= 0`` (every ``g_i^T g_0 >= 0``, ``t = 0``; or
  ``r >= ||g_0||``, ``t = 1``) and the min-norm point of the task gradients' convex hull
  is 0 to the resolution of ``G`` (``||g_w||^2 <= ZERO_QUADRATIC``, normalised; the
  objective is then known to about ``r ||g_w||``, as for the barrier's answer there).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import host_linalg
from .cagrad import LINE_SEARCH_STEPS, NEWTON_STEPS, STAGES, TAU_GROWTH, _polish
from .cagrad_host import Limits, active_set_on_host

#: Squared Newton decrement up to which a barrier step is taken in full, without a line
#: search: ``psi`` is self-concordant, so for ``lambda <= 1/2`` the full step stays inside
#: the Dikin ellipsoid (every weight positive) and decreases ``psi``.
FULL_STEP = 0.25
#: Squared Newton decrement below which a full step ends its stage: the next one would be
#: of order ``lambda^4 <= 1e-32``, below round-off.
NEWTON_SETTLED = 1e-16
#: Step lengths evaluated together by the CPU line search.
LINE_SEARCH_BLOCK = 3
#: Certified duality gap accepted on CPU: the barrier's final bound ``(m + 2) / tau_last``
#: (normalised units, where every term of the objective is at most 1).
GAP_TOLERANCE = TAU_GROWTH ** -(STAGES - 1)
#: Support guessed from a barrier stage: the weights that shrank by less than this factor
#: over it (inactive weights shrink like ``1 / tau`` along the path, active ones settle).
SUPPORT_RATIO = 0.5
#: Newton steps of one active-set run.
ACTIVE_SET_STEPS = 12
#: A face's Newton iteration has converged when a step is this small, or when the
#: quadratic-convergence model predicts the next one to be.
FACE_CONVERGED = 1e-14
#: Steps of the active-set method longer than this are damped by a line search.
UNDAMPED = 1e-6
#: Sufficient decrease (Armijo) of that line search, and its shortest trial.
ARMIJO = 1e-4
DAMPING_FLOOR = 1e-10
#: ``||g_w||^2`` (normalised units) below which the objective counts as not smooth: its
#: gradient ``r G w / ||g_w||`` carries a rounding error of about ``1e-16 r / ||g_w||``,
#: too much for the certificate to mean anything.
SMOOTH_QUADRATIC = 1e-8
#: ``||g_w||^2`` up to which a min-norm point counts as ``g_w = 0``: a little above the
#: rounding error of ``w^T G w`` itself (``||g_w|| <= 3e-8`` of the largest task norm).
ZERO_QUADRATIC = 1e-15
#: Smallest relative Cholesky pivot ``L_ii^2 / A_ii`` trusted; below it a face's system is
#: treated as singular (duplicate or dependent tasks) and solved by ``eigh``.
CHOLESKY_PIVOT = 1e-12


def _barrier_change(
    length: float,
    barrier: float,
    slopes: tuple[float, float, float],
    quadratic: float,
    root: float,
    beta2: float,
    tau: float,
) -> float:
    """``psi(w + length step) - psi(w)`` from scalars, as in :func:`_newton_step`
    (``barrier = sum_i log(1 + length step_i / w_i)``)."""
    slope_q, curvature_q, slope_b = slopes
    d_quadratic = beta2 * length * (2.0 * slope_q + length * curvature_q)
    new_root = math.sqrt(max(1.0 + beta2 * quadratic + d_quadratic, 1.0))
    d_root = d_quadratic / (new_root + root)
    if not d_root / (1.0 + root) > -1.0:  # rounded past the cone's boundary, or NaN
        return math.inf
    change = tau * length * slope_b + d_root - math.log1p(d_root / (1.0 + root)) - barrier
    return change if math.isfinite(change) else math.inf


def _newton_step_on_cpu(
    weights: Tensor, gramian: Tensor, linear: Tensor, radius: float, tau: float, ones: Tensor
) -> tuple[Tensor, bool]:
    """:func:`_newton_step` with fewer tensor operations: Python scalars, no line search
    where self-concordance makes the full step safe, otherwise the same step lengths
    searched in order (``psi`` is convex along the step, so its values there fall, then
    rise: the first rise ends the search). Also says whether the stage has settled: no
    decrease found (every later step of the stage would repeat this no-op) or a full step
    with ``lambda^2 <= NEWTON_SETTLED``."""
    beta2 = (tau * radius) ** 2
    g_w = gramian @ weights
    quadratic = max(float(weights @ g_w), 0.0)
    root = math.sqrt(1.0 + beta2 * quadratic)
    coupling = beta2 / (1.0 + root)
    inverse = weights.reciprocal()
    gradient = (linear * tau).add_(g_w, alpha=coupling).sub_(inverse)
    gradient.sub_(gradient.mean())  # see _newton_step
    hessian = torch.addr(
        gramian, g_w, g_w, beta=coupling, alpha=-coupling * beta2 / (root * (1.0 + root))
    )
    hessian.diagonal().add_(inverse.square())
    rhs = torch.stack([gradient, ones], dim=1)
    # Cholesky's accuracy does not depend on the diagonal scaling _newton_step applies.
    factor, info = torch.linalg.cholesky_ex(hessian)
    if int(info) == 0:
        solved = torch.cholesky_solve(rhs, factor)
    else:  # not positive definite in floating point: equilibrated LU, as _newton_step
        scale = hessian.diagonal().clamp(min=1e-300).rsqrt()
        balanced = hessian * torch.outer(scale, scale)
        solved, _ = torch.linalg.solve_ex(balanced, rhs * scale[:, None])
        solved = solved * scale[:, None]
    along_gradient, along_ones = solved.sum(0).tolist()  # columns: H^-1 gradient, H^-1 1
    if not (math.isfinite(along_gradient) and math.isfinite(along_ones) and along_ones != 0):
        return weights, True  # _newton_step rejects a non-finite step too
    step = torch.add(solved[:, 0], solved[:, 1], alpha=-along_gradient / along_ones).neg_()
    step.sub_(solved[:, 1], alpha=float(step.sum()) / along_ones)  # refine sum(step) = 0
    decrement = -float(gradient @ step)  # lambda^2 = step^T H step
    if decrement <= FULL_STEP:
        candidate = weights + step
        if float(candidate.min()) > 0.0:
            return candidate / candidate.sum(), decrement <= NEWTON_SETTLED
    relative = step / weights
    lowest = float(relative.min())
    if not math.isfinite(lowest):
        return weights, True
    smallest = 0.5 ** (LINE_SEARCH_STEPS - 1)
    length = 1.0  # the longest step length of the grid that keeps every weight positive
    while length >= smallest and length * lowest <= -1.0:
        length *= 0.5
    slopes = tuple((torch.stack([g_w, gramian @ step, linear]) @ step).tolist())
    best_length, best_change = 0.0, math.inf
    rising = False
    while length >= smallest and not rising:
        block = [length * 0.5**k for k in range(LINE_SEARCH_BLOCK)]
        block = [trial for trial in block if trial >= smallest]
        trials = weights.new_tensor(block)
        barriers = torch.log1p(torch.outer(trials, relative)).sum(1).tolist()
        for trial, barrier in zip(block, barriers):
            change = _barrier_change(trial, barrier, slopes, quadratic, root, beta2, tau)
            if change >= best_change:
                rising = True
                break
            best_length, best_change = trial, change
        length = block[-1] * 0.5
    if not best_change < 0.0:
        return weights, True  # no decrease: every later step of this stage is the same
    candidate = weights * relative.mul_(best_length).add_(1.0)
    return candidate / candidate.sum(), False


def _tangent_newton(
    hessian: Tensor, gradient: Tensor, shift: float, ones: Tensor
) -> tuple[Tensor, int]:
    """The step ``x`` with ``H x + nu 1 = -gradient``, ``1^T x = 0``; the minimum-norm one
    where ``H`` is singular on the tangent space (duplicate or dependent tasks).

    ``H`` (overwritten) is PSD; the objective is 1-homogeneous, so ``H w = 0``. Adding
    ``shift 1 1^T`` leaves its quadratic form on ``1^T x = 0`` unchanged and makes it
    definite unless it is singular there too. Also returns the dimension of the null space
    found (0 where Cholesky sufficed).
    """
    system = hessian.add_(shift)
    rhs = torch.stack([gradient - gradient.mean(), ones], dim=1)
    factor, info = torch.linalg.cholesky_ex(system)
    pivot = float((factor.diagonal().square() / system.diagonal()).min())
    nullity = 0
    if int(info) == 0 and pivot > CHOLESKY_PIVOT:
        solved = torch.cholesky_solve(rhs, factor)
    else:  # pseudo-inverse of the equilibrated system
        scale = system.diagonal().clamp(min=1e-300).rsqrt()[:, None]
        values, vectors = torch.linalg.eigh(system * scale * scale.T)
        cutoff = CHOLESKY_PIVOT * float(values.abs().max())
        kept = values > cutoff
        nullity = int(kept.logical_not().sum())
        inverse = torch.where(kept, values.reciprocal(), 0.0)[:, None]
        solved = vectors @ (inverse * (vectors.T @ (rhs * scale))) * scale
    along_gradient, along_ones = solved.sum(0).tolist()
    if along_ones == 0.0:
        along_ones = math.nan
    step = torch.add(solved[:, 0], solved[:, 1], alpha=-along_gradient / along_ones).neg_()
    return step, nullity


def _damped_length(
    longest: float,
    step: Tensor,
    g_w: Tensor,
    gramian: Tensor,
    linear: Tensor,
    quadratic: float,
    radius: float,
) -> float | None:
    """The longest of ``longest, longest / 2, ...`` along which the objective falls by
    Armijo's rule (far from the minimiser Newton's step can overshoot and cycle). Along
    the step ``||g_w||^2`` is the quadratic ``q + 2 l d^T G w + l^2 d^T G d``, so every
    trial costs a few floating-point operations."""
    slope_q, curvature_q, slope_b = (torch.stack([g_w, gramian @ step, linear]) @ step).tolist()
    norm = math.sqrt(quadratic)
    derivative = slope_b + radius * slope_q / norm
    if not derivative < 0.0:
        return None
    length = longest
    while length > DAMPING_FLOOR:
        d_quadratic = length * (2.0 * slope_q + length * curvature_q)
        new_norm = math.sqrt(max(quadratic + d_quadratic, 0.0))
        change = length * slope_b + radius * d_quadratic / (new_norm + norm)
        if change <= ARMIJO * length * derivative:
            return length
        length *= 0.5
    return None


def _active_set(
    start: Tensor,
    free: Tensor,
    gramian: Tensor,
    linear: Tensor,
    radius: float,
    min_norm: bool = False,
    max_nullity: float = math.inf,
) -> Tensor | None:
    """A primal active-set method from ``start`` restricted to the tasks ``free``: Newton
    steps on the current face of the simplex (the objective is smooth there where
    ``g_w != 0``); a step that would leave the simplex stops at the first weight to reach
    zero, and the weights the full step would have made negative leave the face; at a
    face's minimiser the duality certificate either proves optimality or names the tasks
    to add back.

    With ``min_norm`` the objective is ``w^T G w`` instead (the min-norm point of the
    convex hull of the task gradients), and the face's minimiser is returned once no task
    improves on it. None where no certificate came within ``ACTIVE_SET_STEPS`` steps,
    where ``||g_w||`` fell below the smooth range, or where a face's Hessian has more than
    ``max_nullity`` null directions (tasks far from independent: a face with many of them
    shrinks one weight per step, and the barrier finds the support faster).
    """
    free = free.clone()
    weights = torch.where(free, start, 0.0)
    weights = weights / weights.sum()
    previous = math.inf
    changed = True
    for _ in range(ACTIVE_SET_STEPS):
        if changed:
            index = free.nonzero().squeeze(1)
            sub_gramian = gramian.index_select(0, index).index_select(1, index)
            sub_linear = linear.index_select(0, index)
            sub = weights.index_select(0, index)
            ones = torch.ones_like(sub)
            changed = False
        g_w = sub_gramian @ sub
        if min_norm:
            step, _ = _tangent_newton(sub_gramian.clone(), g_w, 1.0, ones)
        else:
            quadratic = float(sub @ g_w)
            if not quadratic > SMOOTH_QUADRATIC:
                return None
            curvature = radius / math.sqrt(quadratic)
            gradient = torch.add(sub_linear, g_w, alpha=curvature)
            hessian = torch.addr(
                sub_gramian, g_w, g_w, beta=curvature, alpha=-curvature / quadratic
            )
            step, nullity = _tangent_newton(hessian, gradient, curvature or 1.0, ones)
            if nullity > max_nullity:
                return None
        steps = step.tolist()
        length = max(map(abs, steps))
        if not math.isfinite(length):
            return None
        ratio, block = 1.0, -1  # ratio test: the longest feasible fraction of the step
        for i, (w_i, d_i) in enumerate(zip(sub.tolist(), steps)):
            if d_i < 0.0 and w_i + ratio * d_i <= 0.0:
                ratio, block = w_i / -d_i, i
        if not min_norm and length > UNDAMPED:
            damped = _damped_length(ratio, step, g_w, sub_gramian, sub_linear, quadratic, radius)
            if damped is None:
                return None
            if damped < ratio:
                sub = sub + damped * step
                previous = math.inf
                continue
        if block >= 0:
            leaving = sub + step <= 0.0
            leaving[block] = True
            sub = torch.where(leaving, 0.0, sub + ratio * step)
            weights = torch.zeros_like(weights).index_copy_(0, index, sub / sub.sum())
            free[index[leaving]] = False
            changed, previous = True, math.inf
            continue
        sub = sub + step
        # Newton's method converges quadratically: the next step is about
        # length * (length / previous)^2.
        converged = min_norm or length <= FACE_CONVERGED  # Newton is exact on a quadratic
        converged = converged or (
            previous < math.inf and length * (length / previous) ** 2 <= FACE_CONVERGED
        )
        previous = length
        if not converged:
            continue
        weights = torch.zeros_like(weights).index_copy_(0, index, sub / sub.sum())
        g_w = gramian @ weights
        quadratic = float(weights @ g_w)
        if min_norm:
            # w^T G w is minimal over the simplex iff no (G w)_i is below it.
            violators = (g_w < quadratic - GAP_TOLERANCE) & ~free
            if not bool(violators.any()):
                return weights
        else:
            if not quadratic > SMOOTH_QUADRATIC:
                return None
            gradient = torch.add(linear, g_w, alpha=radius / math.sqrt(quadratic))
            # Weak duality with d = g_0 + r g_w / ||g_w||: f* >= min_i g_i^T d =
            # min_i gradient_i, and f(w) = w^T gradient.
            value = float(weights @ gradient)
            if value - float(gradient.min()) <= GAP_TOLERANCE:
                return weights
            violators = (gradient < value - GAP_TOLERANCE) & ~free
            if not bool(violators.any()):
                return None
        free |= violators
        changed, previous = True, math.inf
    return None


def host_limits() -> Limits:
    """This module's constants, read now, for :func:`active_set_on_host`."""
    return Limits(
        ACTIVE_SET_STEPS,
        SMOOTH_QUADRATIC,
        UNDAMPED,
        FACE_CONVERGED,
        GAP_TOLERANCE,
        CHOLESKY_PIVOT,
        ARMIJO,
        DAMPING_FLOOR,
    )


def _zero_direction_weights(gramian: Tensor, linear: Tensor, radius: float) -> Tensor | None:
    """Weights with ``g_w = 0`` where they are provably optimal, else None.

    The objective is 0 there. It is never below 0 when ``u = -t g_0 / r``
    (``||u|| <= 1``) gives the dual bound ``min_i (1 - t) g_i^T g_0 >= 0``: when every
    ``g_i^T g_0 >= 0`` (``t = 0``) or when ``r >= ||g_0||`` (``t = 1``, CAGrad's
    ``c >= 1``). Such weights exist iff the min-norm point of the convex hull of the task
    gradients is 0.
    """
    lowest = float(linear.min())
    unscaled = radius / (1.0 - radius)  # r before the objective's division by 1 + r
    wide = unscaled * unscaled >= float(linear.mean()) / (1.0 - radius)  # r >= ||g_0||
    # Without wide, g_w = 0 needs some g_i^T g_0 <= 0, and the bound needs all >= 0.
    if not (wide or abs(lowest) <= GAP_TOLERANCE):
        return None
    uniform = torch.full_like(linear, 1.0 / linear.shape[0])
    weights = _active_set(uniform, uniform > 0, gramian, linear, radius, min_norm=True)
    if weights is None or not float(weights @ gramian @ weights) <= ZERO_QUADRATIC:
        return None
    return weights


def solve_on_cpu(gramian: Tensor, linear: Tensor, radius: float) -> Tensor:
    """Certified shortcuts first (tasks with zero gradients set aside, ``g_w = 0``, the
    active-set method from the uniform weights), then the barrier stages, each followed by
    an active-set attempt on the support it suggests; the barrier's own answer (with the
    fixed path's polish) where nothing is certified."""
    m = gramian.shape[0]
    if m == 1:
        return torch.ones_like(linear)
    zero_rows = (gramian == 0).all(1)
    zero_count = int(zero_rows.sum())
    if 0 < zero_count < m:
        # f is 1-homogeneous and such a task adds nothing to g_w: f((1 - s) v + s z) =
        # (1 - s) f(v) for weights v on the other tasks and z on these. So the minimum is
        # the other tasks' if it is negative, else 0, on these tasks.
        keep = (~zero_rows).nonzero().squeeze(1)
        sub_gramian = gramian.index_select(0, keep).index_select(1, keep)
        sub_linear = linear.index_select(0, keep)
        sub = solve_on_cpu(sub_gramian, sub_linear, radius)
        quadratic = max(float(sub @ sub_gramian @ sub), 0.0)
        value = float(sub @ sub_linear) + radius * math.sqrt(quadratic)
        if value < 0.0:
            return torch.zeros_like(linear).index_copy_(0, keep, sub)
        return zero_rows.to(linear.dtype) / zero_count
    if radius == 0.0:  # a linear objective: the best vertex, ties shared
        best = linear <= float(linear.min()) + GAP_TOLERANCE
        return best.to(linear.dtype) / int(best.sum())
    zero_direction = _zero_direction_weights(gramian, linear, radius)
    if zero_direction is not None:
        return zero_direction
    if host_linalg.on_host(linear):  # the first attempt below, on Python floats
        found = active_set_on_host(gramian.tolist(), linear.tolist(), radius, host_limits())
        if found is not None:
            return torch.tensor(found, dtype=linear.dtype, device=linear.device)
    ones = torch.ones_like(linear)
    weights = ones / m
    support = ones > 0
    tried: list[Tensor] = []
    for stage in range(-1, STAGES):
        if stage >= 0:
            tau = (m + 2.0) * TAU_GROWTH**stage
            start = weights
            for _ in range(NEWTON_STEPS):
                weights, settled = _newton_step_on_cpu(weights, gramian, linear, radius, tau, ones)
                if settled:
                    break
            support = weights > SUPPORT_RATIO * start
        if any(torch.equal(support, old) for old in tried):
            continue
        tried.append(support)
        # From the uniform weights every task starts on the face: with many dependent
        # tasks, leave them to the barrier.
        nullity = max(3, m // 4) if stage < 0 else math.inf
        polished = _active_set(weights, support, gramian, linear, radius, max_nullity=nullity)
        if polished is not None:
            return polished
    return _polish(weights, gramian, linear, gramian.new_tensor(radius))
