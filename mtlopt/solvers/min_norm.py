"""The min-norm point of a convex hull: ``min_w w^T G w`` over the probability simplex.

Also home of :func:`nonnegative_qp`, the small batched convex QP solver both this problem and
the dual-cone projection (:mod:`mtlopt.solvers.dual_cone`) reduce to:
``min 1/2 x^T Q x + c^T x`` over ``x >= 0`` (optionally with ``sum x = 1``).

Exact methods, batched, float64 on the input's device; off the CPU without host
synchronisation (every branch is a ``torch.where``, every loop has a fixed length):

* Few tasks (``batch * 2^m <= ENUMERATION_LIMIT``, 32 on the CPU): enumerate every support. On each face the
  optimality conditions are one small linear (KKT) system; all of them are solved in one
  batched LU, and the feasible face minimiser with the lowest objective is the optimum (the
  optimum's own face is among them, and every feasible candidate is an upper bound, so an
  inaccurate solve on a singular face can never win by mistake).
* More tasks, on the CPU: block principal pivoting (an active-set method that swaps every
  violating index at once, with a safeguard against cycling) on the same exact face systems;
  it reads its convergence flags on the host, which costs nothing there, and usually ends
  after 2 to 4 face solves. On the simplex its first face (every weight free) is tried
  first as one direct solve: the min-norm point of gradients that barely conflict has
  every weight positive, and is then found in a third of the time. A problem it has not
  solved within its swap budget (singular faces) goes to the interior point below.
* More tasks elsewhere: a primal-dual interior-point method (Mehrotra's predictor-corrector, Nocedal and
  Wright, "Numerical Optimization", 2nd ed., Sec. 16.6) for a fixed number of iterations,
  then one active-set "purification" step on the support it identified, kept when feasible
  and no worse. It converges superlinearly (round-off in about 20 iterations on these
  problems), unlike Frank-Wolfe, and is indifferent to rank deficiency: its Newton matrix
  ``Q + diag(s / x)`` stays positive definite.

Both are exact to round-off on well-posed problems and match scipy's generic solvers in the
tests, for rank-deficient, duplicate, zero and opposite rows alike.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import host_linalg
from .host_linalg import reads_back
from .min_norm_host import min_norm_on_host

#: Interior-point iterations; the duality gap shrinks by a factor of about 1e2 per iteration
#: once the iterates are near the central path, so this reaches round-off on every test case.
IPM_ITERATIONS = 25
#: Largest number of face systems (batch size times 2^m) solved by enumeration.
ENUMERATION_LIMIT = 2048
#: On the CPU pivoting is faster than enumeration beyond a few dozen faces.
CPU_ENUMERATION_LIMIT = 32
#: Use block principal pivoting on the CPU (off: the interior point, as on other devices).
PIVOT_ON_CPU = True
#: Block principal pivoting (CPU): swaps allowed, per task, before the interior point takes
#: over; swaps of several indices tolerated without progress; violation threshold (the
#: problem is scaled to order one).
PIVOT_LIMIT = 3
PIVOT_PATIENCE = 3
PIVOT_TOLERANCE = 1e-13
#: Ridge on the support's diagonal of each face system (``Q`` is scaled to order one): keeps
#: singular faces (duplicate or collinear rows) solvable, and moves regular ones by round-off.
FACE_RIDGE = 1e-14


def _max_step(values: Tensor, steps: Tensor) -> Tensor:
    """Largest ``alpha`` in [0, 1] with ``values + alpha * steps >= 0`` (per batch row)."""
    # -values / steps is negative or infinite where steps >= 0: those rows impose no limit.
    ratios = -values / steps
    ratios = torch.where(steps < 0, ratios, math.inf)
    return ratios.amin(-1).clamp(max=1.0)


class _NewtonSystem:
    """The Newton system of one iteration, factorised once for both Mehrotra solves.

    Solves ``H dx - 1 dlam = rhs``, ``1^T dx = -r_p`` (or ``H dx = rhs`` without the sum
    constraint). ``H`` is symmetrically equilibrated to unit diagonal first: its diagonal spans
    many orders of magnitude near the solution (``s_i / x_i`` tends to 0 or to infinity).
    """

    def __init__(
        self,
        x: Tensor,
        s: Tensor,
        hessian: Tensor,
        dual_residual: Tensor,
        primal_residual: Tensor | None,
    ) -> None:
        self.x, self.s, self.dual_residual = x, s, dual_residual
        self.scale = hessian.diagonal(dim1=-2, dim2=-1).clamp(min=1e-300).rsqrt()
        balanced = hessian * self.scale.unsqueeze(-1) * self.scale.unsqueeze(-2)
        eye = torch.eye(hessian.shape[-1], dtype=hessian.dtype, device=hessian.device)
        # A tiny ridge keeps LU away from exact singularity (duplicate rows, zero rows).
        self.lu, self.pivots, _ = torch.linalg.lu_factor_ex(balanced + 1e-15 * eye)
        self.primal_residual = primal_residual
        if primal_residual is not None:
            self.h_ones = self._solve(torch.ones_like(self.scale))
            self.ones_h_ones = self.h_ones.sum(-1).clamp(min=1e-300)

    def _solve(self, rhs: Tensor) -> Tensor:
        """``H^{-1} rhs`` through the equilibrated factorisation."""
        solved = torch.linalg.lu_solve(self.lu, self.pivots, (self.scale * rhs).unsqueeze(-1))
        return self.scale * solved.squeeze(-1)

    def solve(self, rhs: Tensor) -> tuple[Tensor, Tensor | None]:
        h_rhs = self._solve(rhs)
        if self.primal_residual is None:
            return h_rhs, None
        d_lambda = (-self.primal_residual - h_rhs.sum(-1)) / self.ones_h_ones
        return h_rhs + d_lambda.unsqueeze(-1) * self.h_ones, d_lambda

    def direction(self, complementarity: Tensor) -> tuple[Tensor, Tensor | None, Tensor]:
        """The step ``(dx, dlam, ds)`` that drives ``x * s`` towards ``x * s - complementarity``.

        (``ds`` is eliminated through the linearised complementarity ``s dx + x ds = -r_c``.)
        """
        x, s = self.x, self.s
        dx, dlam = self.solve(-self.dual_residual - complementarity / x)
        ds = (-complementarity - s * dx) / x
        return dx, dlam, ds


def _interior_point(quadratic: Tensor, linear: Tensor, on_simplex: bool) -> tuple[Tensor, Tensor]:
    """Mehrotra predictor-corrector for ``min 1/2 x^T Q x + c^T x``, ``x >= 0`` [, ``1^T x = 1``].

    ``quadratic`` is ``[m, m]``, ``linear`` is ``[b, m]``; returns ``x`` and the bound
    multipliers ``s`` (both ``[b, m]``).
    """
    batch, m = linear.shape
    x = torch.full_like(linear, 1.0 / m if on_simplex else 1.0)
    s = torch.ones_like(linear)
    lam = torch.zeros(batch, dtype=linear.dtype, device=linear.device)
    for _ in range(IPM_ITERATIONS):
        dual_residual = x @ quadratic + linear - s
        primal_residual = None
        if on_simplex:
            dual_residual = dual_residual - lam.unsqueeze(-1)
            primal_residual = x.sum(-1) - 1.0
        mu = (x * s).mean(-1, keepdim=True)
        # Converged to round-off (the problem is scaled to order one): stop moving, or the
        # inactive x_i would keep shrinking towards subnormal numbers (slow and useless).
        converged = (mu < 1e-20) & (dual_residual.abs().amax(-1, keepdim=True) < 1e-13)
        if primal_residual is not None:
            converged = converged & (primal_residual.abs().unsqueeze(-1) < 1e-13)
        hessian = quadratic + torch.diag_embed(s / x)
        system = _NewtonSystem(x, s, hessian, dual_residual, primal_residual)
        dx_aff, _, ds_aff = system.direction(x * s)
        alpha_p = _max_step(x, dx_aff).unsqueeze(-1)
        alpha_d = _max_step(s, ds_aff).unsqueeze(-1)
        mu_aff = ((x + alpha_p * dx_aff) * (s + alpha_d * ds_aff)).mean(-1, keepdim=True)
        sigma = (mu_aff / mu.clamp(min=1e-300)).clamp(0.0, 1.0) ** 3
        dx, dlam, ds = system.direction(x * s + dx_aff * ds_aff - sigma * mu)
        # Fraction to the boundary, tending to 1 as the gap closes (superlinear finish).
        tau = torch.clamp(1.0 - mu, min=0.9, max=1.0 - 1e-12)
        alpha_p = (tau * _max_step(x, dx).unsqueeze(-1)).clamp(max=1.0)
        alpha_d = (tau * _max_step(s, ds).unsqueeze(-1)).clamp(max=1.0)
        new_x = x + alpha_p * dx
        new_s = s + alpha_d * ds
        # Once converged to round-off the Newton system degenerates: freeze the iterate.
        # (NaN fails both comparisons; an infinite entry makes x * s infinite or NaN.)
        ok = ~converged & ((new_x > 0) & (new_s > 0) & (new_x * new_s < math.inf)).all(
            -1, keepdim=True
        )
        x = torch.where(ok, new_x, x)
        s = torch.where(ok, new_s, s)
        if on_simplex:
            assert dlam is not None
            lam = torch.where(ok.squeeze(-1), lam + alpha_d.squeeze(-1) * dlam, lam)
    return x, s


def _face_minimisers(
    quadratic: Tensor, linear_columns: Tensor, support: Tensor, on_simplex: bool
) -> Tensor:
    """Minimisers of the QP on the faces ``{x_i = 0 off the support}`` (bounds dropped).

    ``support`` is ``[p, m]`` (one face per system), ``linear_columns`` is ``[p, m, r]`` (``r``
    linear terms per face). Returns ``[p, m, r]``, zero off each support. On the support the
    conditions are ``Q_SS x_S + c_S (- lam 1) = 0`` (``, 1^T x_S = 1``); off it, a unit row
    pins ``x_i = 0``. LU without error checks: a singular face yields non-finite or useless
    values, which the callers' feasibility and objective tests reject.
    """
    p, m = support.shape
    both = support.unsqueeze(-1) & support.unsqueeze(-2)
    pin = torch.diag_embed(torch.where(support, FACE_RIDGE, 1.0))
    block = torch.where(both, quadratic, 0.0) + pin
    rhs = torch.where(support.unsqueeze(-1), -linear_columns, 0.0)
    if on_simplex:
        border = support.to(quadratic.dtype)
        corner = torch.zeros(p, 1, dtype=quadratic.dtype, device=quadratic.device)
        top = torch.cat([block, border.unsqueeze(-1)], dim=-1)
        block = torch.cat([top, torch.cat([border, corner], -1).unsqueeze(-2)], dim=-2)
        ones = torch.ones(p, 1, rhs.shape[-1], dtype=rhs.dtype, device=rhs.device)
        rhs = torch.cat([rhs, ones], dim=-2)
    lu, pivots, _ = torch.linalg.lu_factor_ex(block)
    solution = torch.linalg.lu_solve(lu, pivots, rhs)[:, :m]
    return torch.where(support.unsqueeze(-1), solution, 0.0)


def _objective(quadratic: Tensor, linear: Tensor, x: Tensor) -> Tensor:
    return 0.5 * ((x @ quadratic) * x).sum(-1) + (linear * x).sum(-1)


def _feasible(x: Tensor, on_simplex: bool) -> tuple[Tensor, Tensor]:
    """Whether each candidate is feasible, and the candidates with their sums made exact."""
    feasible = (x >= 0).all(-1) & torch.isfinite(x).all(-1)
    if on_simplex:
        total = x.sum(-1, keepdim=True)
        feasible = feasible & ((total.squeeze(-1) - 1.0).abs() < 1e-9)
        x = x / torch.where(feasible.unsqueeze(-1), total, 1.0)
    return feasible, x


def _enumerate_faces(quadratic: Tensor, linear: Tensor, on_simplex: bool) -> Tensor:
    """The exact optimum by trying every support (``2^m`` faces, all in one batched LU)."""
    batch, m = linear.shape
    device = linear.device
    codes = torch.arange(1 if on_simplex else 0, 2**m, device=device)
    bits = 2 ** torch.arange(m, device=device)
    support = (codes.unsqueeze(-1) & bits) != 0  # [faces, m]; the empty face is x = 0
    columns = linear.T.unsqueeze(0).expand(support.shape[0], m, batch)
    candidates = _face_minimisers(quadratic, columns, support, on_simplex).permute(2, 0, 1)
    feasible, candidates = _feasible(candidates, on_simplex)
    objective = _objective(quadratic, linear.unsqueeze(1), candidates)
    # Every feasible candidate bounds the optimum from above; the optimum's face attains it.
    objective = torch.where(feasible, objective, math.inf)
    best = objective.argmin(-1).reshape(batch, 1, 1).expand(batch, 1, m)
    return candidates.gather(1, best).squeeze(1)


def _purify(quadratic: Tensor, linear: Tensor, x: Tensor, s: Tensor, on_simplex: bool) -> Tensor:
    """One active-set step on the support ``{x_i > s_i}``; kept where feasible and no worse.

    This turns the interior point's ``1e-15``-sized entries into exact zeros.
    """
    support = x > s
    candidate = _face_minimisers(quadratic, linear.unsqueeze(-1), support, on_simplex)
    feasible, candidate = _feasible(candidate.squeeze(-1), on_simplex)
    if on_simplex:
        x = x / x.sum(-1, keepdim=True)
    # An inexact solve could still be "feasible" yet worse: compare objectives too.
    current = _objective(quadratic, linear, x)
    slack = 1e-15 * (1.0 + current.abs())
    better = _objective(quadratic, linear, candidate) <= current + slack
    return torch.where((feasible & better).unsqueeze(-1), candidate, x)


def _principal_pivoting(
    quadratic: Tensor, linear: Tensor, on_simplex: bool, first_face: Tensor | None = None
) -> tuple[Tensor, list[int]]:
    """Block principal pivoting (Judice and Pires, Comput. Oper. Res. 1994; the safeguard of
    Kim and Park, SIAM J. Sci. Comput. 2011): exact face solves, swapping every index that
    violates the optimality conditions, one at a time (the largest) after
    :data:`PIVOT_PATIENCE` swaps that did not reduce their number.

    Returns ``x`` and the problems (rows) that did not meet the optimality conditions
    (``x >= 0``, ``Qx + c (- lam) >= 0`` off the support) within :data:`PIVOT_LIMIT` ``* m``
    swaps. For the CPU: it keeps its bookkeeping (violation counts, patience) on the host,
    which costs nothing there, stops as soon as every problem is solved, and typically ends
    after 2 to 4 face solves. ``first_face``: the solution on the first face, when the
    caller has it already (:mod:`mtlopt.solvers.dual_cone_cpu`).
    """
    batch, m = linear.shape
    support = torch.ones_like(linear, dtype=torch.bool) if on_simplex else linear < 0
    # The violation threshold, relative to the sizes of c (here) and x (each iteration).
    linear_scale = PIVOT_TOLERANCE * (1.0 + linear.abs().amax(-1, keepdim=True))
    best_count = [m + 1] * batch
    patience = [PIVOT_PATIENCE] * batch
    counts = [m] * batch
    x = torch.zeros_like(linear)
    for step in range(PIVOT_LIMIT * m + 2):
        if step == 0 and first_face is not None:
            x = first_face
        else:
            x = _face_solution(quadratic, linear, support, on_simplex)
        slope = x @ quadratic + linear
        if on_simplex:  # the multiplier of sum x = 1: the slope on the support
            count = support.sum(-1, keepdim=True).clamp(min=1)
            slope = slope - torch.where(support, slope, 0.0).sum(-1, keepdim=True) / count
        tolerance = linear_scale * (1.0 + x.abs().amax(-1, keepdim=True))
        violated = (torch.where(support, x, slope) < -tolerance) | ~torch.isfinite(x)
        counts = violated.sum(-1).tolist()
        if not any(counts):
            break
        stalled = []
        for row, count in enumerate(counts):
            if count < best_count[row]:
                best_count[row], patience[row] = count, PIVOT_PATIENCE
            elif count:
                patience[row] -= 1
                if patience[row] < 0:
                    stalled.append(row)
        if stalled:  # out of patience: swap only the largest violating index (cannot cycle)
            index = torch.arange(m, device=linear.device)
            last = torch.where(violated[stalled], index, -1).amax(-1, keepdim=True)
            violated[stalled] = violated[stalled] & (index == last)
        support = support ^ violated  # a solved problem has no violation: it keeps its face
    return x.clamp(min=0), [row for row, count in enumerate(counts) if count]


def _face_solution(quadratic: Tensor, linear: Tensor, support: Tensor, on_simplex: bool) -> Tensor:
    """:func:`_face_minimisers` for one linear term per problem (``[b, m]`` in and out).

    Without the simplex's border the face systems are built by masking (``Q`` restricted
    to the support, a unit diagonal off it, the same ridge on it): the same matrices in
    12 tensor operations instead of 18 (and one LU call instead of two).
    """
    if on_simplex:
        return _face_minimisers(quadratic, linear.unsqueeze(-1), support, True).squeeze(-1)
    block = torch.where(support.unsqueeze(-1) & support.unsqueeze(-2), quadratic, 0.0)
    block.diagonal(dim1=-2, dim2=-1).add_(torch.where(support, FACE_RIDGE, 1.0))
    solved, _ = torch.linalg.solve_ex(block, torch.where(support, -linear, 0.0).unsqueeze(-1))
    return torch.where(support, solved.squeeze(-1), 0.0)


def nonnegative_qp(quadratic: Tensor, linear: Tensor, on_simplex: bool = False) -> Tensor:
    """Minimise ``1/2 x^T Q x + c^T x`` over ``x >= 0`` (and ``sum x = 1`` if ``on_simplex``).

    ``quadratic`` is a symmetric positive semi-definite ``[m, m]`` matrix, ``linear`` a ``[m]``
    vector or a ``[b, m]`` batch of them (one problem per row, same ``Q``). Both should be
    scaled to order one by the caller. Float64 in, float64 out, no host synchronisation.
    Enumerates the faces when ``b * 2^m <= ENUMERATION_LIMIT``, else runs the interior point.
    """
    squeeze = linear.dim() == 1
    rows = linear.unsqueeze(0) if squeeze else linear
    quadratic = 0.5 * (quadratic + quadratic.transpose(-1, -2))
    pivot = PIVOT_ON_CPU and reads_back(rows)
    faces = rows.shape[0] * 2 ** rows.shape[1]
    if faces <= (CPU_ENUMERATION_LIMIT if pivot else ENUMERATION_LIMIT):
        x = _enumerate_faces(quadratic, rows, on_simplex)
    elif pivot:
        x = _pivoted(quadratic, rows, on_simplex)
    else:
        x = _interior_point_solution(quadratic, rows, on_simplex)
    return x.squeeze(0) if squeeze else x


def _pivoted(
    quadratic: Tensor, rows: Tensor, on_simplex: bool, first_face: Tensor | None = None
) -> Tensor:
    """The CPU's exact method: pivoting, after a direct try of its first face on the
    simplex; the rare problem it leaves unsolved (singular faces) goes to the interior
    point. ``first_face``: as for :func:`_principal_pivoting`."""
    if on_simplex and (x := _full_face_on_simplex(quadratic, rows)) is not None:
        return x
    x, unsolved = _principal_pivoting(quadratic, rows, on_simplex, first_face)
    if unsolved:
        x[unsolved] = _interior_point_solution(quadratic, rows[unsolved], on_simplex)
    return x


def _full_face_on_simplex(quadratic: Tensor, linear: Tensor) -> Tensor | None:
    """Block principal pivoting's first face on the simplex, every weight free, solved
    directly (CPU: the answer is read back): the optimum of every problem when all its
    weights come out non-negative, else None (the caller pivots from there).

    On that face the optimality conditions are the equalities ``Q x + c = lam 1``,
    ``1^T x = 1`` (one bordered system for the whole batch, same ridge as
    :func:`_face_minimisers`); with no weight at its bound there is nothing else to check.
    The pivoting's own first iteration solves the same system, but through its generic
    face machinery: about 70 small tensor operations against 20 here (MGDA at m = 10:
    0.21 -> 0.08 ms).
    """
    m = quadratic.shape[-1]
    system = quadratic.new_ones(m + 1, m + 1)
    system[:m, :m] = quadratic
    system.diagonal()[:m] += FACE_RIDGE
    system[m, m] = 0.0
    rhs = torch.cat([-linear, linear.new_ones(linear.shape[0], 1)], dim=1)
    solution, _ = torch.linalg.solve_ex(system, rhs.T)
    x = solution[:m].T
    if not bool(((x >= 0) & torch.isfinite(x)).all()):
        return None
    return x


def _interior_point_solution(quadratic: Tensor, rows: Tensor, on_simplex: bool) -> Tensor:
    x, s = _interior_point(quadratic, rows, on_simplex)
    return _purify(quadratic, rows, x, s, on_simplex)


def min_norm_weights(gramian: Tensor) -> Tensor:
    """The weights of the min-norm point of the convex hull of the rows of ``J``.

    Returns ``w`` minimising ``w^T G w`` over ``{w >= 0, sum w = 1}`` for the Gramian
    ``G = J J^T`` (float64 ``[m]`` on ``G``'s device). The problem is scale-free, so ``G`` is
    divided by its largest diagonal entry first; any scale from 1e-10 to 1e15 gives the same
    weights. An all-zero ``G`` (every gradient zero) returns the uniform weights. Where the
    minimiser is not unique (duplicate, collinear or zero rows) the weights returned are a
    minimiser; the min-norm point ``w^T J`` itself is always unique. On the CPU with up to
    16 tasks an interior optimum is found on Python floats first
    (:mod:`mtlopt.solvers.min_norm_host`).
    """
    if gramian.dim() != 2 or gramian.shape[0] != gramian.shape[1]:
        raise ValueError(f"gramian: expected a square matrix, got shape {tuple(gramian.shape)}")
    gramian = gramian.to(torch.float64)
    m = gramian.shape[0]
    if m == 1:
        return torch.ones(1, dtype=torch.float64, device=gramian.device)
    if PIVOT_ON_CPU and host_linalg.on_host(gramian):
        solved = min_norm_on_host(gramian.tolist(), FACE_RIDGE)
        if solved is not None:
            return torch.tensor(solved, dtype=torch.float64)
    largest = gramian.diagonal().amax()
    zero = largest <= 0
    normalised = gramian / torch.where(zero, 1.0, largest)
    weights = nonnegative_qp(
        normalised, torch.zeros(m, dtype=torch.float64, device=gramian.device), True
    )
    uniform = torch.full_like(weights, 1.0 / m)
    return torch.where(zero, uniform, weights)
