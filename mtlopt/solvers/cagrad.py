"""CAGrad's inner problem: ``min_{w in simplex} w^T G 1/m + r sqrt(w^T G w)``.

With ``g_w = J^T w`` and ``g_0 = J^T 1/m`` this is ``f(w) = g_w^T g_0 + r ||g_w||`` (the dual
of CAGrad's conflict-averse problem; IMGrad solves the same problem with another ``r``). The
objective is convex but not smooth where ``g_w = 0``, which gradient and Frank-Wolfe methods
approach slowly. The solver instead writes the norm as a second-order cone,
``min b^T w + r t`` over ``{w in simplex, ||g_w|| <= t}``, and follows the central path of
the log barrier ``-log(t^2 - w^T G w) - sum_i log w_i`` (barrier parameter ``m + 2``) with
Newton's method. The cone variable is minimised out in closed form: for the path parameter
``tau`` and ``beta = tau r``, ``min_t tau r t - log(t^2 - q)`` equals, up to a constant,
``R(q) = s - log(1 + s)`` with ``s = sqrt(1 + beta^2 q)``, which is smooth everywhere
(``g_w = 0`` and ``r = 0`` included). So each Newton step works on ``w`` alone::

    psi(w) = tau b^T w + R(w^T G w) - sum_i log w_i,   subject to sum_i w_i = 1.

Every barrier minimiser is ``(m + 2) / tau``-optimal. ``tau`` grows by ``TAU_GROWTH`` per
stage up to ``(m + 2) 30^9`` (a gap of about ``5e-14`` of the objective's scale), each stage
a few Newton steps with a line search (all candidate step lengths evaluated at once, as
differences of ``psi`` so that comparisons stay exact at large ``tau``). A final polish runs
Newton's method on the objective itself, restricted to the support the barrier found; it is
kept only if it stays on the simplex and is no worse, and takes the weights from about
``1e-8`` to round-off wherever the minimiser is unique. Off the CPU: fixed iteration count,
no host synchronisation, float64 on the Gramian's device. (Eight Newton steps per stage:
with four, the iterates fall behind the path with tens of tasks, relative gaps up to
``1e-3`` at ``m = 40``, which the polish cannot repair; eight keep them below ``1e-7``.)

On CPU the solver stops as soon as it can prove its answer
(:mod:`mtlopt.solvers.cagrad_cpu`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..nosync import at
from .host_linalg import reads_back

#: Path stages: ``tau = TAU_GROWTH^k``, ``k = 0 .. STAGES - 1``, times ``m + 2``.
STAGES = 10
TAU_GROWTH = 30.0
#: Newton steps per stage.
NEWTON_STEPS = 4
#: Newton steps per stage off the CPU (no early stop there): four fall behind the path with
#: tens of tasks.
FIXED_NEWTON_STEPS = 8
#: Step lengths tried by the line search: 1, 1/2, ..., 2^-(LINE_SEARCH_STEPS - 1).
LINE_SEARCH_STEPS = 40


def _newton_step(
    weights: Tensor, gramian: Tensor, linear: Tensor, radius: Tensor, tau: float
) -> Tensor:
    """One damped Newton step on ``psi`` restricted to ``sum w = 1``."""
    beta2 = (tau * radius) ** 2
    g_w = gramian @ weights
    quadratic = (weights @ g_w).clamp(min=0)
    root = torch.sqrt(1.0 + beta2 * quadratic)
    coupling = beta2 / (1.0 + root)
    gradient = tau * linear + coupling * g_w - 1.0 / weights
    hessian = coupling * (gramian - (beta2 / (root * (1.0 + root))) * torch.outer(g_w, g_w))
    hessian = hessian + torch.diag(1.0 / weights**2)
    # Equilibrate (the barrier's curvature spans many orders of magnitude near the optimum),
    # then eliminate the multiplier of sum w = 1.
    # Adding a multiple of 1 to the gradient does not change the step on the simplex;
    # centring it first keeps the elimination free of cancellation at large tau.
    gradient = gradient - gradient.mean()
    scale = hessian.diagonal().clamp(min=1e-300).rsqrt()
    balanced = hessian * scale[:, None] * scale[None, :]
    rhs = torch.stack([-gradient * scale, scale], dim=-1)
    solved, _ = torch.linalg.solve_ex(balanced, rhs)
    descent, ones = scale * solved[:, 0], scale * solved[:, 1]
    step = descent - (descent.sum() / ones.sum()) * ones
    step = step - (step.sum() / ones.sum()) * ones  # one refinement of sum(step) = 0

    lengths = torch.pow(
        0.5, torch.arange(LINE_SEARCH_STEPS, dtype=weights.dtype, device=weights.device)
    )
    ratios = lengths[:, None] * (step / weights)[None, :]
    feasible = (ratios > -1.0).all(-1) & torch.isfinite(ratios).all(-1)
    ratios = torch.where(feasible[:, None], ratios, torch.zeros_like(ratios))
    d_quadratic = 2.0 * lengths * (step @ g_w) + lengths**2 * (step @ gramian @ step)
    new_root = torch.sqrt((1.0 + beta2 * (quadratic + d_quadratic)).clamp(min=1.0))
    d_root = beta2 * d_quadratic / (new_root + root)
    change = (
        tau * lengths * (step @ linear)
        + d_root
        - torch.log1p(d_root / (1.0 + root))
        - torch.log1p(ratios).sum(-1)
    )
    change = torch.where(feasible & torch.isfinite(change), change, torch.inf)
    best = change.argmin()
    candidate = weights * (1.0 + at(ratios, best))
    candidate = candidate / candidate.sum()
    accept = (at(change, best) < 0) & torch.isfinite(candidate).all() & (candidate > 0).all()
    return torch.where(accept, candidate, weights)


def _objective(weights: Tensor, gramian: Tensor, linear: Tensor, radius: Tensor) -> Tensor:
    quadratic = ((weights @ gramian) * weights).sum(-1).clamp(min=0)
    return weights @ linear + radius * quadratic.sqrt()


#: Newton steps of the final polish on the support (see ``_polish``).
POLISH_STEPS = 4
#: Weights above this count as the support of the solution when polishing.
SUPPORT = 1e-9


def _polish(weights: Tensor, gramian: Tensor, linear: Tensor, radius: Tensor) -> Tensor:
    """Newton's method on the objective itself, on the support the barrier identified.

    On the support the problem is smooth (where ``g_w != 0``) with one equality
    constraint, so a few full Newton steps from the barrier's ``1e-6``-accurate point reach
    round-off. The result replaces the barrier's only if it stays on the simplex and its
    objective is no worse.
    """
    m = weights.shape[0]
    support = weights > SUPPORT
    eye = torch.eye(m, dtype=weights.dtype, device=weights.device)
    both = support[:, None] & support[None, :]
    border = support.to(weights.dtype)
    polished = torch.where(support, weights, torch.zeros_like(weights))
    polished = polished / polished.sum()
    for _ in range(POLISH_STEPS):
        g_w = gramian @ polished
        norm = ((polished @ g_w).clamp(min=0)).sqrt().clamp(min=1e-300)
        gradient = linear + radius * g_w / norm
        hessian = radius * (gramian / norm - torch.outer(g_w, g_w) / norm**3)
        hessian = torch.where(both, hessian, eye)
        system = torch.cat(
            [
                torch.cat([hessian, border[:, None]], dim=1),
                torch.cat([border, torch.zeros_like(border[:1])])[None, :],
            ]
        )
        rhs = torch.cat([torch.where(support, -gradient, 0.0), torch.zeros_like(border[:1])])
        solved, _ = torch.linalg.solve_ex(system, rhs)
        polished = polished + torch.where(support, solved[:m], 0.0)
    ok = torch.isfinite(polished).all() & (polished >= 0).all()
    ok = ok & ((polished.sum() - 1.0).abs() < 1e-12)
    safe = torch.where(ok, polished, weights)
    slack = 1e-15 * (linear.abs().sum() + radius)
    better = _objective(safe, gramian, linear, radius) <= (
        _objective(weights, gramian, linear, radius) + slack
    )
    return torch.where(ok & better, safe, weights)


def conflict_averse_weights(
    gramian: Tensor, radius: Tensor | float, *, early_exit: bool | None = None
) -> Tensor:
    """``argmin_{w in simplex} w^T G 1/m + radius * sqrt(w^T G w)`` (float64 ``[m]``).

    Args:
        gramian: ``G = J J^T`` (``m x m``, any scale: it is normalised first).
        radius: ``r >= 0`` in the units of a gradient norm (CAGrad: ``c ||g_0||``); a
            scalar tensor or a float.
        early_exit: stop once the answer is certified (see "On CPU" in the module
            docstring; it reads values back to the host). Default: on CPU only; ``False``
            runs the fixed-count, synchronisation-free path of the other devices.

    All-zero ``G`` gives the uniform weights. Where the minimiser is not unique (duplicate
    rows, or ``r = 0`` with ties) the weights returned are one minimiser.
    """
    gramian = 0.5 * (gramian + gramian.T).to(torch.float64)
    m = gramian.shape[0]
    device = gramian.device
    radius = torch.as_tensor(radius, dtype=torch.float64, device=device).clamp(min=0)
    uniform = torch.full((m,), 1.0 / m, dtype=torch.float64, device=device)
    if m == 1:
        return uniform
    largest = gramian.diagonal().amax()
    zero = largest <= 0
    unit = torch.where(zero, torch.ones_like(largest), largest)
    normalised = gramian / unit
    radius = radius / unit.sqrt()
    # Objective divided by (1 + r): of order one whatever r, so one tau schedule fits all.
    linear = normalised.mean(1) / (1.0 + radius)
    radius = radius / (1.0 + radius)
    if early_exit if early_exit is not None else reads_back(gramian):
        if bool(zero):
            return uniform
        from .cagrad_cpu import solve_on_cpu  # it builds on this module's pieces

        return solve_on_cpu(normalised, linear, float(radius))
    weights = uniform
    for stage in range(STAGES):
        tau = (m + 2.0) * TAU_GROWTH**stage
        for _ in range(FIXED_NEWTON_STEPS):
            weights = _newton_step(weights, normalised, linear, radius, tau)
    weights = _polish(weights, normalised, linear, radius)
    return torch.where(zero, uniform, weights)
